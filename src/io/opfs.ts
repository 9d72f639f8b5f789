/**
 * Byte stores on the Origin Private File System (OPFS), for overlays that survive reloads and browser restarts.
 *
 * The fast path is `FileSystemSyncAccessHandle`, which exists only in dedicated Workers: its reads and writes are
 * synchronous and go straight to the file, so the whole disk (engine, overlay, base) runs in one Worker and the
 * page talks to it by postMessage. A sync handle is exclusive: a second one on the same file throws
 * NoModificationAllowedError, which `OpfsStore.open` reports as a LockError naming the file.
 *
 * No `node:` imports here: this module is loaded by browsers only (and type-checked with the DOM library).
 */
import type { ByteStore } from '../qcow2/store.js';
import { LockError, ReadOnlyError, StoreError } from '../qcow2/errors.js';
import { HEADER_BYTES, PersistentBlocks, lastUsedOf, type SyncFile } from './persistent-blocks.js';

/** The subset of FileSystemSyncAccessHandle we use (its DOM typings are only in the webworker library). */
type SyncHandle = SyncFile;

interface SyncCapableFileHandle extends FileSystemFileHandle {
  createSyncAccessHandle(): Promise<SyncHandle>;
}

/** Thrown when the browser's storage quota does not let a write through: the UI says so in plain words. */
export class QuotaError extends StoreError {}

/** The QuotaError behind `error`, which may have been wrapped (an engine error naming the store's as its cause). */
export function quotaErrorIn(error: unknown): QuotaError | undefined {
  for (let at = error, depth = 0; at !== undefined && at !== null && depth < 8; at = (at as { cause?: unknown }).cause, depth++) {
    if (at instanceof QuotaError) return at;
  }
  return undefined;
}

/**
 * Called when a write or resize finds the site's storage full: frees what it can (kept copies, caches) and
 * says whether anything was freed, in which case the operation is tried once more. Writes never reach the
 * engine as failures that freeing space could have avoided.
 */
export type MakeRoom = () => Promise<boolean>;

/**
 * Chromium's in-memory file system (incognito profiles) answers a failed sync write with its internal file
 * error code as the byte count instead of throwing: -8 (no space) arrives as 2^32 - 8. A count larger than the
 * buffer is never a count.
 */
const CHROMIUM_NO_SPACE = 2 ** 32 - 8;

/** The OPFS directory qcow86 keeps its files in (created on first use). */
export async function opfsDirectory(name = 'qcow86'): Promise<FileSystemDirectoryHandle> {
  if (!('storage' in navigator) || typeof navigator.storage.getDirectory !== 'function') {
    throw new StoreError(`opfs:${name}`, 'this browser has no Origin Private File System (navigator.storage.getDirectory is missing)');
  }
  const root = await navigator.storage.getDirectory();
  return root.getDirectoryHandle(name, { create: true });
}

/** True when `name` exists in `dir`. */
export async function opfsExists(dir: FileSystemDirectoryHandle, name: string): Promise<boolean> {
  try {
    await dir.getFileHandle(name);
    return true;
  } catch (error) {
    if ((error as DOMException).name === 'NotFoundError') return false;
    throw error;
  }
}

/** Removes `name` from `dir`; a missing file is not an error. */
export async function opfsRemove(dir: FileSystemDirectoryHandle, name: string): Promise<void> {
  try {
    await dir.removeEntry(name);
  } catch (error) {
    if ((error as DOMException).name !== 'NotFoundError') throw error;
  }
}

/**
 * Renames `from` to `to` within `dir`, replacing a file named `to`. Neither may be open through a sync handle.
 * One rename: a crash leaves either name pointing at whole bytes, never a mix.
 */
export async function opfsRename(dir: FileSystemDirectoryHandle, from: string, to: string): Promise<void> {
  const handle = (await dir.getFileHandle(from)) as FileSystemFileHandle & { move?(name: string): Promise<void> };
  if (typeof handle.move !== 'function') throw new StoreError(`opfs:${dir.name}/${from}`, 'this browser cannot rename files in its private file system');
  await handle.move(to);
}

/** The names in `dir` (files and directories). */
export async function opfsNames(dir: FileSystemDirectoryHandle): Promise<string[]> {
  const names: string[] = [];
  for await (const name of (dir as unknown as { keys(): AsyncIterable<string> }).keys()) names.push(name);
  return names;
}

/**
 * A ByteStore over one OPFS file through a synchronous access handle. Must run in a dedicated Worker.
 * Writes are visible to reads at once; flush() makes them durable (the engine calls it at its ordering points).
 */
export class OpfsStore implements ByteStore {
  readonly readOnly: boolean;
  private closed = false;

  private constructor(
    readonly name: string,
    private readonly handle: SyncHandle,
    readOnly: boolean,
    private readonly makeRoom: MakeRoom | undefined,
  ) {
    this.readOnly = readOnly;
  }

  /**
   * Opens (and with `create`, creates) `fileName` in `dir`. The store's name is `opfs:<dir>/<file>` so errors say
   * where the bytes live.
   */
  static async open(dir: FileSystemDirectoryHandle, fileName: string, options: { create?: boolean; readOnly?: boolean; makeRoom?: MakeRoom } = {}): Promise<OpfsStore> {
    const name = `opfs:${dir.name}/${fileName}`;
    let file: SyncCapableFileHandle;
    try {
      file = (await dir.getFileHandle(fileName, { create: options.create ?? false })) as SyncCapableFileHandle;
    } catch (error) {
      throw new StoreError(name, `cannot open: ${(error as Error).message}`, { cause: error });
    }
    if (typeof file.createSyncAccessHandle !== 'function') {
      throw new StoreError(name, 'synchronous OPFS access is only available in a dedicated Worker');
    }
    try {
      return new OpfsStore(name, await file.createSyncAccessHandle(), options.readOnly ?? false, options.makeRoom);
    } catch (error) {
      if ((error as DOMException).name === 'NoModificationAllowedError') {
        throw new LockError(name, 'the file is open elsewhere (another tab or worker holds it)');
      }
      throw new StoreError(name, `cannot open: ${(error as Error).message}`, { cause: error });
    }
  }

  async size(): Promise<number> {
    this.checkOpen();
    return this.handle.getSize();
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    this.checkOpen();
    const end = Math.min(this.handle.getSize(), offset + length);
    if (offset >= end) return new Uint8Array(0);
    const out = new Uint8Array(end - offset);
    let done = 0;
    // A sync read may return fewer bytes than asked; loop until the range is filled or the file ends.
    while (done < out.length) {
      const n = this.handle.read(out.subarray(done), { at: offset + done });
      if (n <= 0) break;
      done += n;
    }
    return done === out.length ? out : out.subarray(0, done);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.checkWritable();
    const what = `write of ${data.length} bytes at offset ${offset}`;
    let done = 0;
    await this.withRoom(what, () => {
      while (done < data.length) {
        const n = this.handle.write(data.subarray(done), { at: offset + done });
        if (n === CHROMIUM_NO_SPACE) throw new DOMException('the browser reported no space for the write', 'QuotaExceededError');
        if (n <= 0 || n > data.length - done) throw new StoreError(this.name, `${what} stopped after ${done} bytes (the browser answered ${n})`);
        done += n;
      }
    });
  }

  async truncate(size: number): Promise<void> {
    this.checkWritable();
    await this.withRoom(`resize to ${size} bytes`, () => {
      this.handle.truncate(size);
      // Chromium's in-memory file system leaves a file it cannot grow as it was, without an error.
      const now = this.handle.getSize();
      if (now !== size) throw new DOMException(`the file stayed ${now} bytes`, now < size ? 'QuotaExceededError' : 'InvalidStateError');
    });
  }

  /** Runs a synchronous write step; when the storage is full, lets makeRoom free space and runs it once more. */
  private async withRoom(what: string, step: () => void): Promise<void> {
    try {
      step();
      return;
    } catch (error) {
      const failure = this.translate(error, what);
      if (!(failure instanceof QuotaError) || !this.makeRoom || !(await this.makeRoom().catch(() => false))) throw failure;
    }
    try {
      step();
    } catch (error) {
      throw this.translate(error, what);
    }
  }

  async flush(): Promise<void> {
    this.checkOpen();
    if (!this.readOnly) this.handle.flush();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (!this.readOnly) this.handle.flush();
    this.handle.close();
  }

  private checkOpen(): void {
    if (this.closed) throw new StoreError(this.name, 'store is closed');
  }

  private checkWritable(): void {
    this.checkOpen();
    if (this.readOnly) throw new ReadOnlyError(this.name, 'store is read-only');
  }

  private translate(error: unknown, what: string): Error {
    if (error instanceof StoreError) return error;
    if ((error as DOMException).name === 'QuotaExceededError') {
      return new QuotaError(this.name, `${what} failed: the browser's storage quota for this site is used up`, { cause: error });
    }
    return new StoreError(this.name, `${what} failed: ${(error as Error).message}`, { cause: error });
  }
}

/** A read-only ByteStore over a Blob (a picked or dropped File, or an OPFS file snapshot from getFile()). */
export class BlobStore implements ByteStore {
  readonly readOnly = true;
  constructor(
    readonly name: string,
    private readonly blob: Blob,
  ) {}

  async size(): Promise<number> {
    return this.blob.size;
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const end = Math.min(this.blob.size, offset + length);
    if (offset >= end) return new Uint8Array(0);
    return new Uint8Array(await this.blob.slice(offset, end).arrayBuffer());
  }

  async write(): Promise<void> {
    throw new ReadOnlyError(this.name, 'store is read-only');
  }

  async truncate(): Promise<void> {
    throw new ReadOnlyError(this.name, 'store is read-only');
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {}
}

/** How many bases' kept blocks stay in OPFS: the most recently used ones (a site may offer many guests). */
export const KEPT_BASES = 4;

/**
 * The persistent block store for the remote file at `url` (the base image's blocks a reloaded tab reuses), in
 * its own OPFS directory, one file per URL. Undefined when it cannot be had: no OPFS, no sync handles outside a
 * dedicated Worker, or another tab holding the file (its sync handle is exclusive): the caller reads over the
 * network as before. Opening one marks it used and deletes the blocks of all but the KEPT_BASES most recently
 * used bases, so visiting many guests does not fill the browser's storage with bases no longer used.
 */
export async function opfsPersistentBlocks(url: string, dirName = 'qcow86-base-blocks'): Promise<PersistentBlocks | undefined> {
  try {
    const dir = await opfsDirectory(dirName);
    const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(url)));
    const name = `${[...digest.subarray(0, 16)].map((b) => b.toString(16).padStart(2, '0')).join('')}.blocks`;
    const file = (await dir.getFileHandle(name, { create: true })) as SyncCapableFileHandle;
    if (typeof file.createSyncAccessHandle !== 'function') return undefined;
    const blocks = PersistentBlocks.open(await file.createSyncAccessHandle());
    blocks.touch();
    await evictLeastRecentlyUsed(dir, name).catch(() => {});
    return blocks;
  } catch {
    return undefined;
  }
}

/**
 * Deletes every base's kept blocks (they are a cache: the blocks are fetched again when needed), to make room
 * when the site's storage is full. A file another tab holds open cannot be deleted and stays. Returns the bytes
 * freed.
 */
export async function removeKeptBlocks(dirName = 'qcow86-base-blocks'): Promise<number> {
  const dir = await opfsDirectory(dirName);
  let freed = 0;
  for (const name of await opfsNames(dir)) {
    if (!name.endsWith('.blocks')) continue;
    try {
      const size = (await (await dir.getFileHandle(name)).getFile()).size;
      await dir.removeEntry(name);
      freed += size;
    } catch {
      // Open in another tab (its sync handle is exclusive), or gone already.
    }
  }
  return freed;
}

/**
 * Deletes the block files of all but the KEPT_BASES most recently used bases (each file records when it was last
 * opened). A file another tab holds open cannot be deleted and stays.
 */
async function evictLeastRecentlyUsed(dir: FileSystemDirectoryHandle, inUse: string): Promise<void> {
  const files: { name: string; used: number }[] = [];
  for await (const [name, handle] of (dir as unknown as { entries(): AsyncIterable<[string, FileSystemHandle]> }).entries()) {
    if (name === inUse || handle.kind !== 'file' || !name.endsWith('.blocks')) continue;
    const head = new Uint8Array(await (await (handle as FileSystemFileHandle).getFile()).slice(0, HEADER_BYTES).arrayBuffer());
    files.push({ name, used: lastUsedOf(head) });
  }
  files.sort((a, b) => b.used - a.used);
  for (const { name } of files.slice(KEPT_BASES - 1)) await opfsRemove(dir, name).catch(() => {});
}

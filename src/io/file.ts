import { close, constants, fdatasync, fstat, ftruncate, open, read, readSync, stat, write, type Stats } from 'node:fs';
import type { ByteStore } from '../qcow2/store.js';
import { ReadOnlyError, StoreError } from '../qcow2/errors.js';

/**
 * A store over a local file (Node). Reads past the end come back short, as the contract says.
 *
 * It uses the callback fs API on a plain descriptor rather than fs/promises FileHandle: every request is one
 * libuv threadpool job either way, but FileHandle.read/write cost about twice as much per call on the main thread
 * (a FileHandle request object, result objects, promise bookkeeping), which is what random 4 KiB reads and
 * convert's many writes are made of.
 */
export class FileStore implements ByteStore {
  private closed = false;

  private constructor(
    readonly name: string,
    private readonly fd: number,
    readonly readOnly: boolean,
  ) {}

  /**
   * `regularFile` (a name for the message, e.g. 'backing file') refuses anything but a regular file - a FIFO,
   * device, socket or directory - by name, without opening it: opening a FIFO waits for a writer forever, and
   * opening a device can have effects of its own. For files an image names, which its author chose.
   */
  static async open(path: string, options: { readOnly?: boolean; create?: boolean; regularFile?: string } = {}): Promise<FileStore> {
    const readOnly = options.readOnly ?? true;
    const { O_RDONLY, O_RDWR, O_CREAT, O_TRUNC, O_NONBLOCK, O_NOCTTY } = constants;
    let flags = readOnly ? O_RDONLY : options.create ? O_RDWR | O_CREAT | O_TRUNC : O_RDWR;
    if (options.regularFile !== undefined) {
      const kind = await fileKind(path);
      if (kind !== 'regular file' && kind !== undefined) throw new StoreError(path, `${options.regularFile} is a ${kind}, not a regular file: refused`);
      // Should the name be swapped for a FIFO after the check, the open still returns at once; fstat decides.
      flags |= O_NONBLOCK | O_NOCTTY;
    }
    let fd: number;
    try {
      fd = await new Promise<number>((resolve, reject) => open(path, flags, 0o666, (error, fd) => (error ? reject(error) : resolve(fd))));
    } catch (error) {
      throw new StoreError(path, `cannot open: ${(error as Error).message}`, { cause: error });
    }
    if (options.regularFile !== undefined) {
      const kind = kindOf(await new Promise<Stats>((resolve, reject) => fstat(fd, (error, stats) => (error ? reject(error) : resolve(stats)))));
      if (kind !== 'regular file') {
        await new Promise((resolve) => close(fd, resolve));
        throw new StoreError(path, `${options.regularFile} is a ${kind}, not a regular file: refused`);
      }
    }
    return new FileStore(path, fd, readOnly);
  }

  size(): Promise<number> {
    return new Promise((resolve, reject) => fstat(this.fd, (error, stats) => (error ? reject(error) : resolve(stats.size))));
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const buffer = new Uint8Array(length);
    const done = await this.readInto(offset, buffer);
    return done === length ? buffer : buffer.subarray(0, done);
  }

  readInto(offset: number, into: Uint8Array): Promise<number> {
    // One request in the common case; a short read before the end of the file (legal: signals, huge requests)
    // asks for the rest.
    return readAt(this.fd, into, 0, into.length, offset, this.name).then((done) => (done === into.length || done === 0 ? done : this.readRest(offset, into, done)));
  }

  readIntoSync(offset: number, into: Uint8Array): number {
    let done = 0;
    while (done < into.length && withinAnyFile(offset + done)) {
      const more = readSync(this.fd, into, done, into.length - done, offset + done);
      if (more === 0) break;
      done += more;
    }
    return done;
  }

  private async readRest(offset: number, into: Uint8Array, done: number): Promise<number> {
    while (done < into.length) {
      const more = await readAt(this.fd, into, done, into.length - done, offset + done, this.name);
      if (more === 0) break;
      done += more;
    }
    return done;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(this.name, 'file is open read-only');
    await writeAll(this.fd, data, offset).catch((error: unknown) => {
      throw failed(this.name, `writing ${data.length} bytes at offset ${offset}`, error);
    });
  }

  truncate(size: number): Promise<void> {
    if (this.readOnly) return Promise.reject(new ReadOnlyError(this.name, 'file is open read-only'));
    return new Promise((resolve, reject) => ftruncate(this.fd, size, (error) => (error ? reject(failed(this.name, `setting the size to ${size} bytes`, error)) : resolve())));
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    await new Promise<void>((resolve, reject) => fdatasync(this.fd, (error) => (error ? reject(failed(this.name, 'flushing it to the disk', error)) : resolve())));
  }

  async close(): Promise<void> {
    // Closing twice must not close a descriptor number the process has since reused for another file.
    if (this.closed) return;
    this.closed = true;
    await new Promise<void>((resolve, reject) => close(this.fd, (error) => (error ? reject(error) : resolve())));
  }
}

/**
 * No file reaches 2^53 bytes: a position past that (a damaged table entry's offset) is past the end, where
 * fs.read would throw a RangeError instead.
 */
function withinAnyFile(position: number): boolean {
  return Number.isSafeInteger(position) && position >= 0;
}

/** One positional read; resolves with the byte count (0 at the end of the file). `file` names it in errors. */
export function readAt(fd: number, buffer: Uint8Array, at: number, length: number, position: number, file?: string): Promise<number> {
  if (!withinAnyFile(position)) return Promise.resolve(0);
  return new Promise((resolve, reject) =>
    read(fd, buffer, at, length, position, (error, bytesRead) => (error ? reject(file === undefined ? error : failed(file, `reading ${length} bytes at offset ${position}`, error)) : resolve(bytesRead))),
  );
}

/** Writes all of `data` at `position` (pwrite may write less than asked; the rest follows). */
export async function writeAll(fd: number, data: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < data.length) {
    done += await new Promise<number>((resolve, reject) =>
      write(fd, data, done, data.length - done, position + done, (error, written) => (error ? reject(error) : resolve(written))),
    );
  }
}

/** What a path names, following symlinks, in words for a message; undefined when it does not exist. */
export function fileKind(path: string): Promise<string | undefined> {
  return new Promise((resolve) => stat(path, (error, stats) => resolve(error ? undefined : kindOf(stats))));
}

function kindOf(stats: Stats): string {
  if (stats.isFile()) return 'regular file';
  if (stats.isDirectory()) return 'directory';
  if (stats.isFIFO()) return 'FIFO';
  if (stats.isSocket()) return 'socket';
  if (stats.isBlockDevice()) return 'block device';
  if (stats.isCharacterDevice()) return 'character device';
  return 'special file';
}

/** A failed write, truncate or flush, said so a person knows which file, what and why ("no space left on device"). */
export function failed(file: string, what: string, error: unknown): StoreError {
  const code = (error as NodeJS.ErrnoException).code;
  const reason = code === 'ENOSPC' ? 'no space left on device' : code === 'EIO' ? 'input/output error' : code === 'EDQUOT' ? 'disk quota exceeded' : (error as Error).message;
  return new StoreError(file, `${what} failed: ${reason}${code ? ` (${code})` : ''}`, { cause: error });
}

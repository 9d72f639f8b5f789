/**
 * Blocks of a remote read-only file kept across sessions (a reloaded tab finds the base image's blocks it already
 * fetched). One file holds a header naming the URL and the exact version (strong ETag, size, block size), a
 * bitmap of the blocks present, and each block at its own offset.
 *
 * Two rules keep it honest. A block's bit is written only after its bytes were flushed, so a crash loses blocks
 * but never serves bytes that were not written. And the file holds exactly one version: switching to another
 * empties it first, so blocks of two versions of the image are never combined (issue #6).
 */

/** The synchronous file access this needs; a browser's FileSystemSyncAccessHandle has exactly this shape. */
export interface SyncFile {
  read(buffer: Uint8Array, options: { at: number }): number;
  write(buffer: Uint8Array, options: { at: number }): number;
  truncate(size: number): void;
  getSize(): number;
  flush(): void;
  close(): void;
}

/** What the stored blocks are blocks of. */
export interface BlockVersion {
  url: string;
  /** A strong ETag, verbatim. */
  validator: string;
  size: number;
  blockSize: number;
}

const MAGIC = 'qcow86-blocks 1\n';
export const HEADER_BYTES = 4096;
/**
 * When the store was last opened (milliseconds since the epoch, a big-endian float64) in the header's last 8
 * bytes: which bases' blocks to keep goes by it. Not the file's modification time, which the browser does not
 * always advance for writes through a sync handle (seen in Chromium's in-memory profiles).
 */
const USED_AT = HEADER_BYTES - 8;

/** When a block file whose first HEADER_BYTES are `header` was last used; 0 when it does not say. */
export function lastUsedOf(header: Uint8Array): number {
  if (header.length < HEADER_BYTES || new TextDecoder().decode(header.subarray(0, MAGIC.length)) !== MAGIC) return 0;
  return new DataView(header.buffer, header.byteOffset + USED_AT, 8).getFloat64(0) || 0;
}
const ALIGN = 4096;

export class PersistentBlocks {
  private bitmap = new Uint8Array(0);
  /** Blocks written since the last commit: their bits are set only once their bytes are flushed. */
  private readonly dirty = new Set<number>();
  private current: BlockVersion | undefined;
  /** Closed (or discarded): every later call is a no-op, so a store still holding this object reads nothing. */
  private closed = false;

  private constructor(private readonly file: SyncFile) {}

  /** Opens the store in `file`; a missing, foreign or damaged header makes an empty store. */
  static open(file: SyncFile): PersistentBlocks {
    const store = new PersistentBlocks(file);
    store.current = store.readHeader();
    if (store.current) {
      const bitmap = new Uint8Array(bitmapBytes(store.current));
      if (file.read(bitmap, { at: HEADER_BYTES }) === bitmap.length) store.bitmap = bitmap;
      else store.current = undefined;
    }
    return store;
  }

  /** The version held, or undefined when the store is empty. */
  get stored(): BlockVersion | undefined {
    return this.current;
  }

  /** Number of blocks present. */
  get count(): number {
    let n = 0;
    for (const byte of this.bitmap) for (let b = byte; b; b &= b - 1) n++;
    return n;
  }

  /**
   * Makes the store hold `version`: the blocks already there are kept when they are of exactly this version,
   * otherwise they are dropped first. Returns whether blocks were kept.
   */
  use(version: BlockVersion): boolean {
    if (this.closed) return false;
    if (this.current && sameVersion(this.current, version)) return true;
    const header = new TextEncoder().encode(MAGIC + JSON.stringify(version) + '\n');
    this.dirty.clear();
    this.current = undefined;
    this.bitmap = new Uint8Array(0);
    // Empty first (a crash after this leaves an empty store), then the new header over a zero bitmap.
    this.file.truncate(0);
    this.file.flush();
    if (header.length > USED_AT) return false;
    this.file.write(header, { at: 0 });
    this.stamp(Date.now());
    this.file.flush();
    this.current = { ...version };
    this.bitmap = new Uint8Array(bitmapBytes(version));
    return false;
  }

  /** Records that the store is being used now (eviction of old bases keeps the most recently used). */
  touch(now = Date.now()): void {
    if (!this.current) return;
    this.stamp(now);
    this.file.flush();
  }

  private stamp(now: number): void {
    const bytes = new Uint8Array(8);
    new DataView(bytes.buffer).setFloat64(0, now);
    this.file.write(bytes, { at: USED_AT });
  }

  has(index: number): boolean {
    return ((this.bitmap[index >> 3] ?? 0) & (1 << (index & 7))) !== 0;
  }

  /** Block `index`, or undefined when it is not stored. */
  read(index: number): Uint8Array | undefined {
    const version = this.current;
    if (!version || !this.has(index)) return undefined;
    const block = new Uint8Array(blockLength(version, index));
    if (this.file.read(block, { at: dataStart(version) + index * version.blockSize }) !== block.length) return undefined;
    return block;
  }

  /** Stores block `index` (its full length); it counts as present after the next commit(). */
  write(index: number, block: Uint8Array): void {
    const version = this.current;
    if (!version || this.has(index) || index < 0 || index * version.blockSize >= version.size) return;
    if (block.length !== blockLength(version, index)) throw new RangeError(`block ${index} is ${block.length} bytes, not ${blockLength(version, index)}`);
    if (this.file.write(block, { at: dataStart(version) + index * version.blockSize }) !== block.length) throw new Error(`short write of block ${index}`);
    this.dirty.add(index);
  }

  /** Makes the blocks written so far durable, then marks them present. */
  commit(): void {
    if (!this.current || this.dirty.size === 0) return;
    this.file.flush();
    for (const index of this.dirty) this.bitmap[index >> 3]! |= 1 << (index & 7);
    this.dirty.clear();
    this.file.write(this.bitmap, { at: HEADER_BYTES });
    this.file.flush();
  }

  /** Drops every block (e.g. the image turned out to have changed). */
  clear(): void {
    if (this.closed) return;
    this.dirty.clear();
    this.current = undefined;
    this.bitmap = new Uint8Array(0);
    this.file.truncate(0);
    this.file.flush();
  }

  close(): void {
    if (this.closed) return;
    try {
      this.commit();
    } finally {
      this.closed = true;
      this.current = undefined;
      this.bitmap = new Uint8Array(0);
      this.file.close();
    }
  }

  /**
   * Empties the store and closes it, to give its space back (the site's storage is full); whoever still holds
   * it finds no blocks and keeps none from now on. Afterwards its file can be deleted.
   */
  discard(): void {
    if (this.closed) return;
    try {
      this.clear();
    } finally {
      this.close();
    }
  }

  private readHeader(): BlockVersion | undefined {
    const head = new Uint8Array(HEADER_BYTES);
    const got = this.file.read(head, { at: 0 });
    const text = new TextDecoder().decode(head.subarray(0, got));
    if (!text.startsWith(MAGIC)) return undefined;
    const end = text.indexOf('\n', MAGIC.length);
    if (end < 0) return undefined;
    try {
      const parsed = JSON.parse(text.slice(MAGIC.length, end)) as Partial<BlockVersion>;
      const { url, validator, size, blockSize } = parsed;
      if (typeof url !== 'string' || typeof validator !== 'string' || !Number.isSafeInteger(size) || !Number.isSafeInteger(blockSize)) return undefined;
      if (size! < 0 || blockSize! < 512) return undefined;
      return { url, validator, size: size!, blockSize: blockSize! };
    } catch {
      return undefined;
    }
  }
}

function sameVersion(a: BlockVersion, b: BlockVersion): boolean {
  return a.url === b.url && a.validator === b.validator && a.size === b.size && a.blockSize === b.blockSize;
}

function bitmapBytes(version: BlockVersion): number {
  const blocks = Math.ceil(version.size / version.blockSize);
  return Math.ceil(Math.ceil(blocks / 8) / ALIGN) * ALIGN;
}

function dataStart(version: BlockVersion): number {
  return HEADER_BYTES + bitmapBytes(version);
}

function blockLength(version: BlockVersion, index: number): number {
  return Math.min(version.blockSize, version.size - index * version.blockSize);
}

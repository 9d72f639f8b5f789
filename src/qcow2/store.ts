import { ShortReadError } from './errors.js';

/**
 * The byte-store contract the engine is written against. The engine never touches a file system, the DOM or the
 * network itself: callers hand it stores (src/io/ has memory, Node file, HTTP Range and OPFS implementations).
 *
 * Offsets and lengths are plain numbers: images are bounded well below 2^53 bytes by validation on open.
 */
export interface ByteStore {
  /** What a person calls this store in an error message: a path or a URL. */
  readonly name: string;
  /** True when write() and truncate() will refuse. */
  readonly readOnly: boolean;
  /**
   * What identifies this exact version of the bytes, when the store can tell (an HTTP strong ETag, or
   * Last-Modified + size). Overlays record their base's validator so a changed base is noticed on reopen.
   */
  readonly validator?: string | undefined;
  /** Other names of the same version that older overlays may have recorded (see sameVersion). */
  readonly legacyValidators?: readonly string[];
  /** Current size in bytes. */
  size(): Promise<number>;
  /**
   * Reads `length` bytes at `offset`. Bytes past the end of the store are not returned: the result is shorter
   * (possibly empty) when the range crosses the end. Never reads outside [0, size).
   */
  read(offset: number, length: number): Promise<Uint8Array>;
  /**
   * Optional: reads up to `into.length` bytes at `offset` into `into` and returns how many it read (fewer only at
   * the end of the store). Lets hot paths (convert, guest reads) reuse buffers and skip a copy.
   */
  readInto?(offset: number, into: Uint8Array): Promise<number>;
  /**
   * Optional: readInto without waiting, for stores that can answer on the spot (a local file). The engine never
   * calls it (it must not block a browser's thread); a caller that owns its thread, like the CLI's convert, can
   * copy planned ranges (block status gives the store and offset) with it, skipping a round trip per request.
   */
  readIntoSync?(offset: number, into: Uint8Array): number;
  /** Writes all of `data` at `offset`, growing the store when needed (the gap reads as zeros). */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Sets the size; growing fills with zeros. */
  truncate(size: number): Promise<void>;
  /** Makes every completed write durable (fsync for files). Ordering points in the engine call this. */
  flush(): Promise<void>;
  close(): Promise<void>;
}

/** The fields of an image that name other files. */
export type NamedFilePurpose = 'backing file' | 'data file';

/** How a backing (or external data) file is found: the caller decides what a name means. */
export interface StoreResolver {
  /**
   * Opens the store called `name` as written in an image whose own store is `relativeTo`: a relative path is
   * taken relative to that image's directory, a relative URL relative to its URL; absolute names stand alone.
   * `fullName` is what qemu-img calls full-backing-filename (the name joined to the image's directory, as
   * written); `identity` names the underlying file canonically (a real path, a normalised URL) so that loops in a
   * backing chain are found however the names are spelled.
   */
  open(name: string, relativeTo: ByteStore, options: ResolveOptions): Promise<{ store: ByteStore; fullName: string; identity: string }>;
}

/** What the engine says when it asks a resolver for a file an image names. */
export interface ResolveOptions {
  readOnly: boolean;
  /** Which field of the image named it, for the resolver's policy and its messages. */
  purpose?: NamedFilePurpose;
}

/**
 * Fills `into` with the store's bytes at `offset`; bytes past the end of the store read as zeros (as a data
 * cluster past the end of a truncated file does in QEMU). Uses readInto when the store has it.
 */
export function readIntoPadded(store: ByteStore, offset: number, into: Uint8Array): Promise<void> {
  if (store.readInto) {
    return store.readInto(offset, into).then((got) => {
      if (got < into.length) into.fill(0, got);
    });
  }
  return store.read(offset, into.length).then((bytes) => {
    into.set(bytes);
    if (bytes.length < into.length) into.fill(0, bytes.length);
  });
}

/** Reads exactly `length` bytes or throws a ShortReadError naming the store, offset and what was missing. */
export async function readExact(store: ByteStore, offset: number, length: number, what: string): Promise<Uint8Array> {
  const bytes = await store.read(offset, length);
  if (bytes.length !== length) {
    throw new ShortReadError(store.name, what, offset, length, bytes.length);
  }
  return bytes;
}

/** True when `recorded` (an overlay's record of its base) names the version `store` holds now. */
export function sameVersion(recorded: string, store: ByteStore): boolean {
  return recorded === store.validator || (store.legacyValidators?.includes(recorded) ?? false);
}

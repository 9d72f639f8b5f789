/**
 * Typed errors. Each names the file, and where it applies the field, offset and value that is wrong, so the CLI
 * can print one line a person understands and callers can branch on the class.
 */
export class Qcow86Error extends Error {
  /** The store (path or URL) the error is about. */
  readonly file: string;
  constructor(file: string, message: string) {
    super(file ? `${file}: ${message}` : message);
    this.name = new.target.name;
    this.file = file;
  }
}

/** The bytes are not a valid image of the format (bad magic, field out of range, table outside the file...). */
export class FormatError extends Qcow86Error {
  readonly field: string | undefined;
  readonly offset: number | undefined;
  readonly value: bigint | number | string | undefined;
  constructor(file: string, message: string, details: { field?: string; offset?: number; value?: bigint | number | string } = {}) {
    super(file, message);
    this.field = details.field;
    this.offset = details.offset;
    this.value = details.value;
  }
}

/** Valid image that uses something this engine does not implement (unknown incompatible feature, encryption...). */
export class UnsupportedError extends Qcow86Error {
  readonly feature: string;
  constructor(file: string, feature: string, message: string) {
    super(file, message);
    this.feature = feature;
  }
}

/**
 * An encrypted image cannot be unlocked: no key was given for it, or the key is wrong (`wrongKey`). Nothing is
 * read or written then.
 */
export class KeyError extends Qcow86Error {
  constructor(file: string, message: string, readonly wrongKey = false) {
    super(file, message);
  }
}

/** The image's metadata is inconsistent (detected while reading or before a write that would damage it). */
export class CorruptImageError extends Qcow86Error {
  readonly offset: number | undefined;
  constructor(file: string, message: string, offset?: number) {
    super(file, message);
    this.offset = offset;
  }
}

/** A store returned fewer bytes than a structure needs: the file is truncated. */
export class ShortReadError extends Qcow86Error {
  constructor(file: string, what: string, readonly offset: number, readonly wanted: number, readonly got: number) {
    super(file, `${what} at offset 0x${offset.toString(16)} is truncated: needed ${wanted} bytes, file has ${got}`);
  }
}

/** An operation that needs write access on an image opened read-only (or marked corrupt). */
export class ReadOnlyError extends Qcow86Error {}

/** Another live process holds the image's write lock. */
export class LockError extends Qcow86Error {}

/** Store-level failure (file system, network) with the underlying cause attached. */
export class StoreError extends Qcow86Error {
  constructor(file: string, message: string, options?: { cause?: unknown }) {
    super(file, message);
    if (options?.cause !== undefined) (this as { cause?: unknown }).cause = options.cause;
  }
}

/** Backing chain problems: a loop, a missing file, a chain deeper than allowed. */
export class BackingChainError extends Qcow86Error {}

/**
 * An HTTP store refused a response (status, headers or body not what a ranged read of this exact image must
 * return) or the image changed on the server. `url` is the image; `status` the HTTP status when there was one.
 */
export class HttpError extends StoreError {
  constructor(url: string, message: string, readonly status?: number, options?: { cause?: unknown }) {
    super(url, message, options);
  }
}

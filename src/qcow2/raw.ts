import type { BlockDevice } from './device.js';
import { readIntoPadded, type ByteStore } from './store.js';
import { FormatError, ReadOnlyError } from './errors.js';

/**
 * A raw image: guest offset == file offset. Like QEMU, bytes past the end of a shorter file read as zeros,
 * which is what a backing file shorter than its overlay needs.
 */
export class RawImage implements BlockDevice {
  readonly format = 'raw' as const;

  private constructor(readonly store: ByteStore, readonly virtualSize: number, readonly readOnly: boolean) {}

  get name(): string {
    return this.store.name;
  }

  static async open(store: ByteStore, options: { readOnly?: boolean } = {}): Promise<RawImage> {
    return new RawImage(store, await store.size(), options.readOnly ?? store.readOnly);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(this, offset, length);
    const bytes = await this.store.read(offset, length);
    if (bytes.length === length) return bytes;
    const padded = new Uint8Array(length);
    padded.set(bytes);
    return padded;
  }

  async readInto(offset: number, into: Uint8Array): Promise<void> {
    checkRange(this, offset, into.length);
    await readIntoPadded(this.store, offset, into);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(this.name, 'image is open read-only');
    checkRange(this, offset, data.length);
    await this.store.write(offset, data);
  }

  async flush(): Promise<void> {
    if (!this.readOnly) await this.store.flush();
  }

  async close(): Promise<void> {
    await this.store.close();
  }
}

export function checkRange(device: BlockDevice, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > device.virtualSize) {
    throw new FormatError(device.name, `request ${offset}+${length} is outside the virtual disk (${device.virtualSize} bytes)`);
  }
}

import type { BlockDevice } from './device.js';
import { readIntoPadded, type ByteStore } from './store.js';
import { FormatError, ReadOnlyError, UnsupportedError } from './errors.js';
import { nonRawFormatOf } from './probe.js';

/** QEMU's block layer keeps a device's length in whole 512-byte sectors. */
const SECTOR = 512;

/**
 * A raw image: guest offset == file offset. Like QEMU, bytes past the end of a shorter file read as zeros,
 * which is what a backing file shorter than its overlay needs. The disk is the file rounded up to whole
 * 512-byte sectors, as QEMU sees it (a 1000-byte file is a 1024-byte disk whose last 24 bytes read as zeros).
 */
export class RawImage implements BlockDevice {
  readonly format = 'raw' as const;
  readonly virtualSize: number;

  private constructor(
    readonly store: ByteStore,
    /** The file's length: bytes from here to the end of the disk are past the end of the file. */
    public fileSize: number,
    readonly readOnly: boolean,
    /** Its format was probed, not given: see write(). */
    readonly probed: boolean,
  ) {
    this.virtualSize = Math.ceil(fileSize / SECTOR) * SECTOR;
  }

  get name(): string {
    return this.store.name;
  }

  static async open(store: ByteStore, options: { readOnly?: boolean; probed?: boolean } = {}): Promise<RawImage> {
    return new RawImage(store, await store.size(), options.readOnly ?? store.readOnly, options.probed === true);
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
    if (this.probed && offset < SECTOR && data.length > 0) await this.guardFirstSector(offset, data);
    await this.store.write(offset, data);
    this.fileSize = Math.max(this.fileSize, offset + data.length);
  }

  /**
   * A disk whose format was probed as raw must never start to probe as another format: the next open would read
   * it as, say, a qcow2 image, whose header can name any host file as its backing file - a guest could reach the
   * host's files by writing one sector (QEMU refuses these writes for the same reason). The first sector as it
   * would be after the write is judged whole (a partial write is combined with the bytes it leaves in place).
   */
  private async guardFirstSector(offset: number, data: Uint8Array): Promise<void> {
    let sector = data.subarray(0, SECTOR);
    if (offset !== 0 || data.length < SECTOR) {
      sector = new Uint8Array(SECTOR);
      await readIntoPadded(this.store, 0, sector);
      sector.set(data.subarray(0, SECTOR - offset), offset);
    }
    const claimed = nonRawFormatOf(sector);
    if (claimed) {
      throw new UnsupportedError(this.name, 'probed raw', `refusing to write a ${claimed} header into the first sector of an image whose format was probed as raw (it would open as ${claimed} next time); give the format (-f raw) to write it`);
    }
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

import { open, type FileHandle } from 'node:fs/promises';
import type { ByteStore } from '../qcow2/store.js';
import { ReadOnlyError, StoreError } from '../qcow2/errors.js';

/** A store over a local file (Node). Reads past the end come back short, as the contract says. */
export class FileStore implements ByteStore {
  private constructor(
    readonly name: string,
    private readonly handle: FileHandle,
    readonly readOnly: boolean,
  ) {}

  static async open(path: string, options: { readOnly?: boolean; create?: boolean } = {}): Promise<FileStore> {
    const readOnly = options.readOnly ?? true;
    const flags = readOnly ? 'r' : options.create ? 'w+' : 'r+';
    try {
      return new FileStore(path, await open(path, flags), readOnly);
    } catch (error) {
      throw new StoreError(path, `cannot open: ${(error as Error).message}`, { cause: error });
    }
  }

  async size(): Promise<number> {
    return (await this.handle.stat()).size;
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const buffer = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.handle.read(buffer, done, length - done, offset + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done === length ? buffer : buffer.subarray(0, done);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(this.name, 'file is open read-only');
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.handle.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
  }

  async truncate(size: number): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(this.name, 'file is open read-only');
    await this.handle.truncate(size);
  }

  async flush(): Promise<void> {
    if (!this.readOnly) await this.handle.datasync();
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

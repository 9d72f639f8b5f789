import type { ByteStore } from '../qcow2/store.js';
import { ReadOnlyError } from '../qcow2/errors.js';

/** A store held in memory; grows by doubling so appends stay amortised O(1). */
export class MemoryStore implements ByteStore {
  private bytes: Uint8Array;
  private length: number;

  constructor(readonly name = 'memory', initial?: Uint8Array, readonly readOnly = false) {
    this.bytes = initial ? initial.slice() : new Uint8Array(0);
    this.length = this.bytes.length;
  }

  /** A copy of the current contents. */
  contents(): Uint8Array {
    return this.bytes.slice(0, this.length);
  }

  async size(): Promise<number> {
    return this.length;
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const end = Math.min(this.length, offset + length);
    if (offset >= end) return new Uint8Array(0);
    return this.bytes.slice(offset, end);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(this.name, 'store is read-only');
    const end = offset + data.length;
    this.reserve(end);
    this.bytes.set(data, offset);
    if (end > this.length) this.length = end;
  }

  async truncate(size: number): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(this.name, 'store is read-only');
    this.reserve(size);
    if (size < this.length) this.bytes.fill(0, size, this.length);
    this.length = size;
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {}

  private reserve(size: number): void {
    if (size <= this.bytes.length) return;
    const grown = new Uint8Array(Math.max(size, this.bytes.length * 2, 4096));
    grown.set(this.bytes.subarray(0, this.length));
    this.bytes = grown;
  }
}

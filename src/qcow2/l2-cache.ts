/**
 * A bounded LRU cache of L2 tables keyed by host offset, like QEMU's l2-cache-size: a 1 TiB sparse image reads in
 * a few MiB of table memory. Concurrent misses on one table share a single load.
 */
export class L2Cache {
  private readonly tables = new Map<number, Uint8Array>();
  private readonly loading = new Map<number, Promise<Uint8Array>>();
  hits = 0;
  misses = 0;

  /** `capacity` is a number of tables (at least 1). */
  constructor(readonly capacity: number) {
    if (!(capacity >= 1)) throw new RangeError(`L2 cache capacity must be at least one table, got ${capacity}`);
  }

  async get(offset: number, load: (offset: number) => Promise<Uint8Array>): Promise<Uint8Array> {
    const cached = this.tables.get(offset);
    if (cached) {
      this.hits++;
      // Re-insert to mark it most recently used: Map iteration order is insertion order.
      this.tables.delete(offset);
      this.tables.set(offset, cached);
      return cached;
    }
    const pending = this.loading.get(offset);
    if (pending) return pending;
    this.misses++;
    const promise = load(offset).then(
      (table) => {
        this.loading.delete(offset);
        this.put(offset, table);
        return table;
      },
      (error: unknown) => {
        this.loading.delete(offset);
        throw error;
      },
    );
    this.loading.set(offset, promise);
    return promise;
  }

  /** The cached table, without loading or touching the LRU order. */
  peek(offset: number): Uint8Array | undefined {
    return this.tables.get(offset);
  }

  put(offset: number, table: Uint8Array): void {
    this.tables.delete(offset);
    this.tables.set(offset, table);
    while (this.tables.size > this.capacity) {
      const oldest = this.tables.keys().next().value as number;
      this.tables.delete(oldest);
    }
  }

  delete(offset: number): void {
    this.tables.delete(offset);
  }

  clear(): void {
    this.tables.clear();
  }

  get size(): number {
    return this.tables.size;
  }
}

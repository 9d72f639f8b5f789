/**
 * A bounded LRU cache of L2 tables keyed by host offset, like QEMU's l2-cache-size: a 1 TiB sparse image reads in
 * a few MiB of table memory. Concurrent misses on one table share a single load.
 */
export class L2Cache {
  private readonly tables = new Map<number, Uint8Array>();
  private readonly loading = new Map<number, Promise<Uint8Array>>();
  hits = 0;
  misses = 0;
  /** The most recently looked-up table: it is already last in LRU order until another table is touched. */
  private lastOffset = -1;
  private lastTable: Uint8Array | undefined;

  /** `capacity` is a number of tables (at least 1). */
  constructor(readonly capacity: number) {
    if (!(capacity >= 1)) throw new RangeError(`L2 cache capacity must be at least one table, got ${capacity}`);
  }

  /**
   * The cached table, marked most recently used; undefined on a miss (nothing is loaded). Lets the read path map
   * without awaiting when the tables are cached. Repeated lookups of the same table skip the re-insertion.
   */
  lookup(offset: number): Uint8Array | undefined {
    if (offset === this.lastOffset && this.lastTable) {
      this.hits++;
      return this.lastTable;
    }
    const cached = this.tables.get(offset);
    if (!cached) return undefined;
    this.hits++;
    this.tables.delete(offset);
    this.tables.set(offset, cached);
    this.lastOffset = offset;
    this.lastTable = cached;
    return cached;
  }

  async get(offset: number, load: (offset: number) => Promise<Uint8Array>): Promise<Uint8Array> {
    // Re-inserting on a hit marks it most recently used: Map iteration order is insertion order.
    const cached = this.lookup(offset);
    if (cached) return cached;
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
    this.lastTable = undefined;
    while (this.tables.size > this.capacity) {
      const oldest = this.tables.keys().next().value as number;
      this.tables.delete(oldest);
    }
  }

  delete(offset: number): void {
    this.tables.delete(offset);
    this.lastTable = undefined;
  }

  clear(): void {
    this.tables.clear();
    this.lastTable = undefined;
  }

  get size(): number {
    return this.tables.size;
  }
}

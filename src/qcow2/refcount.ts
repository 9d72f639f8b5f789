/**
 * Refcounts: the refcount table, refcount blocks of any width (1..64 bits), first-fit cluster allocation and
 * growth of the refcount structures.
 *
 * Updates are kept in memory (dirty blocks, dirty table entries) and written by writeBack(); the caller decides
 * when, because the ordering against L2 updates is what makes the image crash-safe (see write-path.ts).
 */
import { CorruptImageError, FormatError } from './errors.js';
import { hex, putU32, putU64, u32, u64 } from './bytes.js';
import { MAX_REFTABLE_BYTES, type Qcow2Header } from './header.js';
import { readExact, type ByteStore } from './store.js';

const TWO_32 = 2 ** 32;
/** Bits 9..63 of a refcount table entry hold the block offset; the low bits are reserved. */
const REFT_OFFSET_LO_MASK = 0xfffffe00;

/** Reads entry `index` of a refcount block with 2^order-bit entries. Sub-byte widths pack LSB first. */
export function getRefcount(block: Uint8Array, index: number, order: number): number {
  switch (order) {
    case 0:
      return (block[index >>> 3]! >>> (index & 7)) & 1;
    case 1:
      return (block[index >>> 2]! >>> ((index & 3) * 2)) & 3;
    case 2:
      return (block[index >>> 1]! >>> ((index & 1) * 4)) & 15;
    case 3:
      return block[index]!;
    case 4:
      return (block[index * 2]! << 8) | block[index * 2 + 1]!;
    case 5:
      return u32(block, index * 4);
    default:
      return u64(block, index * 8);
  }
}

export function setRefcount(block: Uint8Array, index: number, order: number, value: number): void {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order;
      const perByte = 8 >>> order;
      const at = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[at] = (block[at]! & ~mask) | ((value << shift) & mask);
      return;
    }
    case 3:
      block[index] = value;
      return;
    case 4:
      block[index * 2] = value >>> 8;
      block[index * 2 + 1] = value & 0xff;
      return;
    case 5:
      putU32(block, index * 4, value);
      return;
    default:
      putU64(block, index * 8, value);
  }
}

/** The largest refcount a width can hold (64-bit refcounts are capped at 2^53 - 1: counts travel as numbers). */
export function maxRefcount(order: number): number {
  return order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
}

/** Host metadata to keep in the header when the refcount table moves. */
export interface RefcountHost {
  /** Rewrites the header (refcount_table_offset / refcount_table_clusters changed). */
  writeHeader(): Promise<void>;
}

export class Refcounts {
  readonly clusterSize: number;
  readonly order: number;
  /** Refcount entries per block. */
  readonly blockEntries: number;
  readonly max: number;
  /** Refcount table entries (block host offsets, 0 = none), possibly longer in memory than on disk during growth. */
  table: number[];
  private readonly blocks = new Map<number, Uint8Array>();
  private readonly dirtyBlocks = new Set<number>();
  private readonly dirtyTable = new Set<number>();
  /** QEMU's free_cluster_index: where the first-fit search starts; lowered when a count drops to zero. */
  private freeIndex = 0;
  /** Cluster ranges taken by refcount structures during the current allocation step. */
  private claimed: [number, number][] = [];
  /** Clean blocks kept in memory beyond the dirty ones. */
  private readonly cacheLimit: number;
  /** Called whenever a cluster becomes metadata or stops being metadata (for the overlap guard). */
  onBlockAdded: ((offset: number) => void) | undefined;
  /** Called when the refcount table moves (the overlap guard must forget the old place). */
  onTableMoved: ((oldOffset: number, oldClusters: number) => void) | undefined;
  /** Called before a refcount block or table entry is written, to refuse a place other metadata holds. */
  beforeWrite: ((offset: number, length: number, kind: 'refcount block' | 'refcount table') => Promise<void>) | undefined;

  constructor(
    readonly store: ByteStore,
    readonly header: Qcow2Header,
    table: number[],
    private readonly host: RefcountHost,
  ) {
    this.clusterSize = 2 ** header.clusterBits;
    this.order = header.refcountOrder;
    this.blockEntries = (this.clusterSize * 8) >>> this.order;
    this.max = maxRefcount(this.order);
    this.table = table;
    this.cacheLimit = Math.max(16, Math.floor((4 * 1024 * 1024) / this.clusterSize));
  }

  static async load(store: ByteStore, header: Qcow2Header, host: RefcountHost): Promise<Refcounts> {
    const bytes = await readExact(store, header.refcountTableOffset, header.refcountTableClusters * 2 ** header.clusterBits, 'refcount table');
    const table: number[] = new Array(bytes.length / 8);
    for (let i = 0; i < table.length; i++) table[i] = decodeTableEntry(bytes, i);
    return new Refcounts(store, header, table, host);
  }

  /** Entries the on-disk table has room for. */
  get tableCapacity(): number {
    return (this.header.refcountTableClusters * this.clusterSize) / 8;
  }

  get hasDirty(): boolean {
    return this.dirtyBlocks.size > 0 || this.dirtyTable.size > 0;
  }

  get dirtyCount(): number {
    return this.dirtyBlocks.size;
  }

  private async block(tableIndex: number): Promise<Uint8Array | undefined> {
    const offset = this.table[tableIndex] ?? 0;
    if (offset === 0) return undefined;
    let block = this.blocks.get(offset);
    if (block) return block;
    const fileSize = await this.store.size();
    if (offset + this.clusterSize > fileSize) {
      throw new CorruptImageError(this.store.name, `refcount block ${hex(offset)} (refcount table index ${tableIndex}) lies outside the file`, offset);
    }
    block = await readExact(this.store, offset, this.clusterSize, 'refcount block');
    this.remember(offset, block);
    return block;
  }

  private remember(offset: number, block: Uint8Array): void {
    this.blocks.set(offset, block);
    if (this.blocks.size > this.cacheLimit + this.dirtyBlocks.size) {
      for (const key of this.blocks.keys()) {
        if (this.blocks.size <= this.cacheLimit + this.dirtyBlocks.size) break;
        if (!this.dirtyBlocks.has(key)) this.blocks.delete(key);
      }
    }
  }

  async get(cluster: number): Promise<number> {
    const block = await this.block(Math.floor(cluster / this.blockEntries));
    return block ? getRefcount(block, cluster % this.blockEntries, this.order) : 0;
  }

  /** Adds `delta` to the count of `cluster`, creating its refcount block when needed. Returns the new count. */
  async change(cluster: number, delta: number): Promise<number> {
    const tableIndex = Math.floor(cluster / this.blockEntries);
    await this.ensureBlock(tableIndex);
    const offset = this.table[tableIndex]!;
    const block = (await this.block(tableIndex))!;
    const index = cluster % this.blockEntries;
    const value = getRefcount(block, index, this.order) + delta;
    if (value < 0) throw new CorruptImageError(this.store.name, `refcount of cluster ${cluster} (host offset ${hex(cluster * this.clusterSize)}) would drop below zero`, cluster * this.clusterSize);
    if (value > this.max) throw new FormatError(this.store.name, `refcount of cluster ${cluster} would exceed ${this.max}, the largest ${1 << this.order}-bit refcount`, { field: 'refcount_order', value: this.order });
    setRefcount(block, index, this.order, value);
    this.dirtyBlocks.add(offset);
    if (value === 0 && cluster < this.freeIndex) this.freeIndex = cluster;
    return value;
  }

  /** First-fit search for `count` free clusters from the hint, advancing it past what was found. */
  private async findFree(count: number): Promise<number> {
    let start = this.freeIndex;
    let run = 0;
    while (run < count) {
      const cluster = start + run;
      if ((await this.get(cluster)) !== 0) {
        start = cluster + 1;
        run = 0;
      } else {
        run++;
      }
    }
    this.freeIndex = start + count;
    return start;
  }

  /**
   * Allocates `count` contiguous clusters (refcount 1) and returns the host offset of the first. Refcount blocks
   * created on the way may land where the search had looked, so the search restarts after creating any (as
   * QEMU's does), which keeps file sizes equal to qemu-img's.
   */
  async allocate(count: number): Promise<number> {
    for (;;) {
      const start = await this.findFree(count);
      const first = Math.floor(start / this.blockEntries);
      const last = Math.floor((start + count - 1) / this.blockEntries);
      // Blocks are created one at a time; a new block (or grown table) that lands inside the range sends the
      // search back to the start (QEMU's -EAGAIN). Blocks are placed past the range the search found, which keeps
      // large allocations (an L1 table) contiguous and file sizes equal to qemu-img's.
      let restart = false;
      for (let t = first; t <= last && !restart; t++) {
        this.claimed = [];
        if (!(await this.ensureBlock(t))) continue;
        // A grown table frees the old one, which lowers the search start: search again too, as QEMU would.
        restart = this.freeIndex < start || this.claimed.some(([from, to]) => from < start + count && to > start);
      }
      if (restart) {
        this.freeIndex = Math.min(this.freeIndex, start);
        continue;
      }
      // A block created while looking may sit inside the range: check the range again before claiming it.
      let busy = false;
      for (let c = start; c < start + count && !busy; c++) if ((await this.get(c)) !== 0) busy = true;
      if (busy) continue;
      for (let c = start; c < start + count; c++) await this.change(c, 1);
      return start * this.clusterSize;
    }
  }

  /**
   * Makes sure refcount block `tableIndex` exists. Returns true when it had to create one (or grow the table).
   * A new block is placed at the first free cluster; when it falls inside its own range it describes itself,
   * otherwise its count is recorded in the block that covers it (which may be created in turn).
   */
  private async ensureBlock(tableIndex: number): Promise<boolean> {
    if ((this.table[tableIndex] ?? 0) !== 0) return false;
    const cluster = await this.findFree(1);
    this.claimed.push([cluster, cluster + 1]);
    const ownIndex = Math.floor(cluster / this.blockEntries);
    const block = new Uint8Array(this.clusterSize);
    const offset = cluster * this.clusterSize;
    if (ownIndex === tableIndex) {
      setRefcount(block, cluster % this.blockEntries, this.order, 1);
      this.blocks.set(offset, block);
      this.dirtyBlocks.add(offset);
      this.setTableEntry(tableIndex, offset);
    } else {
      await this.change(cluster, 1);
      this.blocks.set(offset, block);
      this.dirtyBlocks.add(offset);
      this.setTableEntry(tableIndex, offset);
    }
    this.onBlockAdded?.(offset);
    if (tableIndex >= this.tableCapacity) await this.growTable(tableIndex, cluster);
    return true;
  }

  private setTableEntry(index: number, offset: number): void {
    while (this.table.length <= index) this.table.push(0);
    this.table[index] = offset;
    if (index < this.tableCapacity) this.dirtyTable.add(index);
  }

  /**
   * The table has no room for entry `tableIndex`: build a new, larger table together with refcount blocks that
   * describe it (and themselves) in an area that starts past everything the current blocks cover, write it all,
   * switch the header to it, then free the old table. Until the header switch the old table stays valid, so a
   * crash in between only leaks the new area.
   */
  private async growTable(tableIndex: number, newBlockCluster: number): Promise<void> {
    const e = this.blockEntries;
    const areaStart = Math.max(tableIndex + 1, Math.floor(newBlockCluster / e) + 1) * e;
    const firstAreaBlock = areaStart / e;
    // Find the smallest self-covering area: blocks for [firstAreaBlock, total) plus a table with 50 % spare entries.
    let total = firstAreaBlock + 1;
    let tableClusters = 0;
    let tableEntries = 0;
    for (;;) {
      tableEntries = Math.ceil((total + Math.ceil(total / 2)) / (this.clusterSize / 8)) * (this.clusterSize / 8);
      tableClusters = (tableEntries * 8) / this.clusterSize;
      const areaClusters = total - firstAreaBlock + tableClusters;
      const needed = Math.ceil((areaStart + areaClusters) / e);
      if (needed <= total) break;
      total = needed;
    }
    if (tableEntries * 8 > MAX_REFTABLE_BYTES) {
      throw new FormatError(this.store.name, `the refcount table would exceed QEMU's limit of 8 MiB`, { field: 'refcount_table_clusters' });
    }
    const blockCount = total - firstAreaBlock;
    this.claimed.push([areaStart, areaStart + blockCount + tableClusters]);
    const tableOffset = (areaStart + blockCount) * this.clusterSize;
    for (let i = 0; i < blockCount; i++) {
      const offset = (areaStart + i) * this.clusterSize;
      const block = new Uint8Array(this.clusterSize);
      this.blocks.set(offset, block);
      this.dirtyBlocks.add(offset);
      while (this.table.length <= firstAreaBlock + i) this.table.push(0);
      this.table[firstAreaBlock + i] = offset;
      this.onBlockAdded?.(offset);
    }
    for (let c = areaStart; c < areaStart + blockCount + tableClusters; c++) {
      const block = this.blocks.get(this.table[Math.floor(c / e)]!)!;
      setRefcount(block, c % e, this.order, 1);
    }
    const oldOffset = this.header.refcountTableOffset;
    const oldClusters = this.header.refcountTableClusters;
    while (this.table.length < tableEntries) this.table.push(0);
    // Blocks first, then the table that points at them, then the header that points at the table.
    await this.writeBlocks();
    await this.store.flush();
    await this.store.write(tableOffset, encodeTable(this.table, tableEntries));
    await this.store.flush();
    this.header.refcountTableOffset = tableOffset;
    this.header.refcountTableClusters = tableClusters;
    this.dirtyTable.clear();
    await this.host.writeHeader();
    await this.store.flush();
    this.onTableMoved?.(oldOffset, oldClusters);
    for (let i = 0; i < oldClusters; i++) await this.change(oldOffset / this.clusterSize + i, -1);
  }

  private async writeBlocks(): Promise<void> {
    const offsets = [...this.dirtyBlocks].sort((a, b) => a - b);
    for (const offset of offsets) {
      await this.beforeWrite?.(offset, this.clusterSize, 'refcount block');
      await this.store.write(offset, this.blocks.get(offset)!);
      // Clean only once written: a failed write leaves the rest dirty, as they are.
      this.dirtyBlocks.delete(offset);
    }
  }

  /**
   * Writes dirty refcount blocks, then (after a flush, so a table entry never points at an unwritten block) the
   * dirty table entries. The caller flushes afterwards before writing anything that relies on these counts.
   */
  async writeBack(): Promise<void> {
    if (this.dirtyBlocks.size) await this.writeBlocks();
    if (this.dirtyTable.size) {
      await this.store.flush();
      const indices = [...this.dirtyTable].sort((a, b) => a - b);
      for (const index of indices) {
        const entry = new Uint8Array(8);
        putU64(entry, 0, this.table[index]!);
        await this.beforeWrite?.(this.header.refcountTableOffset + index * 8, 8, 'refcount table');
        await this.store.write(this.header.refcountTableOffset + index * 8, entry);
        this.dirtyTable.delete(index);
      }
    }
  }

  /**
   * Takes refcount blocks that count nothing but themselves out of the table, as QEMU does after shrinking an
   * image (qcow2_shrink_reftable), so the file can be truncated behind them. Every block is judged on the counts
   * as they are before any is dropped; the table entries go (durably) before the blocks' own counts are
   * released. Returns the dropped blocks' offsets.
   */
  async dropUnusedBlocks(): Promise<number[]> {
    const cs = this.clusterSize;
    const unused: number[] = [];
    for (let t = 0; t < this.table.length; t++) {
      const offset = this.table[t]!;
      if (!offset) continue;
      const block = (await this.block(t))!;
      const own = offset / cs;
      const selfIndex = Math.floor(own / this.blockEntries) === t ? own % this.blockEntries : -1;
      let empty = true;
      for (let i = 0; i < this.blockEntries && empty; i++) if (i !== selfIndex && getRefcount(block, i, this.order) !== 0) empty = false;
      if (empty) unused.push(t);
    }
    if (!unused.length) return [];
    const offsets = unused.map((t) => this.table[t]!);
    for (const t of unused) {
      const offset = this.table[t]!;
      this.setTableEntry(t, 0);
      this.blocks.delete(offset);
      this.dirtyBlocks.delete(offset);
    }
    await this.writeBack();
    await this.store.flush();
    const gone = new Set(unused);
    for (const offset of offsets) {
      const describedBy = Math.floor(offset / cs / this.blockEntries);
      // A block counted by itself took its count with it; one counted by a remaining block is released there.
      if (!gone.has(describedBy) && this.table[describedBy]) await this.change(offset / cs, -1);
    }
    await this.writeBack();
    return offsets;
  }

  /** Offsets of all refcount blocks (for the overlap guard). */
  blockOffsets(): number[] {
    return this.table.filter((offset) => offset !== 0);
  }

  /** Highest cluster index with a non-zero refcount + 1 (the end of the used area). */
  async usedEnd(): Promise<number> {
    for (let t = this.table.length - 1; t >= 0; t--) {
      const block = await this.block(t);
      if (!block) continue;
      for (let i = this.blockEntries - 1; i >= 0; i--) if (getRefcount(block, i, this.order) !== 0) return t * this.blockEntries + i + 1;
    }
    return 0;
  }
}

function decodeTableEntry(bytes: Uint8Array, index: number): number {
  return u32(bytes, index * 8) * TWO_32 + ((u32(bytes, index * 8 + 4) & REFT_OFFSET_LO_MASK) >>> 0);
}

export function encodeTable(table: number[], entries: number): Uint8Array {
  const out = new Uint8Array(entries * 8);
  for (let i = 0; i < Math.min(entries, table.length); i++) putU64(out, i * 8, table[i]!);
  return out;
}

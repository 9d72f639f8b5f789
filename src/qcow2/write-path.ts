/**
 * The write side of an open qcow2 image: cluster allocation, copy-on-write, zero writes, discard and compressed
 * clusters, with L2 and refcount updates batched in memory and written back in a crash-safe order.
 *
 * Ordering (without lazy refcounts), the rule everything here follows:
 *   1. Guest data (including copied-on-write head/tail bytes) is written to its new host cluster at once.
 *   2. writeBack(): refcount blocks (increments) are written and FLUSHED before any L2 table that points at the
 *      clusters they count; L2 tables are written and FLUSHED before L1 entries that point at new L2 tables; and
 *      clusters given up (overwritten compressed/shared clusters, discards) are only decremented after the L2
 *      tables that stopped using them are durable. Until then they stay counted, so they can never be handed out
 *      again while an on-disk table still points at them.
 * A crash at any instant therefore leaves at worst leaked clusters (refcount above the number of references).
 */
import type { ByteStore } from './store.js';
import { CorruptImageError, FormatError, ReadOnlyError } from './errors.js';
import { hex, putU32, u32 } from './bytes.js';
import { SUBCLUSTERS, decodeCompressed, isCompressed, isCopied, readL2Entry, standardHostOffset, type L2Entry } from './mapping.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, AUTOCLEAR_BITMAPS, KNOWN_AUTOCLEAR, encodeHeader, MAX_L1_BYTES } from './header.js';
import { Refcounts } from './refcount.js';
import { referenceBitmaps, type CheckResult } from './check.js';
import { MetadataMap, type MetadataKind } from './overlap.js';
import { snapshotTableBytes } from './snapshots.js';
import type { Qcow2Image } from './image.js';
import { SECTOR_SIZE } from './sector-cipher.js';

const TWO_32 = 2 ** 32;
const COPIED = 0x80000000;
const ALL_SUBCLUSTERS = 0xffffffff;
/** Dirty tables kept in memory before an internal write-back (bounds memory, keeps flush latency sane). */
const MAX_DIRTY_TABLES = 256;
const MAX_PENDING_FREES = 8192;
/** More than any LUKS1 area (8 slots of 4000 stripes of a 64-byte key, plus the header). */
const MAX_LUKS_AREA = 4 * 1024 * 1024;

export interface ZeroOptions {
  /** Give the host clusters back (QEMU's write -z -u); otherwise keep them allocated where possible. */
  unmap?: boolean;
}

/** What to give back once the tables that stopped using it are durable. */
type PendingFree = { offset: number; length: number };

export class WriteEngine {
  readonly clusterSize: number;
  readonly metadata: MetadataMap;
  private readonly dirtyL2 = new Map<number, Uint8Array>();
  private readonly dirtyL1 = new Set<number>();
  private pendingFrees: PendingFree[] = [];
  private started = false;
  private corrupt = false;
  /** Where the next compressed cluster may start (byte-packed, as QEMU packs them); see compressed-write.ts. */
  compressedCursor = 0;
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(
    readonly image: Qcow2Image,
    public refcounts: Refcounts,
  ) {
    this.clusterSize = image.clusterSize;
    this.metadata = new MetadataMap(this.clusterSize);
  }

  static async create(image: Qcow2Image): Promise<WriteEngine> {
    const engine: WriteEngine = new WriteEngine(image, await Refcounts.load(image.store, image.header, { writeHeader: () => engine.writeHeader() }));
    engine.hookRefcounts();
    engine.rebuildMetadataMap();
    return engine;
  }

  /** Keeps the overlap guard in step with refcount blocks being added and the refcount table moving. */
  hookRefcounts(): void {
    this.refcounts.onBlockAdded = (offset) => this.metadata.addRange(offset, this.clusterSize, 'refcount block');
    this.refcounts.beforeWrite = (offset, length, kind) => this.guardMetadata(offset, length, kind);
    this.refcounts.onTableMoved = (oldOffset, oldClusters) => {
      this.metadata.removeRange(oldOffset, oldClusters * this.clusterSize);
      this.metadata.addRange(this.header.refcountTableOffset, this.header.refcountTableClusters * this.clusterSize, 'refcount table');
    };
  }

  /** Rereads the refcount table after it was replaced wholesale (repair.ts). */
  async reloadRefcounts(): Promise<void> {
    this.refcounts = await Refcounts.load(this.image.store, this.image.header, { writeHeader: () => this.writeHeader() });
    this.hookRefcounts();
    this.rebuildMetadataMap();
  }

  get store(): ByteStore {
    return this.image.store;
  }

  get header() {
    return this.image.header;
  }

  /** Runs operations one at a time: tables are shared mutable state. */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.queue.then(fn, fn);
    this.queue = next.catch(() => {});
    return next;
  }

  rebuildMetadataMap(): void {
    const h = this.header;
    const m = this.metadata;
    m.clear();
    m.addRange(0, this.clusterSize, 'header');
    m.addRange(h.l1TableOffset, h.l1Size * 8, 'active L1 table');
    m.addRange(h.refcountTableOffset, h.refcountTableClusters * this.clusterSize, 'refcount table');
    for (const offset of this.refcounts.blockOffsets()) m.addRange(offset, this.clusterSize, 'refcount block');
    if (h.nbSnapshots) m.addRange(h.snapshotsOffset, snapshotTableBytes(this.image.snapshots), 'snapshot table');
    // A damaged entry (oversized, or past 2^53) guards nothing real; QEMU refuses to use such a snapshot anyway.
    m.addRanges(this.image.snapshots.filter((s) => s.l1Size <= MAX_L1_BYTES / 8 && s.l1TableOffsetExact === undefined).map((s) => ({ offset: s.l1TableOffset, length: s.l1Size * 8, kind: 'inactive L1 table' as const })));
    if (h.bitmaps) m.addRange(h.bitmaps.directoryOffset, h.bitmaps.directorySize, 'bitmap directory');
    // The LUKS area (about 2 MiB; a damaged length is not followed further than the header could need).
    if (h.cryptMethod === 2 && h.fde && h.fde.length > 0) m.addRange(h.fde.offset, Math.min(h.fde.length, MAX_LUKS_AREA), 'encryption header');
    m.addL2Tables(this.image.l1Table);
  }

  async writeHeader(): Promise<void> {
    await this.store.write(0, encodeHeader(this.header));
  }

  /** First modification: refuse a corrupt image, clear autoclear bits we do not maintain, mark lazy images dirty. */
  async begin(): Promise<void> {
    if (this.corrupt || this.image.isCorrupt) throw new ReadOnlyError(this.image.name, 'image is marked corrupt; repair it with check -r all');
    if (this.started) return;
    const h = this.header;
    let changed = false;
    let clear = h.autoclearFeatures & ~KNOWN_AUTOCLEAR;
    // Persistent bitmaps are not updated here, so they stop being valid. Once bit 0 is clear QEMU ignores the
    // extension and would count its clusters as leaks: the extension goes and its clusters are freed (after the
    // header no longer points at them), which keeps the image clean.
    const stale: { offset: number; length: number }[] = [];
    if (h.bitmaps) {
      clear |= AUTOCLEAR_BITMAPS;
      const sink = { checkErrors: 0 } as CheckResult;
      await referenceBitmaps(this.image, await this.store.size(), (offset, length) => stale.push({ offset, length }), sink);
      h.bitmaps = undefined;
      changed = true;
    }
    if (clear && h.version === 3) {
      h.autoclearFeatures &= ~clear;
      changed = true;
    }
    if (this.image.lazyRefcounts && !(h.incompatibleFeatures & INCOMPAT_DIRTY)) {
      h.incompatibleFeatures |= INCOMPAT_DIRTY;
      changed = true;
    }
    if (changed) {
      await this.writeHeader();
      await this.store.flush();
    }
    for (const { offset, length } of stale) this.freeLater(offset, length);
    if (stale.length) this.rebuildMetadataMap();
    this.started = true;
  }

  // ---- table access ----------------------------------------------------------------------------------------

  /** An L2 table that is being (or has been) modified and not yet written; the read path looks here first. */
  pendingL2(offset: number): Uint8Array | undefined {
    return this.dirtyL2.get(offset);
  }

  async loadL2(offset: number): Promise<Uint8Array> {
    return this.dirtyL2.get(offset) ?? this.image.loadL2(offset);
  }

  /** The L2 table for `l1Index`, private to the active image (allocated or copied from a snapshot if needed). */
  async l2ForWrite(l1Index: number): Promise<{ offset: number; table: Uint8Array }> {
    const l1 = this.image.l1Table;
    if (l1Index * 8 >= l1.length) throw new FormatError(this.image.name, `guest offset beyond the L1 table (index ${l1Index})`, { field: 'l1_size' });
    const hi = u32(l1, l1Index * 8);
    const lo = u32(l1, l1Index * 8 + 4);
    const current = (hi & 0x00ffffff) * TWO_32 + ((lo & 0xfffffe00) >>> 0);
    if (current !== 0 && hi & COPIED) {
      const table = await this.loadL2(current);
      return { offset: current, table };
    }
    const offset = await this.allocateMetadata(1, 'active L2 table');
    let table: Uint8Array;
    if (current === 0) {
      table = new Uint8Array(this.clusterSize);
    } else {
      // Shared with a snapshot: the copy becomes ours; the data clusters keep their counts (still reached twice).
      table = (await this.loadL2(current)).slice();
      this.freeLater(current, this.clusterSize);
      this.metadata.removeRange(current, this.clusterSize);
    }
    this.metadata.addRange(offset, this.clusterSize, 'active L2 table');
    this.dirtyL2.set(offset, table);
    this.setL1(l1Index, offset);
    return { offset, table };
  }

  private setL1(index: number, l2Offset: number): void {
    const l1 = this.image.l1Table;
    putU32(l1, index * 8, l2Offset === 0 ? 0 : (Math.floor(l2Offset / TWO_32) | COPIED) >>> 0);
    putU32(l1, index * 8 + 4, l2Offset % TWO_32);
    this.dirtyL1.add(index);
  }

  markL1Dirty(index: number): void {
    this.dirtyL1.add(index);
  }

  /** Drops the mapping of whole clusters in a range (VM state the active image no longer needs). */
  async unmapRange(offset: number, length: number): Promise<void> {
    const cs = this.clusterSize;
    const { l2Entries, l2EntryBytes } = this.image.geometry;
    for (let cluster = Math.floor(offset / cs); cluster < Math.ceil((offset + length) / cs); cluster++) {
      const { offset: l2Offset, table } = await this.l2ForWrite(Math.floor(cluster / l2Entries));
      const l2Index = cluster % l2Entries;
      this.freeEntry(readL2Entry(table, l2Index, this.image.geometry));
      table.fill(0, l2Index * l2EntryBytes, (l2Index + 1) * l2EntryBytes);
      this.markDirty(l2Offset, table);
    }
  }

  markDirty(offset: number, table: Uint8Array): void {
    this.dirtyL2.set(offset, table);
  }

  /** Allocates clusters for metadata, refusing space that already holds metadata (a refcount lie). */
  async allocateMetadata(count: number, what: string): Promise<number> {
    const offset = await this.refcounts.allocate(count);
    await this.guard(offset, count * this.clusterSize, what);
    return offset;
  }

  /**
   * Refuses a write into metadata. Everything acknowledged so far is written back first, then the image is
   * marked corrupt (incompatible bit 1) and the I/O fails, as QEMU does.
   */
  async guard(hostOffset: number, length: number, what: string): Promise<void> {
    if (this.image.dataStore && what === 'data') return;
    const hit = this.metadata.overlap(hostOffset, length);
    if (!hit) return;
    this.corrupt = true;
    try {
      await this.writeBack();
    } finally {
      await this.markCorrupt();
    }
    throw this.overlapError(what, hostOffset, length, hit);
  }

  /**
   * The same guard for a metadata structure about to be written where it belongs (`kind` may be there): another
   * kind there means the tables contradict each other. The image is marked corrupt before the write fails; what
   * was being written back stays unwritten (it would have overwritten the other structure).
   */
  async guardMetadata(hostOffset: number, length: number, kind: MetadataKind): Promise<void> {
    const hit = this.metadata.overlap(hostOffset, length, kind);
    if (!hit) return;
    this.corrupt = true;
    await this.markCorrupt();
    throw this.overlapError(kind, hostOffset, length, hit);
  }

  private overlapError(what: string, hostOffset: number, length: number, hit: { kind: string; offset: number }): CorruptImageError {
    return new CorruptImageError(this.image.name, `Marking image as corrupt: preventing ${what} write at ${hex(hostOffset)} (${length} bytes) that would overwrite the ${hit.kind} at ${hex(hit.offset)}`, hostOffset);
  }

  /** Sets the corrupt bit on disk (QEMU's qcow2_signal_corruption): the image opens read-only until repaired. */
  private async markCorrupt(): Promise<void> {
    this.header.incompatibleFeatures |= INCOMPAT_CORRUPT;
    await this.writeHeader();
    await this.store.flush();
  }

  freeLater(offset: number, length: number): void {
    if (length > 0) this.pendingFrees.push({ offset, length });
  }

  /** Gives back what an L2 entry referenced (after the next write-back). External data is not refcounted. */
  freeEntry(entry: L2Entry): void {
    if (isCompressed(entry)) {
      const { hostOffset, compressedLength } = decodeCompressed(entry, this.header.clusterBits);
      this.freeLater(hostOffset, compressedLength);
      return;
    }
    if (this.image.dataStore) return;
    const host = standardHostOffset(entry);
    if (host !== 0) this.freeLater(host, this.clusterSize);
  }

  // ---- write-back ------------------------------------------------------------------------------------------

  get hasPending(): boolean {
    return this.dirtyL2.size > 0 || this.dirtyL1.size > 0 || this.pendingFrees.length > 0 || this.refcounts.hasDirty;
  }

  async maybeWriteBack(): Promise<void> {
    if (this.dirtyL2.size > MAX_DIRTY_TABLES || this.refcounts.dirtyCount > MAX_DIRTY_TABLES || this.pendingFrees.length > MAX_PENDING_FREES) await this.writeBack();
  }

  /** Writes every in-memory update in the crash-safe order described at the top of this file. */
  async writeBack(): Promise<void> {
    if (!this.hasPending) return;
    const lazy = this.image.lazyRefcounts;
    // FLUSH POINT 1: new data and new refcounts are durable before any table points at them.
    await this.refcounts.writeBack();
    if (this.image.dataStore) await this.image.dataStore.flush();
    if (!lazy || this.dirtyL1.size) await this.store.flush();
    const tables = [...this.dirtyL2].sort((a, b) => a[0] - b[0]);
    for (const [offset, table] of tables) {
      await this.guardMetadata(offset, this.clusterSize, 'active L2 table');
      await this.store.write(offset, table);
      this.image.l2Cache.put(offset, table);
    }
    this.dirtyL2.clear();
    if (this.dirtyL1.size) {
      // FLUSH POINT 2: new L2 tables are durable before the L1 entries that point at them.
      await this.store.flush();
      await this.writeL1Entries();
    }
    if (this.pendingFrees.length) {
      // FLUSH POINT 3: tables that stopped using clusters are durable before those clusters can be reused.
      await this.store.flush();
      const frees = this.pendingFrees;
      this.pendingFrees = [];
      for (const { offset, length } of frees) {
        const first = Math.floor(offset / this.clusterSize);
        const last = Math.floor((offset + length - 1) / this.clusterSize);
        for (let c = first; c <= last; c++) await this.refcounts.change(c, -1);
      }
      await this.refcounts.writeBack();
    }
    await this.store.flush();
  }

  private async writeL1Entries(): Promise<void> {
    const l1 = this.image.l1Table;
    const indices = [...this.dirtyL1].sort((a, b) => a - b);
    // Contiguous runs of entries go out as one write.
    for (let i = 0; i < indices.length; ) {
      let j = i;
      while (j + 1 < indices.length && indices[j + 1] === indices[j]! + 1) j++;
      const from = indices[i]!;
      const to = indices[j]! + 1;
      await this.guardMetadata(this.header.l1TableOffset + from * 8, (to - from) * 8, 'active L1 table');
      await this.store.write(this.header.l1TableOffset + from * 8, l1.slice(from * 8, to * 8));
      // Clean only once written: a failed write leaves them dirty, as they are.
      for (let k = from; k < to; k++) this.dirtyL1.delete(k);
      i = j + 1;
    }
  }

  /**
   * Makes everything durable; with lazy refcounts the dirty bit stays set until close. Data written in place
   * changes no table, so the files are flushed even when no table is pending.
   */
  async flush(): Promise<void> {
    if (this.hasPending) await this.writeBack();
    else await this.store.flush();
    if (this.image.dataStore) await this.image.dataStore.flush();
  }

  async close(): Promise<void> {
    // After a failed write or flush nothing more is written (fail-stop.ts): the tables on disk were written in
    // the crash-safe order, so the image is as a crash at that moment would have left it.
    // Nor into an image found corrupt: it stays as it was when that was found (QEMU makes it read-only).
    if (this.image.writeFailure !== undefined || this.corrupt) return;
    await this.writeBack();
    if (this.started && this.image.lazyRefcounts && this.header.incompatibleFeatures & INCOMPAT_DIRTY && !this.corrupt) {
      // Refcounts are complete and durable: the image no longer needs a rebuild on the next open.
      this.header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
      await this.writeHeader();
      await this.store.flush();
    }
  }

  // ---- guest writes ----------------------------------------------------------------------------------------

  /** Guest bytes [offset, offset+data.length) of cluster `cluster`'s old contents (this layer, then backing). */
  private async oldContents(guestOffset: number, length: number): Promise<Uint8Array> {
    const size = this.image.virtualSize;
    const out = new Uint8Array(length);
    const readable = Math.max(0, Math.min(length, size - guestOffset));
    if (readable > 0) out.set(await this.image.readThrough(guestOffset, readable, this.image.l1Table, this.image.backing), 0);
    return out;
  }

  /**
   * Writes guest data bytes at `hostOffset` of the data store (the image file, or its external data file),
   * encrypted when the image is: IVs from the host offset for LUKS, the guest offset for legacy AES.
   */
  async writeData(hostOffset: number, guestOffset: number, data: Uint8Array): Promise<void> {
    const store = this.image.dataStore ?? this.store;
    const encryption = this.image.encryption;
    if (!encryption) return store.write(hostOffset, data);
    await store.write(hostOffset, await encryption.encrypt(data, encryption.keyedByHost ? hostOffset : guestOffset));
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.begin();
    // Encryption works on whole 512-byte sectors: a write that starts or ends inside one takes the rest of the
    // sector from what the guest reads there now.
    if (this.image.encryption && (offset % SECTOR_SIZE !== 0 || data.length % SECTOR_SIZE !== 0)) {
      const start = offset - (offset % SECTOR_SIZE);
      const end = Math.ceil((offset + data.length) / SECTOR_SIZE) * SECTOR_SIZE;
      const whole = await this.oldContents(start, end - start);
      whole.set(data, offset - start);
      offset = start;
      data = whole;
    }
    const cs = this.clusterSize;
    const { l2Entries, extendedL2 } = this.image.geometry;
    const external = this.image.dataStore !== undefined;
    let pos = 0;
    // Clusters needing a new host cluster are gathered into runs that get one contiguous allocation and one write.
    let run: { cluster: number; from: number; to: number; dataPos: number; entry: L2Entry; table: Uint8Array; l2Offset: number; l2Index: number }[] = [];
    const flushRun = async () => {
      if (run.length) await this.allocateRun(run, data);
      run = [];
    };
    while (pos < data.length) {
      const guest = offset + pos;
      const cluster = Math.floor(guest / cs);
      const from = guest - cluster * cs;
      const to = Math.min(cs, from + data.length - pos);
      const l1Index = Math.floor(cluster / l2Entries);
      const l2Index = cluster % l2Entries;
      // A run ends at an L2 table boundary, so each new L2 table is allocated right before its data (QEMU's
      // order): with small clusters the file then grows exactly as qemu-img's does.
      if (run.length && l2Index === 0) await flushRun();
      const { offset: l2Offset, table } = await this.l2ForWrite(l1Index);
      const entry = readL2Entry(table, l2Index, this.image.geometry);
      const host = standardHostOffset(entry);
      const hasHost = host !== 0 || (external && isCopied(entry));
      const zeroFlag = !extendedL2 && (entry.lo & 1) !== 0;
      const inPlace = !isCompressed(entry) && hasHost && isCopied(entry) && !zeroFlag;
      if (inPlace) {
        await flushRun();
        await this.writeInPlace(cluster, from, to, data.subarray(pos, pos + to - from), host, entry, table, l2Offset, l2Index);
      } else {
        const last = run[run.length - 1];
        if (last && (last.cluster !== cluster - 1 || last.to !== cs || from !== 0 || run.length >= 2048)) await flushRun();
        run.push({ cluster, from, to, dataPos: pos, entry, table, l2Offset, l2Index });
      }
      pos += to - from;
    }
    await flushRun();
    await this.maybeWriteBack();
  }

  /** Writes into a host cluster the active image owns; extended L2 subclusters gain their allocated bits. */
  private async writeInPlace(cluster: number, from: number, to: number, bytes: Uint8Array, host: number, entry: L2Entry, table: Uint8Array, l2Offset: number, l2Index: number): Promise<void> {
    const cs = this.clusterSize;
    if (!this.image.geometry.extendedL2) {
      await this.guard(host + from, to - from, 'data');
      await this.writeData(host + from, cluster * cs + from, bytes);
      return;
    }
    const sub = cs / SUBCLUSTERS;
    const firstSub = Math.floor(from / sub);
    const lastSub = Math.floor((to - 1) / sub);
    // A subcluster that was not allocated gets its untouched bytes copied from what it read as before.
    let start = from;
    let end = to;
    if (!(entry.allocMask & (1 << firstSub))) start = firstSub * sub;
    if (!(entry.allocMask & (1 << lastSub))) end = (lastSub + 1) * sub;
    let buffer = bytes;
    if (start !== from || end !== to) {
      buffer = await this.oldContents(cluster * cs + start, end - start);
      buffer.set(bytes, from - start);
    }
    await this.guard(host + start, end - start, 'data');
    await this.writeData(host + start, cluster * cs + start, buffer);
    let mask = 0;
    for (let s = firstSub; s <= lastSub; s++) mask |= 1 << s;
    if ((entry.allocMask & mask) !== mask >>> 0 || entry.zeroMask & mask) {
      const at = l2Index * 16;
      putU32(table, at + 8, (entry.zeroMask & ~mask) >>> 0);
      putU32(table, at + 12, (entry.allocMask | mask) >>> 0);
      this.markDirty(l2Offset, table);
    }
  }

  /**
   * Gives each cluster of the run a new host cluster (contiguous, first-fit), fills the parts the write does not
   * cover with the cluster's old contents, writes the whole run at once, then points the L2 entries at it.
   */
  private async allocateRun(run: { cluster: number; from: number; to: number; dataPos: number; entry: L2Entry; table: Uint8Array; l2Offset: number; l2Index: number }[], data: Uint8Array): Promise<void> {
    const cs = this.clusterSize;
    const extendedL2 = this.image.geometry.extendedL2;
    const external = this.image.dataStore !== undefined;
    const first = run[0]!;
    const count = run.length;
    const host = external ? first.cluster * cs : await this.refcounts.allocate(count);
    const last = run[count - 1]!;
    let buffer: Uint8Array;
    if (first.from === 0 && last.to === cs) {
      // Whole clusters only (the common case for large writes): the caller's bytes go out as they are.
      buffer = data.subarray(first.dataPos, last.dataPos + cs);
    } else {
      buffer = new Uint8Array(count * cs);
      for (let i = 0; i < count; i++) {
        const piece = run[i]!;
        if (piece.from !== 0 || piece.to !== cs) buffer.set(await this.oldContents(piece.cluster * cs, cs), i * cs);
        buffer.set(data.subarray(piece.dataPos, piece.dataPos + piece.to - piece.from), i * cs + piece.from);
      }
    }
    await this.guard(host, count * cs, 'data');
    await this.writeData(host, first.cluster * cs, buffer);
    const sub = cs / SUBCLUSTERS;
    for (let i = 0; i < count; i++) {
      const piece = run[i]!;
      const entry = piece.entry;
      const newHost = host + i * cs;
      const at = piece.l2Index * (extendedL2 ? 16 : 8);
      putU32(piece.table, at, (Math.floor(newHost / TWO_32) | COPIED) >>> 0);
      putU32(piece.table, at + 4, newHost % TWO_32);
      if (extendedL2) {
        let touched = 0;
        for (let s = Math.floor(piece.from / sub); s <= Math.floor((piece.to - 1) / sub); s++) touched |= 1 << s;
        // Everything the old cluster held as data moves along; zero subclusters stay zero unless written.
        const oldData = isCompressed(entry) ? ALL_SUBCLUSTERS : standardHostOffset(entry) !== 0 || (external && isCopied(entry)) ? entry.allocMask : 0;
        const zero = isCompressed(entry) ? 0 : entry.zeroMask & ~touched;
        putU32(piece.table, at + 8, zero >>> 0);
        putU32(piece.table, at + 12, (oldData | touched) & ~zero);
      }
      if (!external || isCompressed(entry)) this.freeEntry(entry);
      this.markDirty(piece.l2Offset, piece.table);
    }
  }
}

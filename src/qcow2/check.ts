/**
 * Consistency check and repair, with the counts `qemu-img check --output=json` reports.
 *
 * References are recomputed from everything that points at host clusters (header, active and snapshot L1/L2
 * trees including VM state, refcount table and blocks, snapshot table, bitmap directory and tables) and compared
 * with the stored refcounts: stored above computed is a leak, below is a corruption. COPIED flags of the active
 * tree, alignment and reserved bits are checked too. The rules and the wording are qemu-img 7.2's
 * (block/qcow2-refcount.c), so findings on damaged images match line for line. Memory is bounded by the file
 * size: a reference a cluster or more past the end of the file is a finding, never counted.
 */
import { hex, u32 } from './bytes.js';
import { decodeCompressed, isCompressed, isCopied, readL2Entry, standardHostOffset, type Geometry, type L2Entry } from './mapping.js';
import { getRefcount, maxRefcount } from './refcount.js';
import { MAX_L1_BYTES } from './header.js';
import { readExact, readIntoPadded, type ByteStore } from './store.js';
import { snapshotTableBytes, V3_MIN_SNAPSHOT_EXTRA } from './snapshots.js';
import { FormatError } from './errors.js';
import type { Qcow2Image } from './image.js';

const TWO_32 = 2 ** 32;
const NOT_CACHED = Symbol('not cached');
const CHUNK = 65536;
const MAX_MESSAGES = 10000;
/** The end of the byte range QEMU's block layer accepts a request in (INT64_MAX aligned down to 1 GiB). */
const MAX_IO_END = 2n ** 63n - 2n ** 30n;

export interface CheckResult {
  checkErrors: number;
  leaks: number;
  corruptions: number;
  leaksFixed: number;
  corruptionsFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** One line per finding, in QEMU's wording where it has one. */
  messages: string[];
}

export type RepairMode = 'leaks' | 'all';

/** qemu-img check's JSON object (keys with zero counts left out, as qemu-img does). */
export function checkResultJson(result: CheckResult, filename: string): Record<string, unknown> {
  const out: Record<string, unknown> = { 'image-end-offset': result.imageEndOffset, 'total-clusters': result.totalClusters, 'check-errors': result.checkErrors };
  if (result.leaks) out.leaks = result.leaks;
  if (result.leaksFixed) out['leaks-fixed'] = result.leaksFixed;
  if (result.corruptions) out.corruptions = result.corruptions;
  if (result.corruptionsFixed) out['corruptions-fixed'] = result.corruptionsFixed;
  if (result.allocatedClusters) out['allocated-clusters'] = result.allocatedClusters;
  if (result.fragmentedClusters) out['fragmented-clusters'] = result.fragmentedClusters;
  if (result.compressedClusters) out['compressed-clusters'] = result.compressedClusters;
  out.filename = filename;
  out.format = 'qcow2';
  return out;
}

/**
 * Computed reference counts, in chunks allocated only where something points: memory follows what the metadata
 * references, not how large (or sparse) the file claims to be. References past the end of the file are capped.
 */
export class References {
  private readonly chunks = new Map<number, Uint32Array>();
  private maxCluster = -1;
  /** `max` is the largest refcount the image's width can store (qemu-img's in-memory table has that width too). */
  constructor(
    readonly fileClusters: number,
    private readonly max = 0xffffffff,
  ) {}
  /** Counts one reference; false when the count is already at the width's maximum (not counted, as qemu-img). */
  add(cluster: number): boolean {
    const key = Math.floor(cluster / CHUNK);
    let chunk = this.chunks.get(key);
    if (!chunk) {
      chunk = new Uint32Array(CHUNK);
      this.chunks.set(key, chunk);
    }
    const i = cluster % CHUNK;
    if (chunk[i]! >= Math.min(this.max, 0xffffffff)) return false;
    chunk[i] = chunk[i]! + 1;
    if (cluster > this.maxCluster) this.maxCluster = cluster;
    return true;
  }
  get(cluster: number): number {
    return this.chunks.get(Math.floor(cluster / CHUNK))?.[cluster % CHUNK] ?? 0;
  }
  /** True when no cluster in [from, from + CHUNK) was referenced (lets the comparison skip empty ranges). */
  chunkEmpty(from: number): boolean {
    return !this.chunks.has(Math.floor(from / CHUNK));
  }
  /** Clusters to compare: the file, plus anything referenced past its end. */
  get extent(): number {
    return Math.max(this.fileClusters, this.maxCluster + 1);
  }
}

export interface CheckOptions {
  repair?: RepairMode;
  /**
   * Called with every finding as it is made, in qemu-img's order. `messages` keeps only the first ones (a damaged
   * image can yield millions); a caller that wants them all, like the CLI, streams them from here.
   */
  onMessage?: (line: string) => void;
}

/** Reads and compares; with `repair`, fixes refcounts (and COPIED flags for 'all') through the write engine. */
export async function checkImage(image: Qcow2Image, options: CheckOptions = {}): Promise<CheckResult> {
  // What a writer holds in memory is part of the image: check what it would leave on disk.
  if (!image.readOnly) await image.flush();
  const first = await analyse(image, options.onMessage, options.repair);
  if (!options.repair || (first.result.leaks === 0 && first.result.corruptions === 0)) return first.result;
  const { repairRefcounts, repairSnapshotTable } = await import('./repair.js');
  await repairRefcounts(image, first, options.repair);
  // Like qemu-img, entries are completed once the refcounts can be trusted to allocate the new table.
  if (options.repair === 'all' && first.incompleteSnapshots) await repairSnapshotTable(image);
  const second = await analyse(image, options.onMessage);
  second.result.leaksFixed = Math.max(0, first.result.leaks - second.result.leaks);
  second.result.corruptionsFixed = Math.max(0, first.result.corruptions - second.result.corruptions);
  second.result.messages = [...first.result.messages, ...second.result.messages];
  return second.result;
}

export interface Analysis {
  result: CheckResult;
  references: References;
  /** Stored refcount for a cluster, as read. */
  stored: (cluster: number) => number;
  /** Clusters used by the refcount structures themselves (a rebuild replaces them). */
  refcountStructure: Set<number>;
  /** Refcount table entries that cannot be used (unaligned, outside the file): repair must rebuild. */
  brokenTable: boolean;
  /** Version 3 snapshot entries with less than 16 bytes of extra data: repair 'all' rewrites the table. */
  incompleteSnapshots: number;
}

/** `repair` only words the findings as qemu-img does when it is about to fix them. */
export async function analyse(image: Qcow2Image, onMessage?: (line: string) => void, repair?: RepairMode): Promise<Analysis> {
  const store: ByteStore = image.store;
  const header = image.header;
  const cs = image.clusterSize;
  const geometry = image.geometry;
  const fileSize = await store.size();
  const fileClusters = Math.ceil(fileSize / cs);
  const refs = new References(fileClusters, maxRefcount(header.refcountOrder));
  const result: CheckResult = {
    checkErrors: 0,
    leaks: 0,
    corruptions: 0,
    leaksFixed: 0,
    corruptionsFixed: 0,
    imageEndOffset: 0,
    // QEMU keeps the virtual size in whole 512-byte sectors (rounded down) and counts clusters from that.
    totalClusters: Math.ceil((Math.floor(header.size / 512) * 512) / cs),
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    messages: [],
  };
  // Findings are counted without limit but listed up to a bound: a hostile image must not fill memory with text.
  const messages = result.messages;
  const push = messages.push.bind(messages);
  messages.push = (...lines: string[]) => {
    if (onMessage) for (const line of lines) onMessage(line);
    if (messages.length < MAX_MESSAGES) return push(...lines);
    if (messages.length === MAX_MESSAGES) push('(further findings not listed)');
    return messages.length;
  };
  // The snapshot table comes first, as qemu-img reads it before anything else: version 3 entries must carry
  // vm_state_size_large and disk_size. (An entry opening refuses, e.g. over 1 KiB of extra data, never gets here.)
  let incompleteSnapshots = 0;
  if (header.version >= 3) {
    image.snapshots.forEach((snapshot, i) => {
      if (snapshot.storedExtraSize === undefined || snapshot.storedExtraSize >= V3_MIN_SNAPSHOT_EXTRA) return;
      result.messages.push(`${repair === 'all' ? 'Repairing' : 'ERROR'} snapshot table entry ${i} is incomplete`);
      result.corruptions++;
      incompleteSnapshots++;
    });
  }
  // From the header: check runs without opening the data file (it never opens what an image names).
  const external = image.geometry.externalData;
  /** qemu-img's qcow2_inc_refcounts_imrt; `exact` spells the region when its offset may be past 2^53. */
  const refRange = (offset: number, length: number, exact?: { offset: bigint; length: bigint }) => {
    if (length <= 0) return;
    // The last cluster may be partly past the end of the file; a reference a whole cluster or more past it is
    // corruption and is not counted (qemu-img check's rule, which also keeps the image end offset honest).
    if (offset + length - fileSize >= cs) {
      const where = exact ? `offset 0x${exact.offset.toString(16)} size 0x${exact.length.toString(16)}` : `offset ${hex(offset)} size ${hex(length)}`;
      result.messages.push(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: ${where}`);
      result.corruptions++;
      return;
    }
    for (let c = Math.floor(offset / cs); c <= Math.floor((offset + length - 1) / cs); c++) {
      if (!refs.add(c)) {
        result.messages.push(`ERROR: overflow cluster offset=${hex(c * cs)}`);
        result.messages.push('Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing');
        result.corruptions++;
      }
    }
  };

  refRange(0, cs);
  // The active tree counts fragmentation; every snapshot's tree is walked the same way after it.
  const walkL1 = async (l1: Uint8Array, active: boolean) => {
    for (let i = 0; i < l1.length / 8; i++) {
      const hi = u32(l1, i * 8);
      const lo = u32(l1, i * 8 + 4);
      // Like qemu-img check, an entry with any bit set names a table, even one at offset 0 (reads treat offset 0
      // as unallocated): flags without an offset are damage, and walking the "table" at the header shows it.
      if (hi === 0 && lo === 0) continue;
      // Bits 0-8 and 56-62 of an L1 entry are reserved.
      if ((hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0) {
        result.messages.push(`ERROR found L1 entry with reserved bits set: ${rawHex(hi, lo)}`);
        result.corruptions++;
      }
      const l2Offset = l1Offset(hi, lo);
      refRange(l2Offset, cs);
      if (l2Offset % cs !== 0) {
        // Reported, and the "table" is still walked where the entry points, as qemu-img does.
        result.messages.push(`ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
        result.corruptions++;
      }
      // A table (partly) past the end of the file reads as zeros there, as QEMU's block layer reads past EOF;
      // the reference itself was judged by refRange above. Wholly past it, all zeros: nothing to walk (a
      // damaged l1_size can name tens of thousands of such tables).
      if (l2Offset >= fileSize) continue;
      const table = new Uint8Array(cs);
      await readIntoPadded(store, l2Offset, table);
      walkL2(table, active);
    }
  };
  const walkL2 = (table: Uint8Array, active: boolean) => {
    // Fragmentation is judged within one L2 table, as qemu-img counts it.
    let nextContiguous = 0;
    for (let j = 0; j < geometry.l2Entries; j++) {
      const entry = readL2Entry(table, j, geometry);
      const type = clusterType(entry, geometry);
      if (type !== 'compressed' && ((entry.hi & 0x3f000000) !== 0 || (entry.lo & 0x1fe) !== 0)) {
        // Bits 1-8 and 56-61 of a standard descriptor are reserved.
        result.messages.push(`ERROR found l2 entry with reserved bits set: ${rawHex(entry.hi, entry.lo)}`);
        result.corruptions++;
      }
      if (type === 'compressed') {
        const raw = (BigInt(entry.hi & 0x7fffffff) << 32n) | BigInt(entry.lo);
        const offsetBits = BigInt(62 - (geometry.clusterBits - 8));
        const exactOffset = raw & ((1n << offsetBits) - 1n);
        if (entry.hi & 0x80000000) {
          result.messages.push(`ERROR: coffset=0x${exactOffset.toString(16)}: copied flag must never be set for compressed clusters`);
          result.corruptions++;
        }
        if (external) {
          result.messages.push(`ERROR compressed cluster ${j} with data file, entry=0x${raw.toString(16)}`);
          result.corruptions++;
          continue;
        }
        if (entry.allocMask !== 0 || entry.zeroMask !== 0) {
          result.messages.push(`ERROR compressed cluster ${j} with non-zero subcluster allocation bitmap, entry=0x${raw.toString(16)}`);
          result.corruptions++;
          continue;
        }
        const { hostOffset, compressedLength } = decodeCompressed(entry, geometry.clusterBits);
        const exactLength = ((((raw & ((1n << 62n) - 1n)) >> offsetBits) & BigInt(2 ** (geometry.clusterBits - 8) - 1)) + 1n) * 512n - (exactOffset % 512n);
        refRange(hostOffset, compressedLength, { offset: exactOffset, length: exactLength });
        if (active) {
          result.allocatedClusters++;
          result.compressedClusters++;
          // Compressed clusters count as fragmented by nature, as qemu-img reports them.
          result.fragmentedClusters++;
        }
        continue;
      }
      if (type === 'unallocated') {
        if (entry.allocMask !== 0) {
          result.messages.push('ERROR: Unallocated cluster has non-zero subcluster allocation map');
          result.corruptions++;
        }
        continue;
      }
      if (type === 'zero-plain') continue;
      // A normal cluster, or a zero cluster that keeps its host cluster.
      const host = standardHostOffset(entry);
      if ((entry.allocMask & entry.zeroMask) !== 0) {
        result.messages.push(`ERROR offset=${host.toString(16)}: Allocated cluster has corrupted subcluster allocation bitmap`);
        result.corruptions++;
      }
      if (host % cs !== 0) {
        // Still counted below, as qemu-img counts it: the damage shows in the references too.
        const containsData = geometry.extendedL2 ? entry.allocMask !== 0 : type !== 'zero-alloc';
        result.messages.push(`ERROR offset=${host.toString(16)}: ${containsData ? 'Data' : 'Preallocated'} cluster is not properly aligned; L2 entry corrupted.`);
        result.corruptions++;
      }
      if (active) {
        result.allocatedClusters++;
        if (nextContiguous !== 0 && host !== nextContiguous) result.fragmentedClusters++;
        nextContiguous = host + cs;
      }
      if (!external) refRange(host, cs);
    }
  };
  if (header.l1Size) refRange(header.l1TableOffset, header.l1Size * 8);
  await walkL1(image.l1Table, true);
  if (external && image.snapshots.length) {
    result.messages.push(`ERROR ${image.snapshots.length} snapshots in image with data file`);
    result.corruptions++;
  }
  for (const snapshot of image.snapshots) {
    // The entry as stored: opening does not judge a snapshot's L1 table (QEMU neither), check reports it here.
    const l1Offset = snapshot.l1TableOffsetExact ?? BigInt(snapshot.l1TableOffset);
    if (l1Offset % BigInt(cs) !== 0n) {
      result.messages.push(`ERROR snapshot ${snapshot.id} (${snapshot.name}) l1_offset=${hex(l1Offset)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
      result.corruptions++;
      continue;
    }
    if (snapshot.l1Size > MAX_L1_BYTES / 8) {
      result.messages.push(`ERROR snapshot ${snapshot.id} (${snapshot.name}) l1_size=${hex(snapshot.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
      result.corruptions++;
      continue;
    }
    if (!snapshot.l1Size) continue;
    const l1Bytes = snapshot.l1Size * 8;
    refRange(Number(l1Offset), l1Bytes, { offset: l1Offset, length: BigInt(l1Bytes) });
    if (l1Offset + BigInt(l1Bytes) > MAX_IO_END) {
      // QEMU's block layer refuses such a read outright, and its check stops there without a summary.
      result.messages.push('ERROR: I/O error in check_refcounts_l1');
      result.checkErrors++;
      throw new FormatError(image.name, `Check failed: snapshot ${snapshot.id} (${snapshot.name}): its L1 table (l1_table_offset ${hex(l1Offset)}) lies past what a file can address`, {
        field: 'snapshot l1_table_offset',
        ...(snapshot.storedAt === undefined ? {} : { offset: snapshot.storedAt }),
        value: l1Offset,
      });
    }
    // Past the end of the file the table reads as zeros, as in QEMU.
    const l1 = new Uint8Array(l1Bytes);
    if (snapshot.l1TableOffsetExact === undefined) await readIntoPadded(store, snapshot.l1TableOffset, l1);
    await walkL1(l1, false);
  }
  if (header.nbSnapshots) refRange(header.snapshotsOffset, snapshotTableBytes(image.snapshots));
  // The LUKS header and key material, in the clusters the encryption header extension names.
  if (header.cryptMethod === 2 && header.fde && header.fde.length > 0) refRange(header.fde.offset, header.fde.length);

  // Refcount structures: the table, then each block (which must be referenced exactly once).
  const refcountStructure = new Set<number>();
  refRange(header.refcountTableOffset, header.refcountTableClusters * cs);
  for (let c = header.refcountTableOffset / cs; c < header.refcountTableOffset / cs + header.refcountTableClusters; c++) refcountStructure.add(c);
  await referenceBitmaps(image, fileSize, refRange, result);
  const stored = await StoredRefcounts.load(image);
  let brokenTable = false;
  for (let i = 0; i < stored.tableEntries; i++) {
    const { hi, lo } = stored.entry(i);
    if (hi === 0 && lo === 0) continue;
    const offset = hi * TWO_32 + ((lo & 0xfffffe00) >>> 0);
    if ((lo & 0x1ff) !== 0) {
      // Not counted (the block then shows as leaked), though stored refcounts are still read through the entry.
      result.messages.push(`ERROR refcount table entry ${i} has reserved bits set`);
      result.corruptions++;
      brokenTable = true;
      continue;
    }
    if (offset % cs !== 0) {
      result.messages.push(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      result.corruptions++;
      brokenTable = true;
      continue;
    }
    // "Outside" means past the clusters counted so far: the file's, plus a last one references may reach into.
    if (offset / cs >= refs.extent) {
      result.messages.push(`ERROR refcount block ${i} is outside image`);
      result.corruptions++;
      brokenTable = true;
      continue;
    }
    refRange(offset, cs);
    refcountStructure.add(offset / cs);
    // Judged at once, as qemu-img does: a block named twice is reported at its second entry.
    if (refs.get(offset / cs) !== 1) {
      result.messages.push(`ERROR refcount block ${i} refcount=${refs.get(offset / cs)}`);
      result.corruptions++;
      brokenTable = true;
    }
  }

  // Stored against computed, over every cluster of the file (and one past it that a reference may reach).
  const storedValues = new Map<number, number>();
  const extent = refs.extent;
  let highest = 0;
  for (let c = 0; c < extent; c++) {
    // Nothing stored and nothing referenced in a whole stretch: skip it (sparse or hostile sizes stay cheap).
    if (c % CHUNK === 0 && refs.chunkEmpty(c) && !stored.anyBlockFor(c, c + CHUNK)) {
      c += CHUNK - 1;
      continue;
    }
    let value = stored.peek(c, result.messages);
    if (value === NOT_CACHED) value = await stored.get(c, result.messages);
    if (value === undefined) {
      result.messages.push(`Can't get refcount for cluster ${c}: Input/output error`);
      result.checkErrors++;
      brokenTable = true;
      continue;
    }
    const computed = refs.get(c);
    if (value > 0 || computed > 0) highest = c;
    if (value === computed) continue;
    storedValues.set(c, value);
    if (value > computed) {
      result.messages.push(`Leaked cluster ${c} refcount=${value} reference=${computed}`);
      result.leaks++;
    } else {
      result.messages.push(`ERROR cluster ${c} refcount=${value} reference=${computed}`);
      result.corruptions++;
    }
  }

  // COPIED flags of the active tree must say "refcount is exactly 1", judged on the stored refcounts (qemu-img's
  // check_oflag_copied, which runs after the comparison and skips clusters whose refcount cannot be read).
  for (let i = 0; i < image.l1Table.length / 8; i++) {
    const hi = u32(image.l1Table, i * 8);
    const lo = u32(image.l1Table, i * 8 + 4);
    const l2Offset = l1Offset(hi, lo);
    if (l2Offset === 0) continue;
    const l1Refcount = await stored.get(Math.floor(l2Offset / cs));
    if (l1Refcount !== undefined && (l1Refcount === 1) !== ((hi & 0x80000000) !== 0)) {
      result.messages.push(`ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${rawHex(hi, lo)} refcount=${l1Refcount}`);
      result.corruptions++;
    }
    // Past the end of the file the table is zeros: no data cluster to judge.
    if (l2Offset >= fileSize) continue;
    const table = new Uint8Array(cs);
    await readIntoPadded(store, l2Offset, table);
    for (let j = 0; j < geometry.l2Entries; j++) {
      const entry = readL2Entry(table, j, geometry);
      const type = clusterType(entry, geometry);
      if (type !== 'normal' && type !== 'zero-alloc') continue;
      const cluster = Math.floor(standardHostOffset(entry) / cs);
      let refcount = external ? 1 : stored.peek(cluster);
      if (refcount === NOT_CACHED) refcount = await stored.get(cluster);
      if (refcount === undefined) continue;
      if ((refcount === 1) !== isCopied(entry)) {
        result.messages.push(`ERROR OFLAG_COPIED data cluster: l2_entry=${rawHex(entry.hi, entry.lo)} refcount=${refcount}`);
        result.corruptions++;
      }
    }
  }
  result.imageEndOffset = (highest + 1) * cs;
  return { result, references: refs, stored: (c) => storedValues.get(c) ?? refs.get(c), refcountStructure, brokenTable, incompleteSnapshots };
}

type ClusterType = 'compressed' | 'zero-plain' | 'zero-alloc' | 'unallocated' | 'normal';

/** QEMU's qcow2_get_cluster_type: bit 0 means "reads as zero" only without extended L2. */
function clusterType(entry: L2Entry, geometry: Geometry): ClusterType {
  if (isCompressed(entry)) return 'compressed';
  const host = standardHostOffset(entry);
  if (!geometry.extendedL2 && (entry.lo & 1) !== 0) return host !== 0 ? 'zero-alloc' : 'zero-plain';
  // With an external data file, offset 0 is a real location when the entry is marked COPIED.
  if (host === 0) return geometry.externalData && isCopied(entry) ? 'normal' : 'unallocated';
  return 'normal';
}

/** Bits 9..55 of an L1 entry (exact as a number: 47 significant bits). */
function l1Offset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * TWO_32 + ((lo & 0xfffffe00) >>> 0);
}

/**
 * Stored refcounts read the way qemu-img's qcow2_get_refcount reads them: the table entry's reserved bits are
 * masked off, an index past the table or an empty entry means 0, a block past the end of the file reads as zeros,
 * and an entry that is not cluster aligned (or past what a file can address) cannot be read. Blocks are read one
 * at a time and a few are kept.
 */
class StoredRefcounts {
  private readonly cache = new Map<number, Uint8Array>();
  private readonly nonEmpty: number[] = [];
  private signalled = false;
  private constructor(
    private readonly image: Qcow2Image,
    private readonly table: Uint8Array,
  ) {
    for (let i = 0; i < this.tableEntries; i++) if (u32(table, i * 8) !== 0 || u32(table, i * 8 + 4) !== 0) this.nonEmpty.push(i);
  }
  static async load(image: Qcow2Image): Promise<StoredRefcounts> {
    const header = image.header;
    return new StoredRefcounts(image, await readExact(image.store, header.refcountTableOffset, header.refcountTableClusters * image.clusterSize, 'refcount table'));
  }
  get tableEntries(): number {
    return this.table.length / 8;
  }
  private get blockEntries(): number {
    return (this.image.clusterSize * 8) / 2 ** this.image.header.refcountOrder;
  }
  entry(index: number): { hi: number; lo: number } {
    return { hi: u32(this.table, index * 8), lo: u32(this.table, index * 8 + 4) };
  }
  /** True when some table entry in use covers a cluster in [from, to). */
  anyBlockFor(from: number, to: number): boolean {
    const lo = Math.floor(from / this.blockEntries);
    const hi = Math.floor((to - 1) / this.blockEntries);
    return this.nonEmpty.some((i) => i >= lo && i <= hi);
  }
  /**
   * get() without I/O: the stored refcount (or undefined) when the answer needs no block read, NOT_CACHED
   * otherwise. Walking a million L2 entries costs a promise each through get(); most hit a cached block.
   */
  peek(cluster: number, messages?: string[]): number | undefined | typeof NOT_CACHED {
    const index = Math.floor(cluster / this.blockEntries);
    if (index >= this.tableEntries) return 0;
    const { hi, lo } = this.entry(index);
    const offset = hi * TWO_32 + ((lo & 0xfffffe00) >>> 0);
    if (offset === 0) return 0;
    const cs = this.image.clusterSize;
    if (offset % cs !== 0 || hi >= 0x80000000) {
      if (offset % cs !== 0 && messages && !this.signalled) {
        this.signalled = true;
        messages.push(`qcow2: Image is corrupt: Refblock offset 0x${rawHex(hi, (lo & 0xfffffe00) >>> 0)} unaligned (reftable index: ${index ? hex(index) : '0'}); further non-fatal corruption events will be suppressed`);
      }
      return undefined;
    }
    const block = this.cache.get(index);
    return block ? getRefcount(block, cluster % this.blockEntries, this.image.header.refcountOrder) : NOT_CACHED;
  }
  /** The stored refcount, or undefined when it cannot be read (reported once in `messages` when given). */
  async get(cluster: number, messages?: string[]): Promise<number | undefined> {
    const known = this.peek(cluster, messages);
    if (known !== NOT_CACHED) return known;
    const index = Math.floor(cluster / this.blockEntries);
    const { hi, lo } = this.entry(index);
    const offset = hi * TWO_32 + ((lo & 0xfffffe00) >>> 0);
    const cs = this.image.clusterSize;
    let block = this.cache.get(index);
    if (!block) {
      if (this.cache.size >= 16) this.cache.delete(this.cache.keys().next().value!);
      block = new Uint8Array(cs);
      await readIntoPadded(this.image.store, offset, block);
      this.cache.set(index, block);
    }
    return getRefcount(block, cluster % this.blockEntries, this.image.header.refcountOrder);
  }
}

/** Bitmap directory entries reference their bitmap table, which references data clusters. */
export async function referenceBitmaps(image: Qcow2Image, fileSize: number, refRange: (offset: number, length: number) => void, result: CheckResult): Promise<void> {
  // The directory was validated on open (bitmaps.ts); without consistent bitmaps there is none, as in QEMU.
  const extension = image.header.bitmaps;
  if (!extension) return;
  const cs = image.clusterSize;
  refRange(extension.directoryOffset, extension.directorySize);
  for (const bitmap of image.bitmaps) {
    refRange(bitmap.tableOffset, bitmap.tableSize * 8);
    if (bitmap.tableOffset + bitmap.tableSize * 8 > fileSize) {
      result.checkErrors++;
      continue;
    }
    const table = await readExact(image.store, bitmap.tableOffset, bitmap.tableSize * 8, 'bitmap table');
    for (let i = 0; i < bitmap.tableSize; i++) {
      const offset = (u32(table, i * 8) & 0x00ffffff) * TWO_32 + ((u32(table, i * 8 + 4) & 0xfffffe00) >>> 0);
      if (offset > 1) refRange(offset, cs);
    }
  }
}

/** A 64-bit entry in hex without a prefix, exact beyond 2^53 (qemu-img prints them with PRIx64). */
function rawHex(hi: number, lo: number): string {
  hi >>>= 0;
  const low = (lo >>> 0).toString(16);
  return hi ? hi.toString(16) + low.padStart(8, '0') : low;
}

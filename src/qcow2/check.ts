/**
 * Consistency check and repair, with the counts `qemu-img check --output=json` reports.
 *
 * References are recomputed from everything that points at host clusters (header, active and snapshot L1/L2
 * trees including VM state, refcount table and blocks, snapshot table, bitmap directory and tables) and compared
 * with the stored refcounts: stored above computed is a leak, below is a corruption. COPIED flags of the active
 * tree, alignment and overlaps are checked too. Memory is bounded by the file size: references past the end
 * of the file are kept in a capped map, not a dense array.
 */
import { hex, u32, u64 } from './bytes.js';
import { decodeCompressed, isCompressed, isCopied, readL2Entry, standardHostOffset } from './mapping.js';
import { getRefcount } from './refcount.js';
import { AUTOCLEAR_BITMAPS } from './header.js';
import { readExact, readIntoPadded, type ByteStore } from './store.js';
import { snapshotTableBytes } from './snapshots.js';
import type { Qcow2Image } from './image.js';

const TWO_32 = 2 ** 32;
/** Chunks of references kept for clusters past the end of the file (a hostile image cannot grow this). */
const MAX_OUT_OF_FILE = 64;
const CHUNK = 65536;
const MAX_MESSAGES = 10000;

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
  private beyondCount = 0;
  private maxCluster = -1;
  constructor(readonly fileClusters: number) {}
  add(cluster: number): boolean {
    if (cluster >= this.fileClusters && !this.chunks.has(Math.floor(cluster / CHUNK)) && this.beyondCount >= MAX_OUT_OF_FILE) return false;
    const key = Math.floor(cluster / CHUNK);
    let chunk = this.chunks.get(key);
    if (!chunk) {
      chunk = new Uint32Array(CHUNK);
      this.chunks.set(key, chunk);
      if (cluster >= this.fileClusters) this.beyondCount++;
    }
    const i = cluster % CHUNK;
    if (chunk[i]! < 0xffffffff) chunk[i] = chunk[i]! + 1;
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

/** Reads and compares; with `repair`, fixes refcounts (and COPIED flags for 'all') through the write engine. */
export async function checkImage(image: Qcow2Image, options: { repair?: RepairMode } = {}): Promise<CheckResult> {
  // What a writer holds in memory is part of the image: check what it would leave on disk.
  if (!image.readOnly) await image.flush();
  const first = await analyse(image);
  if (!options.repair || (first.result.leaks === 0 && first.result.corruptions === 0)) return first.result;
  const { repairRefcounts } = await import('./repair.js');
  await repairRefcounts(image, first, options.repair);
  const second = await analyse(image);
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
}

export async function analyse(image: Qcow2Image): Promise<Analysis> {
  const store: ByteStore = image.store;
  const header = image.header;
  const cs = image.clusterSize;
  const geometry = image.geometry;
  const fileSize = await store.size();
  const fileClusters = Math.ceil(fileSize / cs);
  const refs = new References(fileClusters);
  const result: CheckResult = {
    checkErrors: 0,
    leaks: 0,
    corruptions: 0,
    leaksFixed: 0,
    corruptionsFixed: 0,
    imageEndOffset: 0,
    totalClusters: Math.ceil(header.size / cs),
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    messages: [],
  };
  // Findings are counted without limit but listed up to a bound: a hostile image must not fill memory with text.
  const messages = result.messages;
  const push = messages.push.bind(messages);
  messages.push = (...lines: string[]) => {
    if (messages.length < MAX_MESSAGES) return push(...lines);
    if (messages.length === MAX_MESSAGES) push('(further findings not listed)');
    return messages.length;
  };
  const external = image.dataStore !== undefined;
  const refRange = (offset: number, length: number) => {
    if (length <= 0) return;
    // The last cluster may be partly past the end of the file; a reference a whole cluster or more past it is
    // corruption and is not counted (qemu-img check's rule, which also keeps the image end offset honest).
    if (offset + length - fileSize >= cs) {
      result.messages.push(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset ${hex(offset)} size ${hex(length)}`);
      result.corruptions++;
      return;
    }
    for (let c = Math.floor(offset / cs); c <= Math.floor((offset + length - 1) / cs); c++) {
      if (!refs.add(c)) {
        result.checkErrors++;
        return;
      }
    }
  };

  refRange(0, cs);
  // Trees: the active one with fragmentation info and COPIED checks, then every snapshot's.
  const copiedChecks: { kind: 'l1' | 'l2'; cluster: number; copied: boolean; where: string }[] = [];
  const walk = async (l1: Uint8Array, active: boolean) => {
    for (let i = 0; i < l1.length / 8; i++) {
      const hi = u32(l1, i * 8);
      const lo = u32(l1, i * 8 + 4);
      const l2Offset = (hi & 0x00ffffff) * TWO_32 + (lo & 0xfffffe00);
      // Like qemu-img check, an entry with any bit set names a table, even one at offset 0 (reads treat offset 0
      // as unallocated): flags without an offset are damage, and walking the "table" at the header shows it.
      if (hi === 0 && lo === 0) continue;
      // Bits 0-8 and 56-62 of an L1 entry are reserved.
      if ((hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0) {
        result.messages.push(`ERROR found L1 entry with reserved bits set: ${rawHex({ hi, lo })}`);
        result.corruptions++;
      }
      // COPIED flags are only judged in tables with a real offset (qemu-img skips offset 0 there).
      const judgeCopied = active && l2Offset !== 0 && l2Offset % cs === 0;
      refRange(l2Offset, cs);
      if (l2Offset % cs !== 0) {
        // Reported, and the "table" is still walked where the entry points, as qemu-img does.
        result.messages.push(`ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
        result.corruptions++;
      }
      if (judgeCopied) copiedChecks.push({ kind: 'l1', cluster: l2Offset / cs, copied: (hi & 0x80000000) !== 0, where: `L2 cluster: l1_index=${i} l1_entry=${hex(hi * TWO_32 + lo)}` });
      // A table (partly) past the end of the file reads as zeros there, as QEMU's block layer reads past EOF;
      // the reference itself was judged by refRange above.
      const table = new Uint8Array(cs);
      await readIntoPadded(store, l2Offset, table);
      // Fragmentation is judged within one L2 table, as qemu-img counts it.
      let nextContiguous = 0;
      for (let j = 0; j < geometry.l2Entries; j++) {
        const entry = readL2Entry(table, j, geometry);
        if (isCompressed(entry)) {
          if (external || (geometry.extendedL2 && (entry.allocMask | entry.zeroMask) !== 0)) {
            result.messages.push(`ERROR compressed cluster ${j} with data file or non-zero subcluster allocation bitmap, entry=${hex(entry.hi * TWO_32 + entry.lo)}`);
            result.corruptions++;
            continue;
          }
          const { hostOffset, compressedLength } = decodeCompressed(entry, geometry.clusterBits);
          if (active) {
            result.allocatedClusters++;
            result.compressedClusters++;
            // Compressed clusters count as fragmented by nature, as qemu-img reports them.
            result.fragmentedClusters++;
          }
          if (hostOffset + compressedLength - fileSize >= cs) {
            // Past the end of the file, so not counted; offsets this large can exceed 2^53, so the message is
            // worked out exactly.
            const raw = (BigInt(entry.hi & 0x3fffffff) << 32n) | BigInt(entry.lo >>> 0);
            const offsetBits = BigInt(62 - (geometry.clusterBits - 8));
            const exactOffset = raw & ((1n << offsetBits) - 1n);
            const exactLength = ((raw >> offsetBits) + 1n) * 512n - (exactOffset % 512n);
            result.messages.push(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${exactOffset.toString(16)} size 0x${exactLength.toString(16)}`);
            result.corruptions++;
            continue;
          }
          refRange(hostOffset, compressedLength);
          continue;
        }
        if (geometry.extendedL2 && entry.allocMask & entry.zeroMask) {
          result.messages.push(`ERROR invalid subcluster allocation bitmap, entry=${hex(entry.hi * TWO_32 + entry.lo)}`);
          result.corruptions++;
        }
        // Bits 1-8 and 56-61 of a standard descriptor are reserved.
        if ((entry.hi & 0x3f000000) !== 0 || (entry.lo & 0x1fe) !== 0) {
          result.messages.push(`ERROR found l2 entry with reserved bits set: ${rawHex(entry)}`);
          result.corruptions++;
        }
        const host = standardHostOffset(entry);
        const hasHost = host !== 0 || (external && isCopied(entry));
        if (!hasHost) continue;
        if (host % cs !== 0) {
          // Still counted below, as qemu-img counts it: the damage shows in the references too.
          const kind = !geometry.extendedL2 && (entry.lo & 1) !== 0 ? 'Preallocated' : 'Data';
          result.messages.push(`ERROR offset=${host.toString(16)}: ${kind} cluster is not properly aligned; L2 entry corrupted.`);
          result.corruptions++;
        }
        if (active) {
          result.allocatedClusters++;
          if (nextContiguous !== 0 && host !== nextContiguous) result.fragmentedClusters++;
          nextContiguous = host + cs;
        }
        if (external) continue;
        refRange(host, cs);
        if (judgeCopied) copiedChecks.push({ kind: 'l2', cluster: Math.floor(host / cs), copied: isCopied(entry), where: `data cluster: l2_entry=${hex(entry.hi * TWO_32 + entry.lo)}` });
      }
    }
  };
  refRange(header.l1TableOffset, header.l1Size * 8);
  await walk(image.l1Table, true);
  for (const snapshot of image.snapshots) {
    refRange(snapshot.l1TableOffset, snapshot.l1Size * 8);
    if (snapshot.l1TableOffset + snapshot.l1Size * 8 > fileSize) {
      result.messages.push(`ERROR snapshot ${snapshot.id} (${snapshot.name}) L1 table is outside the image file`);
      result.corruptions++;
      continue;
    }
    const l1 = snapshot.l1Size ? await readExact(store, snapshot.l1TableOffset, snapshot.l1Size * 8, 'snapshot L1 table') : new Uint8Array(0);
    await walk(l1, false);
  }
  if (header.nbSnapshots) refRange(header.snapshotsOffset, snapshotTableBytes(image.snapshots));
  await referenceBitmaps(image, fileSize, refRange, result);

  // Refcount structures: the table, then each block (which must be referenced exactly once).
  const refcountStructure = new Set<number>();
  refRange(header.refcountTableOffset, header.refcountTableClusters * cs);
  for (let c = header.refcountTableOffset / cs; c < header.refcountTableOffset / cs + header.refcountTableClusters; c++) refcountStructure.add(c);
  const tableBytes = await readExact(store, header.refcountTableOffset, header.refcountTableClusters * cs, 'refcount table');
  const blockEntries = (cs * 8) >>> header.refcountOrder;
  const blocks = new Map<number, number>();
  /** Where stored refcounts are read from: the blocks above plus any whose table entry has reserved bits. */
  const storedBlocks = new Map<number, number>();
  let brokenTable = false;
  for (let i = 0; i < tableBytes.length / 8; i++) {
    const offset = u32(tableBytes, i * 8) * TWO_32 + (u32(tableBytes, i * 8 + 4) & 0xfffffe00);
    if ((u32(tableBytes, i * 8 + 4) & 0x1ff) !== 0) {
      // The block is not counted as referenced (so it shows as leaked), but stored refcounts are still read
      // through the entry with its reserved bits masked, as qemu-img reads them.
      result.messages.push(`ERROR refcount table entry ${i} has reserved bits set`);
      result.corruptions++;
      brokenTable = true;
      if (offset !== 0 && offset % cs === 0 && offset + cs <= fileSize) storedBlocks.set(i, offset);
      continue;
    }
    if (offset === 0) continue;
    if (offset % cs !== 0) {
      result.messages.push(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      result.corruptions++;
      brokenTable = true;
      continue;
    }
    if (offset + cs > fileSize) {
      result.messages.push(`ERROR refcount block ${i} is outside image`);
      result.corruptions++;
      brokenTable = true;
      continue;
    }
    refRange(offset, cs);
    refcountStructure.add(offset / cs);
    blocks.set(i, offset);
    storedBlocks.set(i, offset);
  }
  for (const [i, offset] of blocks) {
    if (refs.get(offset / cs) !== 1) {
      result.messages.push(`ERROR refcount block ${i} refcount=${refs.get(offset / cs)}`);
      result.corruptions++;
      brokenTable = true;
    }
  }

  // Stored refcounts, one block in memory at a time.
  const blockCache = new Map<number, Uint8Array>();
  const readBlock = async (index: number): Promise<Uint8Array | undefined> => {
    const offset = storedBlocks.get(index);
    if (offset === undefined) return undefined;
    let block = blockCache.get(index);
    if (!block) {
      blockCache.clear();
      block = await readExact(store, offset, cs, 'refcount block');
      blockCache.set(index, block);
    }
    return block;
  };
  const blockIndices = [...storedBlocks.keys()].sort((a, b) => a - b);
  const hasBlockIn = (from: number, to: number): boolean => {
    const lo = Math.floor(from / blockEntries);
    const hi = Math.floor((to - 1) / blockEntries);
    return blockIndices.some((i) => i >= lo && i <= hi);
  };
  const storedValues = new Map<number, number>();
  const extent = refs.extent;
  let highest = -1;
  for (let c = 0; c < extent; c++) {
    // Nothing stored and nothing referenced in a whole stretch: skip it (sparse or hostile sizes stay cheap).
    if (c % CHUNK === 0 && refs.chunkEmpty(c) && !hasBlockIn(c, c + CHUNK)) {
      c += CHUNK - 1;
      continue;
    }
    const block = await readBlock(Math.floor(c / blockEntries));
    const stored = block ? getRefcount(block, c % blockEntries, header.refcountOrder) : 0;
    const computed = refs.get(c);
    if (stored > 0 || computed > 0) highest = c;
    if (stored === computed) continue;
    storedValues.set(c, stored);
    if (stored > computed) {
      result.messages.push(`Leaked cluster ${c} refcount=${stored} reference=${computed}`);
      result.leaks++;
    } else {
      result.messages.push(`ERROR cluster ${c} refcount=${stored} reference=${computed}`);
      result.corruptions++;
    }
  }
  result.imageEndOffset = (highest + 1) * cs;

  // COPIED flags of the active tree must say "refcount is exactly 1" (judged on the stored counts).
  const storedOf = (c: number) => storedValues.get(c) ?? refs.get(c);
  for (const check of copiedChecks) {
    if ((storedOf(check.cluster) === 1) !== check.copied) {
      result.messages.push(`ERROR OFLAG_COPIED ${check.where} refcount=${storedOf(check.cluster)}`);
      result.corruptions++;
    }
  }
  return { result, references: refs, stored: storedOf, refcountStructure, brokenTable };
}

/** Bitmap directory entries reference their bitmap table, which references data clusters. */
export async function referenceBitmaps(image: Qcow2Image, fileSize: number, refRange: (offset: number, length: number) => void, result: CheckResult): Promise<void> {
  const bitmaps = image.header.bitmaps;
  // Without autoclear bit 0 the bitmaps extension is stale and QEMU ignores it: so do we.
  if (!bitmaps || bitmaps.directorySize === 0 || !(image.header.autoclearFeatures & AUTOCLEAR_BITMAPS)) return;
  const cs = image.clusterSize;
  refRange(bitmaps.directoryOffset, bitmaps.directorySize);
  if (bitmaps.directorySize > 64 * 1024 * 1024 || bitmaps.directoryOffset + bitmaps.directorySize > fileSize) {
    result.checkErrors++;
    return;
  }
  const directory = await readExact(image.store, bitmaps.directoryOffset, bitmaps.directorySize, 'bitmap directory');
  let at = 0;
  for (let n = 0; n < bitmaps.count && at + 24 <= directory.length; n++) {
    const tableOffset = u64(directory, at);
    const tableSize = u32(directory, at + 8);
    const nameSize = (directory[at + 18]! << 8) | directory[at + 19]!;
    const extra = u32(directory, at + 20);
    refRange(tableOffset, tableSize * 8);
    if (tableOffset % cs === 0 && tableOffset + tableSize * 8 <= fileSize && tableSize <= (64 * 1024 * 1024) / 8) {
      const table = await readExact(image.store, tableOffset, tableSize * 8, 'bitmap table');
      for (let i = 0; i < tableSize; i++) {
        const offset = (u32(table, i * 8) & 0x00ffffff) * TWO_32 + (u32(table, i * 8 + 4) & 0xfffffe00);
        if (offset > 1) refRange(offset, cs);
      }
    }
    at += Math.ceil((24 + extra + nameSize) / 8) * 8;
  }
}

/** An L2 entry's 64 bits in hex without a prefix, exact beyond 2^53 (qemu-img prints them so). */
function rawHex(entry: { hi: number; lo: number }): string {
  const hi = entry.hi >>> 0;
  const lo = (entry.lo >>> 0).toString(16);
  return hi ? hi.toString(16) + lo.padStart(8, '0') : lo;
}

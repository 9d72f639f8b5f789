/**
 * Size estimates for a new qcow2 image, as qemu-img measure computes them (QEMU 7.2 block/qcow2.c
 * qcow2_measure, qcow2_calc_prealloc_size, qcow2_refcount_metadata_size): the metadata of a fully allocated
 * image of the target's geometry, plus the data clusters a source needs, plus its persistent bitmaps.
 */
import type { BlockDevice } from './device.js';
import { Qcow2Image } from './image.js';
import { mapDevice, type BlockStatusOptions } from './block-status.js';

const roundUp = (value: number, to: number): number => Math.ceil(value / to) * to;
const divRoundUp = (value: number, by: number): number => Math.ceil(value / by);

/**
 * Refcount table and blocks that count `clusters` clusters and themselves: the fixed point where adding the
 * refcount structures needs no further block or table cluster.
 */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountOrder: number): number {
  const blocksPerTableCluster = clusterSize / 8;
  const refcountsPerBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = divRoundUp(clusters + table + blocks, refcountsPerBlock);
    table = divRoundUp(blocks, blocksPerTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/** Bytes of a qcow2 file with every cluster of a `size`-byte disk allocated, metadata included. */
export function fullyAllocatedSize(size: number, clusterSize: number, refcountOrder: number, extendedL2: boolean): number {
  const aligned = roundUp(size, clusterSize);
  const entryBytes = extendedL2 ? 16 : 8;
  let meta = clusterSize; // header
  const l2Entries = roundUp(aligned / clusterSize, clusterSize / entryBytes);
  meta += l2Entries * entryBytes;
  const l1Entries = roundUp((l2Entries * entryBytes) / clusterSize, clusterSize / 8);
  meta += l1Entries * 8;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountOrder);
  return meta + aligned;
}

/**
 * Guest bytes of `source` that need data clusters in a target with `clusterSize`, counted like qemu-img: ranges
 * reading as zero are skipped, and each data range counts the whole target clusters it touches (the scan then
 * resumes at the end of the last one).
 */
export async function requiredDataBytes(source: BlockDevice, clusterSize: number, options: BlockStatusOptions = {}): Promise<number> {
  let required = 0;
  let resume = 0;
  await mapDevice(source, options, (entry) => {
    const end = entry.start + entry.length;
    if (end <= resume || entry.zero || !entry.data) return;
    const start = Math.max(entry.start, resume);
    resume = roundUp(end, clusterSize);
    required += resume - Math.floor(start / clusterSize) * clusterSize;
  });
  return required;
}

/**
 * Space for copying the source's persistent dirty bitmaps into a target with `clusterSize`: each bitmap fully
 * allocated, its bitmap table, and the directory. Undefined when the source cannot carry persistent bitmaps
 * (not qcow2 version 3), so measure leaves the figure out.
 */
export async function persistentBitmapsSize(source: BlockDevice, clusterSize: number): Promise<number | undefined> {
  if (!(source instanceof Qcow2Image) || source.header.version < 3) return undefined;
  let total = 0;
  let directoryBytes = 0;
  for (const bitmap of source.bitmaps) {
    const bytes = divRoundUp(divRoundUp(source.virtualSize, 2 ** bitmap.granularityBits), 8);
    const clusters = divRoundUp(bytes, clusterSize);
    total += clusters * clusterSize + roundUp(clusters * 8, clusterSize);
    // The new directory entry carries no extra data (validated on open: none of them has any).
    directoryBytes += roundUp(24 + bitmap.nameSize, 8);
  }
  if (source.bitmaps.length === 0) return 0;
  return total + roundUp(directoryBytes, clusterSize);
}

export interface Qcow2MeasureOptions {
  /** Virtual size (from --size, or the source's size). */
  size: number;
  clusterSize: number;
  refcountOrder: number;
  extendedL2: boolean;
  /** falloc and full count every data cluster as required. */
  preallocation: 'off' | 'metadata' | 'falloc' | 'full';
  hasBackingFile: boolean;
}

export interface Measurement {
  required: number;
  fullyAllocated: number;
  bitmaps?: number;
}

/** qemu-img measure -O qcow2. */
export async function measureQcow2(options: Qcow2MeasureOptions, source: BlockDevice | undefined, version: 2 | 3, statusOptions: BlockStatusOptions = {}): Promise<Measurement> {
  const { clusterSize } = options;
  const virtualSize = roundUp(source ? source.virtualSize : options.size, clusterSize);
  let required = 0;
  if (source) {
    // With a backing file nobody knows what the target will share with it: every cluster counts.
    required = options.hasBackingFile ? virtualSize : await requiredDataBytes(source, clusterSize, statusOptions);
  }
  if (options.preallocation === 'full' || options.preallocation === 'falloc') required = virtualSize;
  const fullyAllocated = fullyAllocatedSize(virtualSize, clusterSize, options.refcountOrder, options.extendedL2);
  const result: Measurement = { required: fullyAllocated - virtualSize + required, fullyAllocated };
  if (version >= 3 && source) {
    const bitmaps = await persistentBitmapsSize(source, clusterSize);
    if (bitmaps !== undefined) result.bitmaps = bitmaps;
  }
  return result;
}

/**
 * Block status: what each guest range of a device is (data, zero, unallocated) and in which layer of its backing
 * chain it is found, with the host offset when the bytes lie uncompressed in a file. `qemu-img map` prints this,
 * convert uses it to skip holes, and it follows QEMU 7.2's rules (block/io.c, qemu-img.c get_block_status):
 * - A layer reports data, zero, or neither; "neither" in a layer with no backing file, or at or past the end of
 *   its backing file, reads as zero but is not "present" (allocated).
 * - The walk goes down the chain until a layer reports data or zero; `depth` counts the layers passed.
 * - qcow2 zero clusters that keep a host cluster, and extended-L2 clusters whose subclusters are all unallocated,
 *   still report their host offset. Compressed clusters report data without an offset.
 * - Raw files and metadata-preallocated qcow2 images report holes of the underlying file as zero. QEMU asks the
 *   file system (SEEK_HOLE); a portable engine cannot, so a `HoleProbe` answers (the default treats all-zero
 *   4 KiB blocks as holes, which is what sparse files made by QEMU contain).
 */
import type { BlockDevice } from './device.js';
import type { ByteStore } from './store.js';
import { Qcow2Image } from './image.js';
import { QcowV1Image } from './qcow1.js';
import { RawImage } from './raw.js';
import { SUBCLUSTERS, decodeL1Entry, isCompressed, isCopied, readL2Entry, standardHostOffset } from './mapping.js';
import { getRefcount } from './refcount.js';
import { CorruptImageError } from './errors.js';
import { hex, isZero, u64 } from './bytes.js';

/**
 * One `qemu-img map --output=json` entry, plus the file holding `offset`: its name (for the human format) and
 * the store itself, so a caller can read the data where it lies (convert's copy plan).
 */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  file?: string;
  store?: ByteStore;
}

/** Reports whether [offset, offset+length) of a file starts with a hole, and how long that run is. */
export type HoleProbe = (store: ByteStore, offset: number, length: number) => Promise<{ hole: boolean; length: number }>;

export interface BlockStatusOptions {
  holeProbe?: HoleProbe;
  /**
   * Bytes the file really occupies on disk (st_blocks * 512), used like QEMU to detect metadata preallocation.
   * Without it, metadata preallocation is never assumed.
   */
  allocatedSize?: (store: ByteStore) => Promise<number | undefined>;
}

/** What one layer says about a range starting at `offset` (QEMU's BDRV_BLOCK_* flags as fields). */
interface LayerStatus {
  length: number;
  data: boolean;
  zero: boolean;
  /** True when this layer itself answers for the range (data or zero), as opposed to deferring to backing. */
  allocated: boolean;
  hostOffset?: number;
  file?: ByteStore;
}

const PROBE_BLOCK = 4096;
/** qemu-img map asks for at most 1 GiB at a time. */
const MAX_REQUEST = 2 ** 30;

/**
 * The default hole probe: all-zero 4 KiB blocks (aligned in the file) count as holes, except the first block of
 * the file: qemu-img writes it when it creates any file (to probe the alignment later), so QEMU sees data there.
 */
export const zeroBlockProbe: HoleProbe = async (store, offset, length) => {
  const fileSize = await store.size();
  if (offset >= fileSize) return { hole: true, length };
  if (offset < PROBE_BLOCK) return { hole: false, length: Math.min(length, PROBE_BLOCK - offset) };
  const end = Math.min(offset + length, fileSize);
  // A file system block is a hole or not as a whole: look at every aligned block the range touches.
  let block = Math.floor(offset / PROBE_BLOCK) * PROBE_BLOCK;
  let hole: boolean | undefined;
  while (block < end) {
    const chunkEnd = Math.min(Math.ceil(end / PROBE_BLOCK) * PROBE_BLOCK, block + 64 * PROBE_BLOCK);
    const bytes = await store.read(block, chunkEnd - block);
    for (let i = 0; i < chunkEnd - block; i += PROBE_BLOCK) {
      const isHole = isZero(bytes.subarray(i, i + PROBE_BLOCK));
      if (hole === undefined) hole = isHole;
      else if (hole !== isHole) return { hole, length: block + i - offset };
    }
    block = chunkEnd;
  }
  // Past the end of the file reads as a hole too.
  if (end < offset + length && hole !== false) return { hole: true, length };
  return { hole: hole ?? true, length: end - offset };
};

/** Walks a device and its backing chain like qemu-img map: merged entries covering [0, virtualSize). */
export async function mapDevice(device: BlockDevice, options: BlockStatusOptions = {}, onEntry?: (entry: MapEntry) => void): Promise<MapEntry[]> {
  const context = new StatusContext(options);
  const entries: MapEntry[] = [];
  let current: MapEntry | undefined;
  let at = 0;
  while (at < device.virtualSize) {
    const next = await chainStatus(context, device, at, Math.min(MAX_REQUEST, device.virtualSize - at));
    if (current && mergeable(current, next)) {
      current.length += next.length;
    } else {
      if (current) {
        entries.push(current);
        onEntry?.(current);
      }
      current = next;
    }
    at += next.length;
  }
  if (current) {
    entries.push(current);
    onEntry?.(current);
  }
  return entries;
}

/** The status of the range starting at `offset` (at most `length` bytes), resolved through the chain. */
export async function blockStatus(device: BlockDevice, offset: number, length: number, options: BlockStatusOptions = {}): Promise<MapEntry> {
  return chainStatus(new StatusContext(options), device, offset, length);
}

/** qemu-img's entry_mergeable: same flags, same depth and file, and host offsets that continue each other. */
export function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.zero !== b.zero || a.data !== b.data || a.depth !== b.depth || a.present !== b.present) return false;
  if ((a.offset === undefined) !== (b.offset === undefined) || a.file !== b.file) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

class StatusContext {
  private readonly preallocated = new Map<BlockDevice, Promise<boolean>>();
  private readonly sparse = new Map<ByteStore, Promise<boolean>>();
  private readonly holeProbe: HoleProbe;
  constructor(readonly options: BlockStatusOptions) {
    this.holeProbe = options.holeProbe ?? zeroBlockProbe;
  }

  /** A file that occupies at least its size on disk has no holes at all, whatever its bytes are. */
  async probe(store: ByteStore, offset: number, length: number): Promise<{ hole: boolean; length: number }> {
    let sparse = this.sparse.get(store);
    if (!sparse) {
      sparse = (async () => {
        const allocated = await this.options.allocatedSize?.(store);
        return allocated === undefined || allocated < (await store.size());
      })();
      this.sparse.set(store, sparse);
    }
    if (!(await sparse)) return { hole: false, length };
    return this.holeProbe(store, offset, length);
  }

  metadataPreallocated(image: Qcow2Image): Promise<boolean> {
    let known = this.preallocated.get(image);
    if (!known) {
      known = detectMetadataPreallocation(image, this.options);
      this.preallocated.set(image, known);
    }
    return known;
  }
}

async function chainStatus(context: StatusContext, top: BlockDevice, offset: number, length: number): Promise<MapEntry> {
  let device: BlockDevice | undefined = top;
  let depth = 0;
  let bytes = length;
  for (;;) {
    const status: LayerStatus = await layerStatus(context, device, offset, bytes);
    bytes = status.length;
    const backing = backingDevice(device);
    let zero = status.zero;
    if (!status.allocated) {
      // Nothing below answers: zeros, reported by this layer (QEMU's block/io.c adds BDRV_BLOCK_ZERO here).
      if (!backing || offset >= backing.virtualSize) zero = true;
    }
    if (status.data || zero || !backing) {
      return {
        start: offset,
        length: bytes,
        depth,
        present: status.allocated,
        zero,
        data: status.data,
        ...(status.hostOffset !== undefined ? { offset: status.hostOffset, file: status.file?.name, store: status.file } : {}),
      };
    }
    // The backing layer is asked about the same range, clipped to its size.
    bytes = Math.min(bytes, backing.virtualSize - offset);
    device = backing;
    depth++;
  }
}

function backingDevice(device: BlockDevice): BlockDevice | undefined {
  return (device as { backing?: BlockDevice }).backing;
}

async function layerStatus(context: StatusContext, device: BlockDevice, offset: number, length: number): Promise<LayerStatus> {
  if (device instanceof Qcow2Image) return qcow2Status(context, device, offset, length);
  if (device instanceof QcowV1Image) return qcowV1Status(device, offset, length);
  if (device instanceof RawImage) {
    // Past the end of the file (the rest of its last sector, or of a shorter raw file): QEMU's file driver
    // reports zeros, still at their host offset.
    if (offset >= device.fileSize) return { length, data: false, zero: true, allocated: true, hostOffset: offset, file: device.store };
    const { hole, length: run } = await context.probe(device.store, offset, Math.min(length, device.fileSize - offset));
    return { length: Math.min(run, length), data: !hole, zero: hole, allocated: true, hostOffset: offset, file: device.store };
  }
  // Anything else (a snapshot view, a foreign device): all data, no offset.
  return { length, data: true, zero: false, allocated: true };
}

type UnitType = 'normal' | 'compressed' | 'zero-plain' | 'zero-alloc' | 'unallocated-plain' | 'unallocated-alloc';

/** QEMU's subcluster types: the cluster type refined by the extended-L2 bitmaps. */
async function qcow2Status(context: StatusContext, image: Qcow2Image, offset: number, length: number): Promise<LayerStatus> {
  const clusterSize = image.geometry.clusterSize;
  const scan: UnitScan = { offset, at: offset, first: undefined };
  let known: { offset: number; table: Uint8Array } | undefined;
  for (;;) {
    const need = scanUnits(image, scan, offset + length, known);
    if (need < 0) break;
    known = { offset: need, table: await image.loadL2(need) };
  }
  const at = scan.at;
  const first = scan.first;
  const { type, host } = first!;
  let status: LayerStatus = {
    length: at - offset,
    data: type === 'normal' || type === 'compressed',
    zero: type === 'zero-plain' || type === 'zero-alloc',
    allocated: type === 'normal' || type === 'compressed' || type === 'zero-plain' || type === 'zero-alloc',
    // Encrypted data has no offset a reader could use (QEMU reports none either).
    ...(host !== undefined && image.header.cryptMethod === 0 ? { hostOffset: host, file: image.dataStore ?? image.store } : {}),
  };
  // Metadata-preallocated images: holes in the file under data clusters read as zero (QEMU's BDRV_BLOCK_RECURSE).
  // Only whole clusters count as holes here: QEMU also allocates parts of clusters with zero-range requests
  // (copy-on-write of zeros), which a content probe cannot tell from holes; whole zero clusters in a
  // metadata-preallocated image are almost always never-written holes.
  if (status.data && status.hostOffset !== undefined && (await context.metadataPreallocated(image))) {
    let run = 0;
    let hole: boolean | undefined;
    while (run < status.length) {
      const at = status.hostOffset + run;
      const n = Math.min(clusterSize - (at % clusterSize), status.length - run);
      const probed = await context.probe(status.file!, at, n);
      const isHole = n === clusterSize && probed.hole && probed.length >= n;
      if (hole === undefined) hole = isHole;
      else if (hole !== isHole) break;
      run += n;
    }
    status = { ...status, length: run, zero: hole === true };
  }
  return status;
}

interface UnitScan {
  readonly offset: number;
  /** Where the run found so far ends. */
  at: number;
  /** The first unit's type and host offset: the run goes on while units continue it. */
  first: { type: UnitType; host: number | undefined } | undefined;
}

/**
 * Extends `scan` over units that continue its run, up to `end`. Returns -1 when the run is complete, or the
 * offset of an L2 table it needs that is not cached (then called again with it as `known`). Synchronous, so the
 * walk over thousands of clusters costs no promise per cluster and stays a small function for the JIT.
 */
function scanUnits(image: Qcow2Image, scan: UnitScan, end: number, known: { offset: number; table: Uint8Array } | undefined): number {
  const geometry = image.geometry;
  const { clusterSize, l2Entries, extendedL2 } = geometry;
  const unit = extendedL2 ? clusterSize / SUBCLUSTERS : clusterSize;
  const offset = scan.offset;
  let at = scan.at;
  while (at < end) {
    const clusterIndex = Math.floor(at / clusterSize);
    const l1Index = Math.floor(clusterIndex / l2Entries);
    let type: UnitType;
    let host: number | undefined;
    let runEnd: number;
    const l1Offset = l1Index * 8 < image.l1Table.length ? decodeL1Entry(image.name, image.l1Table, l1Index, geometry).l2Offset : 0;
    if (l1Offset === 0) {
      type = 'unallocated-plain';
      runEnd = (l1Index + 1) * l2Entries * clusterSize;
    } else {
      const table = known?.offset === l1Offset ? known.table : image.cachedL2(l1Offset);
      if (!table) {
        scan.at = at;
        return l1Offset;
      }
      const entry = readL2Entry(table, clusterIndex % l2Entries, geometry);
      const clusterStart = clusterIndex * clusterSize;
      const where = () => `L2 table ${hex(l1Offset)}, L2 index ${clusterIndex % l2Entries}, guest offset ${hex(clusterStart)}`;
      if (isCompressed(entry)) {
        type = 'compressed';
        runEnd = clusterStart + clusterSize;
      } else {
        const base = standardHostOffset(entry);
        const hasHost = base !== 0 || (geometry.externalData && isCopied(entry));
        if (hasHost && base % clusterSize !== 0) throw new CorruptImageError(image.name, `cluster allocation offset ${hex(base)} unaligned (${where()})`);
        if (!extendedL2) {
          if (entry.lo & 1 && geometry.version < 3) throw new CorruptImageError(image.name, `zero cluster entry in a version 2 image (${where()})`);
          if (entry.lo & 1) type = hasHost ? 'zero-alloc' : 'zero-plain';
          else type = hasHost ? 'normal' : 'unallocated-plain';
          host = hasHost ? base + (at - clusterStart) : undefined;
          runEnd = clusterStart + clusterSize;
        } else {
          const sub = Math.floor((at - clusterStart) / unit);
          const bit = 2 ** sub;
          if ((entry.zeroMask & entry.allocMask) !== 0) throw new CorruptImageError(image.name, `invalid subcluster bitmap (${where()})`);
          const zero = (Math.floor(entry.zeroMask / bit) & 1) === 1;
          const alloc = (Math.floor(entry.allocMask / bit) & 1) === 1;
          if (hasHost) type = zero ? 'zero-alloc' : alloc ? 'normal' : 'unallocated-alloc';
          else if (entry.allocMask !== 0) throw new CorruptImageError(image.name, `subclusters allocated in a cluster with no host offset (${where()})`);
          else type = zero ? 'zero-plain' : 'unallocated-plain';
          host = hasHost ? base + (at - clusterStart) : undefined;
          runEnd = clusterStart + (sub + 1) * unit;
        }
      }
    }
    const first = scan.first;
    if (!first) scan.first = { type, host };
    else if (type !== first.type || (first.host !== undefined && host !== first.host + (at - offset))) break;
    at = Math.min(runEnd, end);
  }
  scan.at = at;
  return -1;
}

async function qcowV1Status(image: QcowV1Image, offset: number, length: number): Promise<LayerStatus> {
  // QEMU's qcow driver answers one cluster at a time; qemu-img map merges the runs.
  const inCluster = offset % image.clusterSize;
  const n = Math.min(length, image.clusterSize - inCluster);
  const mapping = await image.mapCluster(offset);
  if (mapping.kind === 'unallocated') return { length: n, data: false, zero: false, allocated: false };
  // Compressed and encrypted data has no offset a reader could use (QEMU reports none either).
  if (mapping.kind === 'compressed' || image.header.cryptMethod !== 0) return { length: n, data: true, zero: false, allocated: true };
  return { length: n, data: true, zero: false, allocated: true, hostOffset: mapping.hostOffset + inCluster, file: image.store };
}

/**
 * QEMU's qcow2_detect_metadata_preallocation: more clusters have a refcount than the file occupies on disk
 * (with 10% slack), so most of the allocated clusters are holes in the file.
 */
async function detectMetadataPreallocation(image: Qcow2Image, options: BlockStatusOptions): Promise<boolean> {
  const allocated = await options.allocatedSize?.(image.store);
  if (allocated === undefined) return false;
  const clusterSize = image.clusterSize;
  const realClusters = Math.floor(allocated / clusterSize);
  const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
  const fileClusters = Math.ceil((await image.store.size()) / clusterSize);
  const { refcountTableOffset, refcountTableClusters, refcountOrder } = image.header;
  const table = await image.store.read(refcountTableOffset, refcountTableClusters * clusterSize);
  const perBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let count = 0;
  for (let blockIndex = 0; blockIndex * perBlock < fileClusters && count <= threshold; blockIndex++) {
    if (blockIndex * 8 + 8 > table.length) break;
    const blockOffset = u64(table, blockIndex * 8) - (u64(table, blockIndex * 8) % 512);
    if (blockOffset === 0 || blockOffset >= 2 ** 52) continue;
    const block = await image.store.read(blockOffset, clusterSize);
    if (block.length < clusterSize) continue;
    for (let i = 0; i < perBlock && blockIndex * perBlock + i < fileClusters && count <= threshold; i++) {
      if (getRefcount(block, i, refcountOrder) !== 0) count++;
    }
  }
  return count > threshold;
}

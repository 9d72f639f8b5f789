/**
 * Commit (qemu-img commit): merging what the upper layers of a backing chain define into a lower layer, and
 * emptying an overlay afterwards. Works on opened devices; the caller opens the chain and, separately and
 * read-write, the base it commits into (backing files of an open chain are always read-only).
 *
 * Why two handles on the base are safe: the copy reads from the top of the chain only ranges that some layer
 * ABOVE the base defines (data or zero), so no read ever reaches the chain's read-only view of the base, whose
 * caches go stale as the writable handle changes the file.
 */
import type { BlockDevice } from './device.js';
import { Qcow2Image } from './image.js';
import { RawImage } from './raw.js';
import { QcowV1Image } from './qcow1.js';
import { mapDevice, type MapEntry } from './block-status.js';
import { resizeQcow2 } from './resize.js';
import { putU64, u32 } from './bytes.js';
import { readL2Entry } from './mapping.js';
import { BackingChainError, UnsupportedError } from './errors.js';
import { backingOf } from './open.js';

/** Bytes copied per read/write request. */
const COPY_CHUNK = 4 * 1024 * 1024;
const L2_OFFSET_MASK = 0x00fffffffffffe00n;

export interface CommitProgress {
  /** Called with the fraction of the work done, 0..1. */
  progress?: (fraction: number) => void;
}

/** The layers of `top`'s backing chain, top first. */
export function chainLayers(top: BlockDevice): BlockDevice[] {
  const layers: BlockDevice[] = [];
  for (let device: BlockDevice | undefined = top; device; device = backingOf(device)) layers.push(device);
  return layers;
}

/**
 * The ranges of `top` (as block-status entries) that layers above depth `baseDepth` define: what a commit into
 * the layer at `baseDepth` has to copy. Zero entries are zeros some upper layer wrote (zero flags, discards).
 */
export async function rangesAbove(top: BlockDevice, baseDepth: number): Promise<MapEntry[]> {
  const entries = await mapDevice(top);
  return entries.filter((entry) => entry.present && entry.depth < baseDepth);
}

/**
 * Grows `base` to `size` bytes when it is smaller (qemu-img commit never shrinks a base), returning the device
 * to keep writing through (a raw image is reopened at its new size). As QEMU's truncate does, the new area of a
 * base whose own backing file reaches further is zero-filled so that backing file cannot show through there.
 */
export async function growBase(base: BlockDevice, size: number): Promise<BlockDevice> {
  if (base.virtualSize >= size) return base;
  if (base instanceof RawImage) {
    await base.store.truncate(size);
    return RawImage.open(base.store, { readOnly: false });
  }
  if (!(base instanceof Qcow2Image)) throw new UnsupportedError(base.name, 'format', `cannot grow a ${base.format} image to ${size} bytes`);
  const oldSize = base.virtualSize;
  await resizeQcow2(base, size);
  const below = base.backing;
  if (below && below.virtualSize > oldSize) {
    const end = Math.min(base.virtualSize, below.virtualSize);
    await base.writeZeroes(oldSize, end - oldSize);
  }
  return base;
}

/**
 * Copies into `base` every range of `top` defined above `baseDepth` (see rangesAbove): data as read through the
 * top of the chain, zeros as zero writes (unmapping, as QEMU's commit job does). `base` must be the layer at
 * `baseDepth`, opened read-write, and at least as large as `top`'s ranges reach (see growBase).
 */
export async function copyAbove(top: BlockDevice, baseDepth: number, base: BlockDevice, options: CommitProgress = {}): Promise<void> {
  const ranges = await rangesAbove(top, baseDepth);
  const total = ranges.reduce((sum, entry) => sum + entry.length, 0);
  let done = 0;
  options.progress?.(0);
  for (const entry of ranges) {
    const end = entry.start + entry.length;
    for (let at = entry.start; at < end; at += COPY_CHUNK) {
      const length = Math.min(COPY_CHUNK, end - at);
      if (entry.zero && !entry.data) await zeroRange(base, at, length);
      else await base.write(at, await top.read(at, length));
      done += length;
      options.progress?.(total ? done / total : 1);
    }
  }
  await base.flush();
  options.progress?.(1);
}

async function zeroRange(device: BlockDevice, offset: number, length: number): Promise<void> {
  if (device instanceof Qcow2Image) return device.writeZeroes(offset, length, { unmap: true });
  for (let at = offset; at < offset + length; at += COPY_CHUNK) await device.write(at, new Uint8Array(Math.min(COPY_CHUNK, offset + length - at)));
}

/**
 * Empties an overlay (QEMU's bdrv_make_empty after a commit): every cluster becomes unallocated so the backing
 * file shows through again, the clusters are freed, and without internal snapshots the L2 tables go too and the
 * file is truncated after the last cluster still in use.
 */
export async function makeEmpty(image: Qcow2Image): Promise<void> {
  const engine = await image.writer();
  await engine.exclusive(async () => {
    await engine.begin();
    const { l2Entries, l2EntryBytes } = image.geometry;
    const l1 = image.l1Table;
    const tables: number[] = [];
    for (let l1Index = 0; l1Index < image.header.l1Size; l1Index++) {
      if (l2OffsetAt(l1, l1Index) === 0) continue;
      const { offset, table } = await engine.l2ForWrite(l1Index);
      for (let i = 0; i < l2Entries; i++) engine.freeEntry(readL2Entry(table, i, image.geometry));
      table.fill(0, 0, l2Entries * l2EntryBytes);
      engine.markDirty(offset, table);
      tables.push(l1Index);
      await engine.maybeWriteBack();
    }
    await engine.writeBack();
    // L2 tables shared with snapshots are still needed by them; without snapshots every table can go.
    if (image.snapshots.length === 0) {
      for (const l1Index of tables) {
        const l2Offset = l2OffsetAt(l1, l1Index);
        putU64(l1, l1Index * 8, 0);
        engine.markL1Dirty(l1Index);
        image.l2Cache.delete(l2Offset);
        engine.metadata.removeRange(l2Offset, engine.clusterSize);
        engine.freeLater(l2Offset, engine.clusterSize);
      }
      // The L1 entries reach the file (and are flushed) before the tables' clusters are freed: writeBack's order.
      await engine.writeBack();
      const end = (await engine.refcounts.usedEnd()) * engine.clusterSize;
      if (end < (await engine.store.size())) await engine.store.truncate(end);
    }
    await engine.flush();
  });
}

function l2OffsetAt(l1: Uint8Array, index: number): number {
  return Number(((BigInt(u32(l1, index * 8)) << 32n) | BigInt(u32(l1, index * 8 + 4))) & L2_OFFSET_MASK);
}

/** Refuses to commit what cannot be emptied or has nothing to commit into, with qemu-img's wording. */
export function checkCommittable(top: BlockDevice, emptying: boolean): void {
  if (!backingOf(top)) throw new BackingChainError(top.name, 'Image does not have a backing file');
  if (emptying && !(top instanceof Qcow2Image)) {
    const kind = top instanceof QcowV1Image ? 'qcow (version 1)' : top.format;
    throw new UnsupportedError(top.name, 'format', `emptying a ${kind} image after a commit is not supported (use -d to keep it as it is)`);
  }
}

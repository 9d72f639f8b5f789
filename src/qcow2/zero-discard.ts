/**
 * Zero writes and discard: whole clusters (or subclusters with extended L2) change their L2 entries only (zero
 * flag / zero bits, or unallocated); what is not a whole unit gets real zeros through the write path. Clusters
 * given up are freed after the next write-back, like every other free (see write-path.ts).
 */
import { putU32, putU64, u32 } from './bytes.js';
import { SUBCLUSTERS, isCompressed, isCopied, readL2Entry, standardHostOffset, type L2Entry } from './mapping.js';
import type { WriteEngine, ZeroOptions } from './write-path.js';

const ALL_SUBCLUSTERS = 0xffffffff;

/** Zero writes: the zero flag (or zero subcluster bits) on whole units, real zeros on the unaligned rest. */
export async function writeZeroes(engine: WriteEngine, offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
  await engine.begin();
  const cs = engine.clusterSize;
  const { extendedL2, l2Entries } = engine.image.geometry;
  const unit = extendedL2 ? cs / SUBCLUSTERS : cs;
  const end = offset + length;
  const v2 = engine.header.version === 2;
  const backing = engine.image.backing !== undefined;
  // In v2 images without a backing file, unallocated reads as zero; with one, zeros have to be written.
  // A raw external data file must itself read as the guest disk, so zeros are written there.
  const canFlag = (!v2 || !backing) && !engine.image.dataFileRaw;
  const alignedStart = Math.min(end, Math.ceil(offset / unit) * unit);
  const alignedEnd = Math.max(alignedStart, Math.floor(end / unit) * unit);
  const lastPartial = end === engine.image.virtualSize && end % unit !== 0;
  const flagEnd = lastPartial ? end : alignedEnd;
  if (!canFlag || alignedStart >= flagEnd) {
    await writeZeroBytes(engine, offset, length);
    return;
  }
  if (offset < alignedStart) await writeZeroBytes(engine, offset, alignedStart - offset);
  let at = alignedStart;
  while (at < flagEnd) {
    const cluster = Math.floor(at / cs);
    const clusterEnd = Math.min((cluster + 1) * cs, flagEnd);
    const { offset: l2Offset, table } = await engine.l2ForWrite(Math.floor(cluster / l2Entries));
    const l2Index = cluster % l2Entries;
    const entry = readL2Entry(table, l2Index, engine.image.geometry);
    const whole = at === cluster * cs && (clusterEnd === (cluster + 1) * cs || clusterEnd >= engine.image.virtualSize);
    if (!extendedL2 || whole) {
      zeroWholeCluster(engine, table, l2Index, entry, options.unmap === true, v2);
      engine.markDirty(l2Offset, table);
    } else if (isCompressed(entry) || (standardHostOffset(entry) !== 0 && !isCopied(entry))) {
      // Subclusters of a cluster we do not own: go through the copy-on-write path.
      await writeZeroBytes(engine, at, clusterEnd - at);
    } else {
      const sub = cs / SUBCLUSTERS;
      let mask = 0;
      for (let s = (at - cluster * cs) / sub; s < Math.ceil((clusterEnd - cluster * cs) / sub); s++) mask |= 1 << s;
      putU32(table, l2Index * 16 + 8, (entry.zeroMask | mask) >>> 0);
      putU32(table, l2Index * 16 + 12, (entry.allocMask & ~mask) >>> 0);
      engine.markDirty(l2Offset, table);
    }
    at = clusterEnd;
  }
  if (flagEnd < end) await writeZeroBytes(engine, flagEnd, end - flagEnd);
  await engine.maybeWriteBack();
}

function zeroWholeCluster(engine: WriteEngine, table: Uint8Array, l2Index: number, entry: L2Entry, unmap: boolean, v2: boolean): void {
  const extendedL2 = engine.image.geometry.extendedL2;
  const external = engine.image.dataStore !== undefined;
  const host = standardHostOffset(entry);
  const owned = !isCompressed(entry) && (host !== 0 || (external && isCopied(entry))) && isCopied(entry);
  const keep = owned && !unmap && !v2 && !external;
  if (!keep) engine.freeEntry(entry);
  const at = l2Index * (extendedL2 ? 16 : 8);
  if (keep) {
    // Keep the host cluster (reads as zero, still allocated), as QEMU does without unmap.
    if (extendedL2) {
      putU32(table, at + 8, ALL_SUBCLUSTERS);
      putU32(table, at + 12, 0);
    } else {
      putU32(table, at + 4, (u32(table, at + 4) | 1) >>> 0);
    }
    return;
  }
  putU64(table, at, 0);
  if (extendedL2) {
    putU32(table, at + 8, ALL_SUBCLUSTERS);
    putU32(table, at + 12, 0);
  } else if (!v2) {
    putU32(table, at + 4, 1);
  }
}

export async function writeZeroBytes(engine: WriteEngine, offset: number, length: number): Promise<void> {
  const chunk = 4 * 1024 * 1024;
  for (let at = offset; at < offset + length; at += chunk) await engine.write(at, new Uint8Array(Math.min(chunk, offset + length - at)));
}

/**
 * Discard: whole clusters only (a partial one is left alone, as QEMU's block layer does). v3 images then read
 * zeros there; v2 images lose the cluster, or keep it when a backing file would show through.
 */
export async function discard(engine: WriteEngine, offset: number, length: number): Promise<void> {
  await engine.begin();
  const cs = engine.clusterSize;
  const { l2Entries, extendedL2 } = engine.image.geometry;
  const end = offset + length;
  const first = Math.ceil(offset / cs);
  const lastCluster = end >= engine.image.virtualSize ? Math.ceil(end / cs) : Math.floor(end / cs);
  const v2 = engine.header.version === 2;
  const backing = engine.image.backing !== undefined;
  if (v2 && backing) return;
  if (engine.image.dataFileRaw) {
    // The raw data file must keep reading as the guest disk: discarded clusters read as zeros there too.
    if (lastCluster > first) await writeZeroBytes(engine, first * cs, Math.min(lastCluster * cs, engine.image.virtualSize) - first * cs);
    return;
  }
  for (let cluster = first; cluster < lastCluster; cluster++) {
    const l1Index = Math.floor(cluster / l2Entries);
    if (u32(engine.image.l1Table, l1Index * 8 + 4) === 0 && u32(engine.image.l1Table, l1Index * 8) === 0 && !backing) {
      cluster = (l1Index + 1) * l2Entries - 1;
      continue;
    }
    const { offset: l2Offset, table } = await engine.l2ForWrite(l1Index);
    const l2Index = cluster % l2Entries;
    const entry = readL2Entry(table, l2Index, engine.image.geometry);
    engine.freeEntry(entry);
    const at = l2Index * (extendedL2 ? 16 : 8);
    putU64(table, at, 0);
    if (extendedL2) {
      putU32(table, at + 8, backing ? ALL_SUBCLUSTERS : 0);
      putU32(table, at + 12, 0);
    } else if (!v2 && backing) {
      putU32(table, at + 4, 1);
    }
    engine.markDirty(l2Offset, table);
  }
  await engine.maybeWriteBack();
}

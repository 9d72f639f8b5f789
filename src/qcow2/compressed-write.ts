/**
 * Compressed clusters for convert -c: one whole guest cluster compressed with the image's codec, packed
 * byte-tightly after the previous compressed cluster as QEMU packs them.
 */
import { FormatError, UnsupportedError } from './errors.js';
import { putU64 } from './bytes.js';
import { encodeCompressed, readL2Entry } from './mapping.js';
import { compressCluster } from './compression.js';
import type { WriteEngine } from './write-path.js';

/** Refuses compressed writes where QEMU does: with an external data file, and to an encrypted image. */
export function checkCompressible(engine: WriteEngine): void {
  if (engine.image.dataStore) throw new FormatError(engine.image.name, 'compressed writes are not possible with an external data file', { field: 'data file' });
  // QEMU stores compressed clusters unencrypted and refuses to write them to an encrypted image.
  if (engine.image.header.cryptMethod !== 0) throw new UnsupportedError(engine.image.name, 'encryption', 'Compression and encryption not supported at the same time');
}

/**
 * Writes one whole guest cluster compressed (for convert -c). The cluster must not be allocated yet. Data that
 * does not compress below a cluster is written as a normal cluster, as QEMU does.
 */
export async function writeCompressed(engine: WriteEngine, clusterIndex: number, data: Uint8Array): Promise<void> {
  checkCompressible(engine);
  await placeCompressed(engine, clusterIndex, data, await compressCluster(engine.image.compressionType, data, engine.clusterSize, engine.image.codecs));
}

/**
 * Stores guest cluster `clusterIndex` as `compressed` (its compressed form, computed by the caller; undefined
 * when it did not compress, and then `data` goes in as a normal cluster). Compression is the expensive part and
 * may run anywhere and in any order; placing is what decides the file's layout, and runs in cluster order.
 */
export async function placeCompressed(engine: WriteEngine, clusterIndex: number, data: Uint8Array, compressed: Uint8Array | undefined): Promise<void> {
  checkCompressible(engine);
  await engine.begin();
  const cs = engine.clusterSize;
  if (!compressed) {
    await engine.write(clusterIndex * cs, data.length === cs ? data : padTo(data, cs));
    return;
  }
  const { l2Entries, extendedL2 } = engine.image.geometry;
  const { offset: l2Offset, table } = await engine.l2ForWrite(Math.floor(clusterIndex / l2Entries));
  const l2Index = clusterIndex % l2Entries;
  const old = readL2Entry(table, l2Index, engine.image.geometry);
  const host = await allocateBytes(engine, compressed.length);
  await engine.guard(host, compressed.length, 'data');
  await engine.store.write(host, compressed);
  const at = l2Index * (extendedL2 ? 16 : 8);
  putU64(table, at, encodeCompressed(host, compressed.length, engine.header.clusterBits));
  if (extendedL2) putU64(table, at + 8, 0);
  engine.freeEntry(old);
  engine.markDirty(l2Offset, table);
  await engine.maybeWriteBack();
}

/**
 * Byte-granular space for compressed data, packed right after the previous compressed cluster. A host
 * cluster's refcount counts the compressed clusters that touch it; a run that crosses into the next cluster
 * needs that cluster to be the next free one, or it starts afresh.
 */
async function allocateBytes(engine: WriteEngine, size: number): Promise<number> {
  const cs = engine.clusterSize;
  let offset = engine.compressedCursor;
  // A cluster shared by as many compressed clusters as its refcount can count is full, whatever room it has left.
  if (offset !== 0 && offset % cs !== 0 && (await engine.refcounts.get(Math.floor(offset / cs))) < engine.refcounts.max) {
    const cluster = Math.floor(offset / cs);
    const room = (cluster + 1) * cs - offset;
    if (size <= room) {
      await engine.refcounts.change(cluster, 1);
      engine.compressedCursor = offset + size;
      return offset;
    }
    const extra = Math.ceil((size - room) / cs);
    const next = await engine.refcounts.allocate(extra);
    if (next === (cluster + 1) * cs) {
      await engine.refcounts.change(cluster, 1);
      engine.compressedCursor = offset + size;
      return offset;
    }
    // Not contiguous: nothing points at these clusters yet, so they can be returned at once.
    for (let i = 0; i < extra; i++) await engine.refcounts.change(next / cs + i, -1);
  }
  offset = await engine.refcounts.allocate(Math.ceil(size / cs));
  engine.compressedCursor = offset + size;
  return offset;
}

function padTo(data: Uint8Array, size: number): Uint8Array {
  const out = new Uint8Array(size);
  out.set(data);
  return out;
}

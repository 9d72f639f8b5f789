/**
 * Resizing the virtual disk as qemu-img resize does. Growing extends the L1 table (l1-table.ts). Shrinking
 * drops every cluster wholly past the new end (full discard: the entries become unallocated, so neither a
 * backing file nor stale data shows through if the disk grows again), frees L2 tables that now lie wholly past
 * the end while keeping the L1 table's size (QEMU keeps it too), drops refcount blocks that now count nothing
 * but themselves, then truncates the file after the last cluster still in use.
 */
import { FormatError } from './errors.js';
import { requiredL1Size } from './header.js';
import { growDisk } from './l1-table.js';
import { putU64, u64big } from './bytes.js';
import { readL2Entry } from './mapping.js';
import type { Qcow2Image } from './image.js';
import type { WriteEngine } from './write-path.js';

const L2_OFFSET_MASK = 0x00fffffffffffe00n;

export async function resizeQcow2(image: Qcow2Image, newSize: number): Promise<void> {
  if (!Number.isSafeInteger(newSize) || newSize < 0) throw new FormatError(image.name, `invalid size ${newSize}`, { field: 'size', value: newSize });
  // The virtual size is kept in whole sectors, as QEMU keeps it.
  const size = Math.ceil(newSize / 512) * 512;
  const engine = await image.writer();
  await engine.exclusive(async () => {
    if (size >= image.header.size) return growDisk(engine, size);
    return shrink(engine, size);
  });
}

async function shrink(engine: WriteEngine, size: number): Promise<void> {
  const image = engine.image;
  const header = image.header;
  const cs = engine.clusterSize;
  const { l2Entries, l2EntryBytes } = image.geometry;
  await engine.begin();
  const firstGone = Math.ceil(size / cs);
  const keepL1 = requiredL1Size(size, header.clusterBits, image.geometry.extendedL2);
  const l1 = image.l1Table;
  const droppedTables: number[] = [];
  for (let l1Index = Math.floor(firstGone / l2Entries); l1Index < header.l1Size; l1Index++) {
    const l2Offset = l2OffsetAt(l1, l1Index);
    if (l2Offset === 0) continue;
    const { table } = await engine.l2ForWrite(l1Index);
    const from = Math.max(0, firstGone - l1Index * l2Entries);
    for (let i = from; i < l2Entries; i++) {
      engine.freeEntry(readL2Entry(table, i, image.geometry));
      table.fill(0, i * l2EntryBytes, (i + 1) * l2EntryBytes);
    }
    // l2ForWrite may have moved a shared table (copy-on-write after a snapshot): take the offset it gives.
    const current = l2OffsetAt(l1, l1Index);
    engine.markDirty(current, table);
    if (l1Index >= keepL1) droppedTables.push(l1Index);
  }
  await engine.writeBack();
  // L2 tables wholly past the end: the L1 entry goes first (durably), the table's cluster after.
  for (const l1Index of droppedTables) {
    const l2Offset = l2OffsetAt(l1, l1Index);
    putU64(l1, l1Index * 8, 0);
    engine.markL1Dirty(l1Index);
    await engine.writeBack();
    image.l2Cache.delete(l2Offset);
    engine.metadata.removeRange(l2Offset, cs);
    engine.freeLater(l2Offset, cs);
  }
  header.size = size;
  await engine.writeHeader();
  await engine.store.flush();
  await engine.writeBack();
  // Refcount blocks left counting nothing go, as in QEMU, so the truncation below can reach behind them.
  for (const offset of await engine.refcounts.dropUnusedBlocks()) engine.metadata.removeRange(offset, cs);
  await engine.store.flush();
  const end = (await engine.refcounts.usedEnd()) * cs;
  if (end < (await engine.store.size())) await engine.store.truncate(end);
}

function l2OffsetAt(l1: Uint8Array, index: number): number {
  return Number(u64big(l1, index * 8) & L2_OFFSET_MASK);
}

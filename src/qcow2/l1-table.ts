/**
 * Growing the active L1 table (disk resize, VM state past the disk end, reverting to a snapshot of a larger
 * disk). The new table is written and made durable before the header points at it; the old one is freed after.
 */
import { FormatError } from './errors.js';
import { MAX_L1_BYTES, requiredL1Size } from './header.js';
import type { WriteEngine } from './write-path.js';

export async function growL1(engine: WriteEngine, minEntries: number): Promise<void> {
  const image = engine.image;
  const header = image.header;
  if (minEntries <= header.l1Size) return;
  if (minEntries * 8 > MAX_L1_BYTES) throw new FormatError(image.name, `an L1 table of ${minEntries} entries exceeds QEMU's limit of 32 MiB`, { field: 'l1_size', value: minEntries });
  // The on-disk table must match memory before it is copied.
  await engine.writeBack();
  const cs = engine.clusterSize;
  const clusters = Math.ceil((minEntries * 8) / cs);
  const offset = await engine.allocateMetadata(clusters, 'active L1 table');
  const table = new Uint8Array(minEntries * 8);
  table.set(image.l1Table);
  // Counts for the new table, then the table, then the header that points at it: each durable before the next.
  await engine.refcounts.writeBack();
  await engine.store.flush();
  await engine.store.write(offset, table);
  await engine.store.flush();
  const oldOffset = header.l1TableOffset;
  const oldSize = header.l1Size;
  header.l1TableOffset = offset;
  header.l1Size = minEntries;
  await engine.writeHeader();
  await engine.store.flush();
  image.l1Table = table;
  engine.metadata.removeRange(oldOffset, oldSize * 8);
  engine.metadata.addRange(offset, minEntries * 8, 'active L1 table');
  if (oldSize > 0) {
    const first = oldOffset / cs;
    for (let c = first; c < first + Math.ceil((oldSize * 8) / cs); c++) await engine.refcounts.change(c, -1);
    await engine.refcounts.writeBack();
    await engine.store.flush();
  }
}

/** Grows the virtual disk (the new space reads as zeros, or from the backing file where it reaches). */
export async function growDisk(engine: WriteEngine, newSize: number): Promise<void> {
  const header = engine.image.header;
  if (newSize < header.size) throw new FormatError(engine.image.name, `shrinking from ${header.size} to ${newSize} bytes is not supported by growDisk`, { field: 'size', value: newSize });
  await engine.begin();
  await growL1(engine, requiredL1Size(newSize, header.clusterBits, engine.image.geometry.extendedL2));
  header.size = newSize;
  await engine.writeHeader();
  await engine.store.flush();
}

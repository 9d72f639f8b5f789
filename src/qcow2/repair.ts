/**
 * Repairing refcounts from a check's recomputed references (qemu-img check -r leaks|all), and rebuilding them
 * from scratch when the refcount structures themselves are damaged or after a lazy-refcounts crash.
 */
import { putU64 } from './bytes.js';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES } from './header.js';
import { Refcounts, maxRefcount, setRefcount } from './refcount.js';
import { FormatError } from './errors.js';
import { analyse, type Analysis, type RepairMode } from './check.js';
import { rebuildCopiedFlags, replaceSnapshotTable } from './snapshot-ops.js';
import type { Qcow2Image } from './image.js';

export async function repairRefcounts(image: Qcow2Image, analysis: Analysis, mode: RepairMode): Promise<void> {
  const engine = await image.writer();
  await engine.exclusive(async () => {
    const refs = analysis.references;
    let rebuild = analysis.brokenTable && mode === 'all';
    if (!rebuild) {
      const adjustments: [number, number][] = [];
      for (let c = 0; c < refs.extent; c++) {
        const stored = analysis.stored(c);
        const computed = refs.get(c);
        if (stored === computed || (mode === 'leaks' && stored < computed)) continue;
        // Raising a count whose refcount block does not exist would allocate space the check saw as used.
        if (stored < computed && (await engine.refcounts.get(c)) === 0 && !engine.refcounts.table[Math.floor(c / engine.refcounts.blockEntries)]) {
          rebuild = true;
          break;
        }
        adjustments.push([c, computed - stored]);
      }
      if (!rebuild) {
        for (const [c, delta] of adjustments) await engine.refcounts.change(c, delta);
        await engine.refcounts.writeBack();
        await engine.store.flush();
      }
    }
    if (rebuild) await rebuildRefcounts(image, analysis);
    if (mode === 'all') {
      await rebuildCopiedFlags(engine);
      if (image.header.incompatibleFeatures & INCOMPAT_CORRUPT) {
        image.header.incompatibleFeatures &= ~INCOMPAT_CORRUPT;
        await engine.writeHeader();
        await engine.store.flush();
      }
    }
  });
}

/** Rewrites the snapshot table in the current encoding: every entry gets its full extra data (qemu-img check -r all). */
export async function repairSnapshotTable(image: Qcow2Image): Promise<void> {
  const engine = await image.writer();
  await engine.exclusive(() => replaceSnapshotTable(engine, [...image.snapshots]));
}

/**
 * Writes a complete new set of refcount structures past everything in use, describing the clusters' counts and
 * themselves, then switches the header to it. The old table and blocks simply stop being referenced (their
 * clusters count 0). The counts are the recomputed references (a repair), or the stored ones carried over (a
 * change of width, `order`, which the same header write switches to).
 */
export async function rebuildRefcounts(image: Qcow2Image, analysis: Analysis, options: { order?: number; counts?: 'references' | 'stored' } = {}): Promise<void> {
  const engine = await image.writer();
  const header = image.header;
  const cs = image.clusterSize;
  const order = options.order ?? header.refcountOrder;
  const e = (cs * 8) >>> order;
  const max = maxRefcount(order);
  const refs = analysis.references;
  const countOf = options.counts === 'stored' ? analysis.stored : (c: number) => refs.get(c);
  const start = refs.extent;
  let total = Math.max(1, Math.ceil(start / e));
  let tableEntries = 0;
  let tableClusters = 0;
  for (;;) {
    tableEntries = Math.ceil(total / (cs / 8)) * (cs / 8);
    tableClusters = (tableEntries * 8) / cs;
    const need = Math.ceil((start + total + tableClusters) / e);
    if (need <= total) break;
    total = need;
  }
  if (tableEntries * 8 > MAX_REFTABLE_BYTES) throw new FormatError(image.name, 'rebuilding the refcounts needs a refcount table over 8 MiB', { field: 'refcount_table_clusters' });
  const table = new Uint8Array(tableEntries * 8);
  for (let b = 0; b < total; b++) {
    const block = new Uint8Array(cs);
    for (let i = 0; i < e; i++) {
      const c = b * e + i;
      let value = 0;
      if (c < start) value = analysis.refcountStructure.has(c) ? countOf(c) - 1 : countOf(c);
      else if (c < start + total + tableClusters) value = 1;
      if (value > 0) setRefcount(block, i, order, Math.min(value, max));
    }
    await engine.store.write((start + b) * cs, block);
    putU64(table, b * 8, (start + b) * cs);
  }
  await engine.store.flush();
  await engine.store.write((start + total) * cs, table);
  await engine.store.flush();
  header.refcountTableOffset = (start + total) * cs;
  header.refcountTableClusters = tableClusters;
  header.refcountOrder = order;
  await engine.writeHeader();
  await engine.store.flush();
  await engine.reloadRefcounts();
}

/**
 * A lazy-refcounts image left dirty (its writer died): refcounts may be stale, so they are recomputed and
 * repaired before anything is written, and the dirty bit is cleared.
 */
export async function repairDirtyImage(image: Qcow2Image): Promise<void> {
  const analysis = await analyse(image);
  if (analysis.result.leaks || analysis.result.corruptions) await repairRefcounts(image, analysis, 'all');
  const engine = await image.writer();
  await engine.exclusive(async () => {
    image.header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
    await engine.writeHeader();
    await engine.store.flush();
  });
}

export { Refcounts };

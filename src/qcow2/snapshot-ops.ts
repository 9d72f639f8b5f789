/**
 * Internal snapshots: create (with an optional VM-state blob), apply (revert), delete, and reading a snapshot's
 * VM state back.
 *
 * A snapshot is a copy of the active L1 table; everything reachable from it gets one more reference. Data and
 * L2 tables shared this way lose their COPIED flag, so the next guest write to them copies first. Every step
 * makes counts durable before a table that relies on them, and switches the header before anything is freed:
 * a crash leaves leaked clusters at worst.
 */
import { FormatError } from './errors.js';
import { hex, putU32, u32 } from './bytes.js';
import { requiredL1Size } from './header.js';
import { decodeCompressed, isCompressed, isCopied, readL2Entry, standardHostOffset } from './mapping.js';
import { encodeSnapshotTable, findSnapshot, readSnapshotL1, snapshotTableBytes, type Snapshot } from './snapshots.js';
import { growL1 } from './l1-table.js';
import type { WriteEngine } from './write-path.js';
import type { Qcow2Image } from './image.js';

const TWO_32 = 2 ** 32;
const COPIED = 0x80000000;

export interface SnapshotOptions {
  /** Machine state saved with the snapshot (v86 state); stored past the disk end through the snapshot's L1. */
  vmState?: Uint8Array;
  /** Nanoseconds of guest clock (QEMU's vm_clock_nsec). */
  vmClockNsec?: number;
  /** Wall-clock time of the snapshot; default now. */
  date?: Date;
  /**
   * Allow a name another snapshot already has (IDs stay unique; the format does not require unique names). A
   * caller replacing a snapshot writes the new one completely first and deletes the old one by ID afterwards, so
   * a crash in between leaves both rather than neither.
   */
  allowSameName?: boolean;
  /**
   * Guest instruction count (QEMU's icount); undefined is stored as -1, "not recorded", as QEMU's savevm does
   * outside record/replay. qemu-img snapshot -c stores 0.
   */
  icount?: number;
}

function l2OffsetAt(l1: Uint8Array, index: number): number {
  return (u32(l1, index * 8) & 0x00ffffff) * TWO_32 + ((u32(l1, index * 8 + 4) & 0xfffffe00) >>> 0);
}

/** Where VM state starts for a disk of `diskSize` bytes: the first L2 range wholly past the disk, as in QEMU. */
export function vmStateOffset(image: Qcow2Image, diskSize: number): number {
  const { clusterSize, l2Entries, extendedL2 } = image.geometry;
  return requiredL1Size(diskSize, image.header.clusterBits, extendedL2) * l2Entries * clusterSize;
}

/** Adds `delta` to the count of every L2 table and host cluster reachable from `l1`. */
async function changeTree(engine: WriteEngine, l1: Uint8Array, delta: number): Promise<void> {
  const cs = engine.clusterSize;
  const geometry = engine.image.geometry;
  const external = engine.image.dataStore !== undefined;
  for (let i = 0; i < l1.length / 8; i++) {
    const l2Offset = l2OffsetAt(l1, i);
    if (l2Offset === 0) continue;
    const table = await engine.loadL2(l2Offset);
    for (let j = 0; j < geometry.l2Entries; j++) {
      const entry = readL2Entry(table, j, geometry);
      if (isCompressed(entry)) {
        const { hostOffset, compressedLength } = decodeCompressed(entry, geometry.clusterBits);
        for (let c = Math.floor(hostOffset / cs); c <= Math.floor((hostOffset + compressedLength - 1) / cs); c++) await engine.refcounts.change(c, delta);
        continue;
      }
      const host = standardHostOffset(entry);
      if (host !== 0 && !external) await engine.refcounts.change(host / cs, delta);
    }
    await engine.refcounts.change(l2Offset / cs, delta);
  }
}

/**
 * Sets COPIED on the active L1 and L2 entries exactly where the refcount is 1 (QEMU's rule), rewriting only the
 * tables that change. With an external data file the L2 COPIED bit means "allocated" and is left alone.
 */
export async function rebuildCopiedFlags(engine: WriteEngine): Promise<void> {
  const image = engine.image;
  const cs = engine.clusterSize;
  const geometry = image.geometry;
  const l1 = image.l1Table;
  const external = image.dataStore !== undefined;
  for (let i = 0; i < l1.length / 8; i++) {
    const l2Offset = l2OffsetAt(l1, i);
    if (l2Offset === 0) continue;
    const own = (await engine.refcounts.get(l2Offset / cs)) === 1;
    const hi = u32(l1, i * 8);
    const wantHi = (own ? hi | COPIED : hi & ~COPIED) >>> 0;
    if (wantHi !== hi) {
      putU32(l1, i * 8, wantHi);
      engine.markL1Dirty(i);
    }
    if (external) continue;
    const table = await engine.loadL2(l2Offset);
    let changed = false;
    for (let j = 0; j < geometry.l2Entries; j++) {
      const entry = readL2Entry(table, j, geometry);
      if (isCompressed(entry)) continue;
      const host = standardHostOffset(entry);
      const want = host !== 0 && own && (await engine.refcounts.get(host / cs)) === 1;
      if (want !== isCopied(entry)) {
        putU32(table, j * geometry.l2EntryBytes, (want ? entry.hi | COPIED : entry.hi & ~COPIED) >>> 0);
        changed = true;
      }
    }
    if (changed) engine.markDirty(l2Offset, table);
  }
  await engine.writeBack();
}

/** Writes a new snapshot table (or none), switches the header to it, then frees the old one. */
export async function replaceSnapshotTable(engine: WriteEngine, snapshots: Snapshot[]): Promise<void> {
  const image = engine.image;
  const header = image.header;
  const cs = engine.clusterSize;
  const oldOffset = header.snapshotsOffset;
  const oldBytes = header.nbSnapshots ? snapshotTableBytes(image.snapshots) : 0;
  const bytes = encodeSnapshotTable(snapshots);
  let offset = 0;
  if (snapshots.length) {
    offset = await engine.allocateMetadata(Math.ceil(bytes.length / cs), 'snapshot table');
    await engine.refcounts.writeBack();
    await engine.store.flush();
    await engine.store.write(offset, bytes);
    await engine.store.flush();
  }
  header.snapshotsOffset = offset;
  header.nbSnapshots = snapshots.length;
  await engine.writeHeader();
  await engine.store.flush();
  image.snapshots.splice(0, image.snapshots.length, ...snapshots);
  // The table on disk is now in our encoding, whatever older extra-data sizes it had.
  for (const snapshot of image.snapshots) {
    snapshot.storedSize = undefined;
    snapshot.storedExtraSize = undefined;
    snapshot.storedAt = undefined;
  }
  if (oldBytes > 0) {
    for (let c = oldOffset / cs; c < oldOffset / cs + Math.ceil(oldBytes / cs); c++) await engine.refcounts.change(c, -1);
  }
  // The old table's clusters may be allocated again by the caller's next step (an L2 copy when the active image
  // lets go of VM state): the overlap guard must stop calling them the snapshot table.
  engine.rebuildMetadataMap();
  await engine.refcounts.writeBack();
  await engine.store.flush();
}

function nextId(snapshots: Snapshot[]): string {
  let max = 0;
  for (const s of snapshots) {
    const n = Number.parseInt(s.id, 10);
    if (Number.isFinite(n) && n > max) max = n;
  }
  return String(max + 1);
}

export async function createSnapshot(engine: WriteEngine, name: string, options: SnapshotOptions = {}): Promise<Snapshot> {
  const image = engine.image;
  const header = image.header;
  const cs = engine.clusterSize;
  if (!options.allowSameName && image.snapshots.some((s) => s.name === name)) throw new FormatError(image.name, `a snapshot named '${name}' already exists`, { field: 'snapshot', value: name });
  await engine.begin();
  const vmState = options.vmState ?? new Uint8Array(0);
  const vmOffset = vmStateOffset(image, header.size);
  if (vmState.length) {
    const need = Math.ceil((vmOffset + vmState.length) / (image.geometry.l2Entries * cs));
    await growL1(engine, need);
    await engine.write(vmOffset, vmState);
  }
  await engine.writeBack();

  // 1. Everything reachable gets its extra reference, durable before any table claims to share it.
  const l1 = image.l1Table;
  await changeTree(engine, l1, 1);
  const l1Clusters = Math.ceil((header.l1Size * 8) / cs);
  const l1Offset = header.l1Size ? await engine.allocateMetadata(l1Clusters, 'inactive L1 table') : 0;
  await engine.refcounts.writeBack();
  await engine.store.flush();
  // 2. Shared tables and clusters lose COPIED (writes to them will copy first); the copy of the L1 is written.
  await rebuildCopiedFlags(engine);
  if (header.l1Size) {
    await engine.store.write(l1Offset, l1.slice());
    await engine.store.flush();
  }
  // 3. The snapshot table naming it, then the header.
  const now = options.date ?? new Date();
  const snapshot: Snapshot = {
    l1TableOffset: l1Offset,
    l1Size: header.l1Size,
    id: nextId(image.snapshots),
    name,
    dateSec: Math.floor(now.getTime() / 1000),
    dateNsec: (now.getTime() % 1000) * 1e6,
    vmClockNsec: options.vmClockNsec ?? 0,
    vmStateSize: vmState.length,
    diskSize: image.virtualSize,
    icount: options.icount,
    extraUnknown: new Uint8Array(0),
  };
  await replaceSnapshotTable(engine, [...image.snapshots, snapshot]);
  // 4. The VM state is the snapshot's alone: the active image lets go of it.
  if (vmState.length) {
    await engine.unmapRange(vmOffset, vmState.length);
    await engine.writeBack();
  }
  engine.rebuildMetadataMap();
  return snapshot;
}

async function readL1(image: Qcow2Image, snapshot: Snapshot): Promise<Uint8Array> {
  return readSnapshotL1(image.store, snapshot, image.clusterSize);
}

function find(image: Qcow2Image, idOrName: string): Snapshot {
  const snapshot = findSnapshot(image.snapshots, idOrName);
  if (!snapshot) throw new FormatError(image.name, `no snapshot with ID or name '${idOrName}'`, { field: 'snapshot', value: idOrName });
  return snapshot;
}

/** Reverts the active disk to a snapshot (its size included); the snapshot itself stays. */
export async function applySnapshot(engine: WriteEngine, idOrName: string): Promise<void> {
  const image = engine.image;
  const header = image.header;
  const snapshot = find(image, idOrName);
  await engine.begin();
  await engine.writeBack();
  const snapshotL1 = await readL1(image, snapshot);
  if (snapshot.l1Size > header.l1Size) await growL1(engine, snapshot.l1Size);
  const next = new Uint8Array(header.l1Size * 8);
  next.set(snapshotL1);
  // The snapshot's tree gains the active image as a referrer before the active L1 points at it.
  await changeTree(engine, next, 1);
  await engine.refcounts.writeBack();
  await engine.store.flush();
  const previous = image.l1Table;
  await engine.store.write(header.l1TableOffset, next);
  await engine.store.flush();
  image.l1Table = next;
  image.l2Cache.clear();
  if (snapshot.diskSize !== image.virtualSize) {
    header.size = snapshot.diskSize;
    await engine.writeHeader();
    await engine.store.flush();
  }
  // Only now may the old tree lose its reference.
  await changeTree(engine, previous, -1);
  await engine.refcounts.writeBack();
  await engine.store.flush();
  await rebuildCopiedFlags(engine);
  engine.rebuildMetadataMap();
}

export async function deleteSnapshot(engine: WriteEngine, idOrName: string): Promise<void> {
  const image = engine.image;
  const cs = engine.clusterSize;
  const snapshot = find(image, idOrName);
  await engine.begin();
  await engine.writeBack();
  const snapshotL1 = await readL1(image, snapshot);
  // Unhook it first: from then on nothing on disk refers to its tree through it.
  await replaceSnapshotTable(engine, image.snapshots.filter((s) => s !== snapshot));
  await changeTree(engine, snapshotL1, -1);
  if (snapshot.l1Size) {
    const first = snapshot.l1TableOffset / cs;
    for (let c = first; c < first + Math.ceil((snapshot.l1Size * 8) / cs); c++) await engine.refcounts.change(c, -1);
  }
  await engine.refcounts.writeBack();
  await engine.store.flush();
  await rebuildCopiedFlags(engine);
  engine.rebuildMetadataMap();
}

/** The VM state saved with a snapshot (empty when it has none). */
export async function readVmState(image: Qcow2Image, snapshot: Snapshot): Promise<Uint8Array> {
  if (snapshot.vmStateSize === 0) return new Uint8Array(0);
  const l1 = await readL1(image, snapshot);
  const offset = vmStateOffset(image, snapshot.diskSize);
  if (offset + snapshot.vmStateSize > (l1.length / 8) * image.geometry.l2Entries * image.clusterSize) {
    throw new FormatError(image.name, `snapshot ${snapshot.id}: VM state (${snapshot.vmStateSize} bytes at ${hex(offset)}) lies beyond its L1 table`, { field: 'vm_state_size' });
  }
  // VM state never comes from a backing file: unallocated parts are zeros.
  return image.readThrough(offset, snapshot.vmStateSize, l1, undefined);
}

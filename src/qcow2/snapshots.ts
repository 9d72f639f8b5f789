/**
 * The internal snapshot table: decoding (bounded, every field checked) and encoding.
 */
import { FormatError } from './errors.js';
import { decodeText, encodeText, hex, putU16, putU32, putU64, u16, u32, u64 } from './bytes.js';
import { MAX_L1_BYTES } from './header.js';
import { readExact, type ByteStore } from './store.js';

/** QEMU refuses snapshot tables over 64 MiB and extra data over 1 KiB per entry. */
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
export const MAX_SNAPSHOT_EXTRA = 1024;

export interface Snapshot {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  /** VM state bytes stored past the disk end (vm_state_size_large when present). */
  vmStateSize: number;
  /** Guest disk size at the time of the snapshot (from extra data; the image's size when absent). */
  diskSize: number;
  icount: number | undefined;
  /** Extra data bytes past the fields we know, kept on rewrite. */
  extraUnknown: Uint8Array;
  /** Bytes the entry occupies in the table as read (older QEMUs wrote less extra data); undefined for new entries. */
  storedSize?: number;
}

export async function readSnapshotTable(
  store: ByteStore,
  offset: number,
  count: number,
  clusterSize: number,
  fileSize: number,
  currentDiskSize: number,
): Promise<Snapshot[]> {
  const file = store.name;
  const snapshots: Snapshot[] = [];
  let at = offset;
  for (let i = 0; i < count; i++) {
    if (at - offset + 40 > MAX_SNAPSHOT_TABLE_BYTES) {
      throw new FormatError(file, `snapshot table exceeds QEMU's limit of 64 MiB (at snapshot ${i})`, { field: 'snapshots', offset: at });
    }
    const fixed = await readExact(store, at, 40, `snapshot table entry ${i}`);
    const l1TableOffset = u64(fixed, 0);
    const l1Size = u32(fixed, 8);
    const idSize = u16(fixed, 12);
    const nameSize = u16(fixed, 14);
    const extraSize = u32(fixed, 36);
    if (extraSize > MAX_SNAPSHOT_EXTRA) {
      throw new FormatError(file, `snapshot ${i}: extra_data_size ${extraSize} at offset ${hex(at + 36)} exceeds ${MAX_SNAPSHOT_EXTRA}`, { field: 'extra_data_size', offset: at + 36, value: extraSize });
    }
    const variable = await readExact(store, at + 40, extraSize + idSize + nameSize, `snapshot table entry ${i}`);
    const extra = variable.subarray(0, extraSize);
    if (l1Size > MAX_L1_BYTES / 8) {
      throw new FormatError(file, `snapshot ${i}: l1_size ${l1Size} at offset ${hex(at + 8)} exceeds QEMU's limit of ${MAX_L1_BYTES / 8}`, { field: 'snapshot l1_size', offset: at + 8, value: l1Size });
    }
    if (l1TableOffset % clusterSize !== 0 || l1TableOffset + l1Size * 8 > fileSize) {
      throw new FormatError(file, `snapshot ${i}: L1 table offset ${hex(l1TableOffset)} at ${hex(at)} is unaligned or outside the file`, { field: 'snapshot l1_table_offset', offset: at, value: l1TableOffset });
    }
    snapshots.push({
      l1TableOffset,
      l1Size,
      id: decodeText(variable.subarray(extraSize, extraSize + idSize)),
      name: decodeText(variable.subarray(extraSize + idSize)),
      dateSec: u32(fixed, 16),
      dateNsec: u32(fixed, 20),
      vmClockNsec: u64(fixed, 24),
      vmStateSize: extraSize >= 8 ? u64(extra, 0) : u32(fixed, 32),
      diskSize: extraSize >= 16 ? u64(extra, 8) : currentDiskSize,
      // QEMU writes -1 when the snapshot was taken without record/replay.
      icount: extraSize >= 24 && u32(extra, 16) !== 0xffffffff ? u64(extra, 16) : undefined,
      extraUnknown: extra.slice(Math.min(extraSize, 24)),
      storedSize: Math.ceil((40 + extraSize + idSize + nameSize) / 8) * 8,
    });
    at += Math.ceil((40 + extraSize + idSize + nameSize) / 8) * 8;
  }
  return snapshots;
}

/** Encodes the table as QEMU 7.2 does: 24 bytes of extra data (icount -1 when unknown), entries padded to 8. */
export function encodeSnapshotTable(snapshots: Snapshot[]): Uint8Array {
  const entries = snapshots.map((snapshot) => {
    const id = encodeText(snapshot.id);
    const name = encodeText(snapshot.name);
    const extraLength = 24 + snapshot.extraUnknown.length;
    const entry = new Uint8Array(Math.ceil((40 + extraLength + id.length + name.length) / 8) * 8);
    putU64(entry, 0, snapshot.l1TableOffset);
    putU32(entry, 8, snapshot.l1Size);
    putU16(entry, 12, id.length);
    putU16(entry, 14, name.length);
    putU32(entry, 16, snapshot.dateSec);
    putU32(entry, 20, snapshot.dateNsec);
    putU64(entry, 24, snapshot.vmClockNsec);
    putU32(entry, 32, Math.min(snapshot.vmStateSize, 0xffffffff));
    putU32(entry, 36, extraLength);
    putU64(entry, 40, snapshot.vmStateSize);
    putU64(entry, 48, snapshot.diskSize);
    putU64(entry, 56, snapshot.icount ?? 0xffffffffffffffffn);
    entry.set(snapshot.extraUnknown, 64);
    entry.set(id, 40 + extraLength);
    entry.set(name, 40 + extraLength + id.length);
    return entry;
  });
  const out = new Uint8Array(entries.reduce((sum, entry) => sum + entry.length, 0));
  let at = 0;
  for (const entry of entries) {
    out.set(entry, at);
    at += entry.length;
  }
  return out;
}

/** Bytes the snapshot table occupies on disk as read (what its refcounts cover). */
export function snapshotTableBytes(snapshots: Snapshot[]): number {
  let total = 0;
  for (const snapshot of snapshots) total += snapshot.storedSize ?? encodeSnapshotTable([snapshot]).length;
  return total;
}

/** Finds a snapshot by ID first, then by name, like qemu-img's -l / snapshot -a. */
export function findSnapshot(snapshots: Snapshot[], idOrName: string): Snapshot | undefined {
  return snapshots.find((s) => s.id === idOrName) ?? snapshots.find((s) => s.name === idOrName);
}

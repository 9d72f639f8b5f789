/**
 * The internal snapshot table: decoding (bounded, every field checked) and encoding.
 */
import { FormatError } from './errors.js';
import { decodeText, encodeText, hex, putU16, putU32, putU64, u16, u32, u64, u64big } from './bytes.js';
import { MAX_L1_BYTES } from './header.js';
import { readExact, type ByteStore } from './store.js';

/** QEMU refuses snapshot tables over 64 MiB and extra data over 1 KiB per entry. */
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
export const MAX_SNAPSHOT_EXTRA = 1024;
/** Version 3 entries must carry vm_state_size_large and disk_size: at least this much extra data. */
export const V3_MIN_SNAPSHOT_EXTRA = 16;

export interface Snapshot {
  /** As stored: not validated on open (QEMU checks a snapshot's L1 only when the snapshot is used); see snapshotL1Problem. */
  l1TableOffset: number;
  /** l1_table_offset exactly as stored, when a number cannot hold it (2^53 and above: always damage). */
  l1TableOffsetExact?: bigint;
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
  /** extra_data_size as read (check reports version 3 entries with less than 16 bytes); undefined for new entries. */
  storedExtraSize?: number;
  /** Where the entry starts in the file, as read (error messages name it). */
  storedAt?: number;
}

/**
 * Reads the table as QEMU opens it: an entry with more than 1 KiB of extra data or a table over 64 MiB is refused
 * (QEMU's "Too much extra metadata" and "Snapshot table is too big"), and so is a table reaching past the end of
 * the file (QEMU would read zeros there: like the header-level tables, the table itself must lie in the file).
 * A snapshot's own L1 table is not judged here: QEMU opens such an image and refuses only to use that snapshot.
 */
/** How much of the snapshot table one read takes. */
const TABLE_READ_WINDOW = 256 * 1024;

export async function readSnapshotTable(store: ByteStore, offset: number, count: number, currentDiskSize: number): Promise<Snapshot[]> {
  const file = store.name;
  const snapshots: Snapshot[] = [];
  // The table is read in windows rather than two reads per entry: 65536 entries would be 131072 round trips.
  let window: Uint8Array = new Uint8Array(0);
  let windowAt = offset;
  const bytesAt = async (position: number, length: number, what: string): Promise<Uint8Array> => {
    if (position < windowAt || position + length > windowAt + window.length) {
      window = await store.read(position, Math.max(length, TABLE_READ_WINDOW));
      windowAt = position;
      if (window.length < length) return readExact(store, position, length, what);
    }
    return window.subarray(position - windowAt, position - windowAt + length);
  };
  let at = offset;
  for (let i = 0; i < count; i++) {
    const fixed = await bytesAt(at, 40, `snapshot table entry ${i}`);
    const l1TableOffset = u64(fixed, 0);
    const idSize = u16(fixed, 12);
    const nameSize = u16(fixed, 14);
    const extraSize = u32(fixed, 36);
    if (extraSize > MAX_SNAPSHOT_EXTRA) {
      throw new FormatError(file, `Too much extra metadata in snapshot table entry ${i}: extra_data_size ${extraSize} at offset ${hex(at + 36)} exceeds ${MAX_SNAPSHOT_EXTRA}`, {
        field: 'extra_data_size',
        offset: at + 36,
        value: extraSize,
      });
    }
    const end = at + 40 + extraSize + idSize + nameSize;
    // QEMU judges the length once the entry is read: its unpadded end, counted from the table's start.
    if (end - offset > MAX_SNAPSHOT_TABLE_BYTES) {
      throw new FormatError(file, `Snapshot table is too big: entry ${i} ends ${end - offset} bytes past snapshots_offset (limit ${MAX_SNAPSHOT_TABLE_BYTES})`, {
        field: 'snapshots',
        offset: at,
        value: end - offset,
      });
    }
    const variable = await bytesAt(at + 40, extraSize + idSize + nameSize, `snapshot table entry ${i}`);
    const extra = variable.subarray(0, extraSize);
    const exact = u64big(fixed, 0);
    snapshots.push({
      l1TableOffset,
      ...(exact > BigInt(Number.MAX_SAFE_INTEGER) ? { l1TableOffsetExact: exact } : {}),
      l1Size: u32(fixed, 8),
      id: cString(variable.subarray(extraSize, extraSize + idSize)),
      name: cString(variable.subarray(extraSize + idSize)),
      dateSec: u32(fixed, 16),
      dateNsec: u32(fixed, 20),
      vmClockNsec: u64(fixed, 24),
      vmStateSize: extraSize >= 8 ? u64(extra, 0) : u32(fixed, 32),
      diskSize: extraSize >= 16 ? u64(extra, 8) : currentDiskSize,
      // QEMU writes -1 when the snapshot was taken without record/replay.
      icount: extraSize >= 24 && u32(extra, 16) !== 0xffffffff ? u64(extra, 16) : undefined,
      extraUnknown: extra.slice(Math.min(extraSize, 24)),
      storedSize: Math.ceil((40 + extraSize + idSize + nameSize) / 8) * 8,
      storedExtraSize: extraSize,
      storedAt: at,
    });
    at += Math.ceil((40 + extraSize + idSize + nameSize) / 8) * 8;
  }
  return snapshots;
}

/** IDs and names are C strings to QEMU: a NUL ends them (it compares, prints and rewrites them so). */
function cString(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return decodeText(nul < 0 ? bytes : bytes.subarray(0, nul));
}

/**
 * Why a snapshot's L1 table cannot be used, or undefined when it can. QEMU's rules (qcow2_validate_table on use:
 * at most 32 MiB of entries, cluster aligned), plus ours for every table: it lies inside the file.
 */
export function snapshotL1Problem(snapshot: Snapshot, clusterSize: number, fileSize: number): { field: string; message: string; value: number | bigint } | undefined {
  const which = `snapshot ${snapshot.id} (${snapshot.name})`;
  const offset = snapshot.l1TableOffsetExact ?? BigInt(snapshot.l1TableOffset);
  if (snapshot.l1Size > MAX_L1_BYTES / 8) {
    return { field: 'l1_size', value: snapshot.l1Size, message: `${which}: l1_size ${hex(snapshot.l1Size)} exceeds QEMU's limit of ${hex(MAX_L1_BYTES / 8)} entries (Snapshot L1 table too large)` };
  }
  if (offset % BigInt(clusterSize) !== 0n || offset + BigInt(snapshot.l1Size * 8) > 2n ** 63n - 1n) {
    const why = offset % BigInt(clusterSize) !== 0n ? 'is not cluster aligned' : 'is past what a file can address';
    return { field: 'l1_table_offset', value: offset, message: `${which}: l1_table_offset ${hex(offset)} ${why} (Snapshot L1 table offset invalid)` };
  }
  if (offset + BigInt(snapshot.l1Size * 8) > BigInt(fileSize)) {
    return { field: 'l1_table_offset', value: offset, message: `${which}: L1 table (${snapshot.l1Size * 8} bytes at l1_table_offset ${hex(offset)}) lies outside the file (${fileSize} bytes)` };
  }
  return undefined;
}

/** A snapshot's L1 table, read after the checks QEMU makes before using a snapshot; a FormatError names the field. */
export async function readSnapshotL1(store: ByteStore, snapshot: Snapshot, clusterSize: number, context = ''): Promise<Uint8Array> {
  const problem = snapshotL1Problem(snapshot, clusterSize, await store.size());
  if (problem) {
    const fieldOffset = snapshot.storedAt === undefined ? undefined : snapshot.storedAt + (problem.field === 'l1_size' ? 8 : 0);
    throw new FormatError(store.name, `${context}${problem.message}${fieldOffset === undefined ? '' : ` (entry field at offset ${hex(fieldOffset)})`}`, {
      field: `snapshot ${problem.field}`,
      ...(fieldOffset === undefined ? {} : { offset: fieldOffset }),
      value: problem.value,
    });
  }
  return snapshot.l1Size ? readExact(store, snapshot.l1TableOffset, snapshot.l1Size * 8, `L1 table of snapshot ${snapshot.id}`) : new Uint8Array(0);
}

/** Encodes the table as QEMU 7.2 does: 24 bytes of extra data (icount -1 when unknown), entries padded to 8. */
export function encodeSnapshotTable(snapshots: Snapshot[]): Uint8Array {
  const entries = snapshots.map((snapshot) => {
    const id = encodeText(snapshot.id);
    const name = encodeText(snapshot.name);
    const extraLength = 24 + snapshot.extraUnknown.length;
    const entry = new Uint8Array(Math.ceil((40 + extraLength + id.length + name.length) / 8) * 8);
    putU64(entry, 0, snapshot.l1TableOffsetExact ?? snapshot.l1TableOffset);
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

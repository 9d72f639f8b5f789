/**
 * Sessions: a running machine saved inside its qcow2 overlay as an internal snapshot whose VM state is v86's
 * `save_state()` blob, as QEMU's savevm stores a machine's state. One portable file then holds the disk and the
 * machine; `qemu-img snapshot -l` lists the sessions with their VM sizes and `qemu-img convert -l NAME` gives the
 * disk as of a session.
 *
 * The VM-state area holds a header then the (compressed) blob:
 *
 *   0  magic "qcow86vm"     8  u32 header version (1, 2) 12 u32 format (0 raw, 1 raw deflate, 2 zstd)
 *   16 u64 raw blob length  24 u32 stored payload length 28 u32 CRC-32 of the stored payload
 *   version 2 only: 32 u32 machine record length        36 u32 CRC-32 of the record, then the record (JSON)
 *
 * The machine record says what v86's blob cannot: which bus the disk was on and the state of the devices
 * attached from outside v86 (the virtio-blk disk). Version 1 areas (saved before buses existed) have none: their
 * disk was on IDE. The lengths and checksums make a truncated or damaged area fail with a message that says so,
 * before the disk is touched, instead of v86 restoring garbage.
 *
 * Resuming reverts the disk to the session's instant: disk changes made after it are discarded (they stay in any
 * newer session). No platform imports here: the browser shares this file.
 */
import type { Codecs } from '../qcow2/compression.js';
import { Qcow86Error } from '../qcow2/errors.js';
import type { Qcow2Image } from '../qcow2/image.js';
import type { Snapshot } from '../qcow2/snapshots.js';
import type { Machine } from './machine.js';
import { isDiskBus, restoreV86State, type DiskBus } from './disk-bus.js';
import type { VirtioBlkState } from './virtio-blk.js';

export type SessionFormat = 'raw' | 'deflate' | 'zstd';

const MAGIC = 'qcow86vm';
const HEADER_BYTES = 32;
/** Version 2 adds the machine record's length and checksum. */
const RECORD_HEADER_BYTES = 8;
const HEADER_VERSION = 2;
/** A machine record is a few hundred bytes of JSON; a larger claim means a damaged header. */
const MAX_RECORD_BYTES = 64 * 1024;
const FORMAT_CODES: Record<SessionFormat, number> = { raw: 0, deflate: 1, zstd: 2 };
/**
 * zstd level of the VM state. QEMU's cluster level (3) leaves the stored state a header's 32 bytes larger than a
 * plain `zstd -3` of v86's blob; a few levels more make it clearly smaller at little cost on a mostly-zero RAM
 * image (bench/session.mjs measures both).
 */
export const VM_STATE_ZSTD_LEVEL = 6;
/**
 * v86's largest machine: its memory size is a 32-bit number, and a state holds that memory (stored sparsely:
 * states are tens of MiB in practice) plus device state that is small beside it. A larger claim is damage.
 */
const MAX_RAW_BYTES = 4 * 1024 * 1024 * 1024;
/** The most a stored VM state can take: the header and a payload that does not compress at all. */
const MAX_AREA_BYTES = HEADER_BYTES + MAX_RAW_BYTES + 1024 * 1024;
/** raw deflate inflates at most ~1032:1 (RFC 1951's longest match per bit); a raw length beyond is damage. */
const DEFLATE_MAX_RATIO = 1032;

/** A session that is missing, not a session, or whose VM state is damaged (the CLI prints it as one line). */
export class SessionError extends Qcow86Error {
  constructor(file: string, readonly session: string, reason: string) {
    super(file, `session '${session}' ${reason}`);
  }
}

/** What a session records about the machine beside v86's state (v86 saves only its own devices). */
export interface MachineRecord {
  /** The bus the disk was on: the session resumes on it. */
  diskBus: DiskBus;
  /** The virtio-blk device's state (virtio bus only). */
  virtio?: VirtioBlkState | undefined;
}

/** Sessions saved before buses were recorded: v86's IDE disk was the only one. */
const BEFORE_BUSES: MachineRecord = { diskBus: 'ide' };

export interface SessionInfo {
  name: string;
  id: string;
  date: Date;
  /** Bytes of VM state stored in the image (header + compressed blob). */
  vmStateSize: number;
  /** Time the guest had run when saved, in nanoseconds (across earlier resumes). */
  guestClockNsec: number;
}

export interface SaveResult extends SessionInfo {
  /** Size of v86's save_state() blob before compression. */
  rawBytes: number;
  format: SessionFormat;
  /** Milliseconds the guest was paused. */
  pausedMs: number;
}

export interface SaveOptions {
  /** Compression of the blob (default zstd). */
  format?: SessionFormat;
  /** Replace an existing session of that name instead of failing. */
  replace?: boolean;
}

const now = (): number => (typeof performance !== 'undefined' ? performance.now() : Date.now());

/**
 * Guest run time per machine: v86 exposes no guest clock in nanoseconds, so the session records how long the
 * guest has been running, carried over from the session a machine was resumed from.
 */
const clocks = new WeakMap<Machine, { baseNsec: number; sinceMs: number }>();

function guestClockNsec(machine: Machine): number {
  const clock = clocks.get(machine);
  return clock ? clock.baseNsec + Math.max(0, Math.round((now() - clock.sinceMs) * 1e6)) : 0;
}

/**
 * Starts counting the guest clock a session records (every Machine does when it is made). A resumed machine
 * counts on from its session's clock by itself.
 */
export function trackGuestClock(machine: Machine): void {
  if (!clocks.has(machine)) clocks.set(machine, { baseNsec: 0, sinceMs: now() });
}

/**
 * Pauses the guest, makes the disk durable, stores v86's state in a new internal snapshot named `name`, and lets
 * the guest continue (unless it was already stopped).
 */
export async function saveSession(machine: Machine, image: Qcow2Image, name: string, codecs: Codecs, options: SaveOptions = {}): Promise<SaveResult> {
  refuseExisting(image, name, options);
  const clock = guestClockNsec(machine);
  const emulator = machine.emulator;
  const wasRunning = emulator.is_running();
  const began = now();
  await emulator.stop();
  try {
    // Answers to reads issued before the stop change device state: they must land before the state is taken.
    await machine.disk.settle();
    await machine.disk.flush();
    const attached = await machine.attached;
    const raw = new Uint8Array(await emulator.save_state());
    const record: MachineRecord = { diskBus: machine.diskBus, virtio: attached.virtio?.state() };
    const stored = await storeSession(image, name, raw, codecs, { ...options, clockNsec: clock, machine: record });
    return { ...stored, pausedMs: now() - began };
  } finally {
    if (wasRunning) emulator.run();
  }
}

export interface StoreOptions extends SaveOptions {
  /** Guest clock to record, in nanoseconds. */
  clockNsec?: number;
  date?: Date;
  /** The bus and outside devices of the machine (without: a session as saved before buses existed). */
  machine?: MachineRecord;
}

/**
 * Stores a v86 state blob taken from a stopped machine whose disk writes have all reached `image` (the browser's
 * disk Worker calls this with the blob the page took). Replacing a session is crash-safe: the new snapshot is
 * written completely, under the same name, before the old one is deleted by ID; a crash in between leaves both,
 * and the newer one is the one a lookup by name finds.
 */
export async function storeSession(image: Qcow2Image, name: string, raw: Uint8Array, codecs: Codecs, options: StoreOptions = {}): Promise<Omit<SaveResult, 'pausedMs'>> {
  const format = options.format ?? 'zstd';
  const replaced = refuseExisting(image, name, options);
  const stored = await encodeVmState(raw, format, codecs, options.machine);
  const snapshot = await image.createSnapshot(name, { vmState: stored, vmClockNsec: options.clockNsec ?? 0, date: options.date ?? new Date(), allowSameName: true });
  await image.flush();
  for (const old of replaced) await image.deleteSnapshot(old.id);
  if (replaced.length) await image.flush();
  return { ...describe(snapshot), rawBytes: raw.length, format };
}

/** The snapshots a save of `name` replaces (refused unless options.replace). */
function refuseExisting(image: Qcow2Image, name: string, options: SaveOptions): Snapshot[] {
  const existing = image.snapshots.filter((s) => s.name === name);
  if (existing.length && !options.replace) throw new SessionError(image.name, name, 'already exists (delete it or save with replace)');
  return existing;
}

/** A session's VM state, read and checked, ready for resumeSession (nothing has changed yet). */
export interface LoadedSession {
  snapshot: Snapshot;
  state: ArrayBuffer;
  /** The machine it was saved from: its disk bus (IDE for sessions saved before buses were recorded). */
  machine: MachineRecord;
}

/** Reads and checks session `name` (an ID or a name) without touching the disk: a damaged session fails here. */
export async function loadSession(image: Qcow2Image, name: string, codecs: Codecs): Promise<LoadedSession> {
  const snapshot = findSession(image, name);
  // The VM state is read whole: its recorded size must first fit what the files store and what v86 can save.
  const stored = (await image.store.size()) + ((await image.dataStore?.size()) ?? 0);
  const limit = Math.min(stored, MAX_AREA_BYTES);
  if (snapshot.vmStateSize > limit) {
    const what = limit === stored ? `the image stores (${stored} bytes)` : `any v86 machine saves (${MAX_AREA_BYTES} bytes)`;
    throw new SessionError(image.name, name, `VM state claims ${snapshot.vmStateSize} bytes (vm_state_size of snapshot ${snapshot.id}), more than ${what}: damaged`);
  }
  const area = await image.readVmState(snapshot);
  const raw = await decodeVmState(area, snapshot.vmStateSize, codecs, image.name, name);
  const machine = decodeMachineRecord(area, image.name, name);
  const state = raw.byteOffset === 0 && raw.byteLength === raw.buffer.byteLength ? raw.buffer as ArrayBuffer : raw.slice().buffer;
  return { snapshot, state, machine };
}

/**
 * Reverts the disk to session `name` and restores the machine state saved with it; the guest continues from
 * there. Disk changes made after the session are discarded. The VM state is read and checked before anything
 * changes, so a damaged session leaves the disk as it was.
 */
export async function resumeSession(machine: Machine, image: Qcow2Image, session: string | LoadedSession, codecs: Codecs): Promise<SessionInfo> {
  const loaded = typeof session === 'string' ? await loadSession(image, session, codecs) : session;
  if (loaded.machine.diskBus !== machine.diskBus) {
    throw new SessionError(image.name, loaded.snapshot.name, `was saved with its disk on ${loaded.machine.diskBus}, this machine's disk is on ${machine.diskBus}`);
  }
  const emulator = machine.emulator;
  await machine.started;
  const attached = await machine.attached;
  await emulator.stop();
  // The machine's own writes since it started belong to the disk being discarded; they must reach the image
  // before the revert (an unfinished write-back landing afterwards would corrupt the reverted disk).
  await machine.disk.flush();
  await revertToSession(image, loaded);
  machine.disk.invalidate();
  await restoreV86State(emulator, loaded.state);
  restoreDevices(attached.virtio, loaded.machine, image.name, loaded.snapshot.name);
  clocks.set(machine, { baseNsec: loaded.snapshot.vmClockNsec, sinceMs: now() });
  emulator.run();
  return describe(loaded.snapshot);
}

/**
 * Puts the outside devices' saved state back, after v86 restored its own (guest memory holds the rings the
 * device reads again). A virtio session without device state (or a damaged one) fails by name.
 */
export function restoreDevices(virtio: { restore(state: VirtioBlkState): void } | undefined, record: MachineRecord, file: string, session: string): void {
  if (!virtio) return;
  if (!record.virtio) throw new SessionError(file, session, 'has no virtio-blk device state');
  try {
    virtio.restore(record.virtio);
  } catch (error) {
    throw new SessionError(file, session, `virtio-blk device state is damaged: ${(error as Error).message}`);
  }
}

/**
 * The disk half of a resume: the active disk goes back to the session's instant (later changes are discarded).
 * The caller has stopped the machine and drained its writes, and restores `loaded.state` into it afterwards.
 */
export async function revertToSession(image: Qcow2Image, loaded: LoadedSession): Promise<SessionInfo> {
  await image.applySnapshot(loaded.snapshot.id);
  await image.flush();
  return describe(loaded.snapshot);
}

/** Sessions are the internal snapshots that carry VM state, oldest first. */
export function listSessions(image: Qcow2Image): SessionInfo[] {
  return image.snapshots.filter((s) => s.vmStateSize > 0).map(describe);
}

/** Deletes session `idOrName` (by name: the newest of that name). */
export async function deleteSession(image: Qcow2Image, idOrName: string): Promise<void> {
  await image.deleteSnapshot(findSession(image, idOrName).id);
  await image.flush();
}

/**
 * By ID, else by name; of several with one name (a replacement interrupted between its two steps) the newest,
 * which the table lists last.
 */
function findSession(image: Qcow2Image, name: string): Snapshot {
  const snapshot = image.snapshots.find((s) => s.id === name) ?? image.snapshots.filter((s) => s.name === name).at(-1);
  if (!snapshot) {
    const known = listSessions(image).map((s) => s.name);
    throw new SessionError(image.name, name, `not found (sessions: ${known.length ? known.join(', ') : 'none'})`);
  }
  if (snapshot.vmStateSize === 0) throw new SessionError(image.name, name, 'is a disk-only snapshot (no VM state to resume)');
  return snapshot;
}

function describe(s: Snapshot): SessionInfo {
  return {
    name: s.name,
    id: s.id,
    date: new Date(s.dateSec * 1000 + Math.floor(s.dateNsec / 1e6)),
    vmStateSize: s.vmStateSize,
    guestClockNsec: s.vmClockNsec,
  };
}

// ------------------------------------------------------------------ the VM-state area

/** The area's bytes; with `machine` a version 2 area that records it, without one a version 1 area (no bus). */
export async function encodeVmState(raw: Uint8Array, format: SessionFormat, codecs: Codecs, machine?: MachineRecord): Promise<Uint8Array> {
  const payload = format === 'zstd' ? await codecs.zstdCompress(raw, VM_STATE_ZSTD_LEVEL) : format === 'deflate' ? await codecs.deflateRaw(raw) : raw;
  const record = machine ? new TextEncoder().encode(JSON.stringify(machine)) : undefined;
  const start = record ? HEADER_BYTES + RECORD_HEADER_BYTES + record.length : HEADER_BYTES;
  const out = new Uint8Array(start + payload.length);
  const view = new DataView(out.buffer);
  for (let i = 0; i < MAGIC.length; i++) out[i] = MAGIC.charCodeAt(i);
  view.setUint32(8, record ? 2 : 1);
  view.setUint32(12, FORMAT_CODES[format]);
  view.setBigUint64(16, BigInt(raw.length));
  view.setUint32(24, payload.length);
  view.setUint32(28, crc32(payload));
  if (record) {
    view.setUint32(32, record.length);
    view.setUint32(36, crc32(record));
    out.set(record, HEADER_BYTES + RECORD_HEADER_BYTES);
  }
  out.set(payload, start);
  return out;
}

/** Where the compressed payload starts: after the header, and in version 2 after the machine record. */
function payloadStart(area: Uint8Array, view: DataView, version: number, fail: (reason: string) => Error): number {
  if (version === 1) return HEADER_BYTES;
  if (area.length < HEADER_BYTES + RECORD_HEADER_BYTES) throw fail(`is ${area.length} bytes, shorter than its ${HEADER_BYTES + RECORD_HEADER_BYTES}-byte header (truncated)`);
  const recordLength = view.getUint32(32);
  if (recordLength > MAX_RECORD_BYTES) throw fail(`claims a ${recordLength}-byte machine record (damaged header)`);
  return HEADER_BYTES + RECORD_HEADER_BYTES + recordLength;
}

/**
 * The machine record of a VM-state area that decodeVmState accepted: version 1 areas have none (their disk was on
 * IDE). The record is checked (checksum, JSON, bus) and named when damaged; the device state inside is checked
 * field by field when it is restored.
 */
export function decodeMachineRecord(area: Uint8Array, file: string, session: string): MachineRecord {
  const fail = (reason: string) => new SessionError(file, session, `machine record ${reason}`);
  const view = new DataView(area.buffer, area.byteOffset, area.byteLength);
  if (view.getUint32(8) === 1) return BEFORE_BUSES;
  const length = view.getUint32(32);
  const start = HEADER_BYTES + RECORD_HEADER_BYTES;
  if (length > MAX_RECORD_BYTES || start + length > area.length) throw fail('is truncated');
  const bytes = area.subarray(start, start + length);
  if (crc32(bytes) !== view.getUint32(36)) throw fail(`is corrupted: CRC-32 ${hex32(crc32(bytes))} of ${length} bytes, expected ${hex32(view.getUint32(36))}`);
  let record: unknown;
  try {
    record = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (error) {
    throw fail(`is not JSON: ${(error as Error).message}`);
  }
  const { diskBus, virtio } = (record ?? {}) as { diskBus?: unknown; virtio?: unknown };
  if (!isDiskBus(diskBus)) throw fail(`names no known disk bus (${JSON.stringify(diskBus)})`);
  if (virtio !== undefined && (typeof virtio !== 'object' || virtio === null)) throw fail('holds a virtio-blk state that is not an object');
  return { diskBus, virtio: virtio as VirtioBlkState | undefined };
}

/** Checks and decompresses a VM-state area; every failure names what is wrong with it. */
export async function decodeVmState(area: Uint8Array, recordedSize: number, codecs: Codecs, file: string, session: string): Promise<Uint8Array> {
  const fail = (reason: string) => new SessionError(file, session, `VM state ${reason}`);
  if (area.length < HEADER_BYTES) throw fail(`is ${area.length} bytes, shorter than its ${HEADER_BYTES}-byte header (truncated)`);
  const magic = String.fromCharCode(...area.subarray(0, MAGIC.length));
  if (magic !== MAGIC) throw fail(`does not start with '${MAGIC}' (found ${JSON.stringify(magic)}): not saved by qcow86, or damaged`);
  const view = new DataView(area.buffer, area.byteOffset, area.byteLength);
  const version = view.getUint32(8);
  if (version !== 1 && version !== HEADER_VERSION) throw fail(`header version ${version} is not supported (expected 1 or ${HEADER_VERSION})`);
  const start = payloadStart(area, view, version, fail);
  const code = view.getUint32(12);
  const format = (Object.keys(FORMAT_CODES) as SessionFormat[]).find((f) => FORMAT_CODES[f] === code);
  if (!format) throw fail(`has unknown compression format ${code}`);
  const rawLength = Number(view.getBigUint64(16));
  if (rawLength === 0 || rawLength > MAX_RAW_BYTES) throw fail(`claims ${rawLength} raw bytes (damaged header)`);
  const storedLength = view.getUint32(24);
  if (start + storedLength > area.length) {
    throw fail(`is truncated: the header announces ${start + storedLength} bytes, the snapshot records ${recordedSize}`);
  }
  const payload = area.subarray(start, start + storedLength);
  const expected = view.getUint32(28);
  const actual = crc32(payload);
  if (actual !== expected) throw fail(`is corrupted: CRC-32 ${hex32(actual)} of ${storedLength} bytes, expected ${hex32(expected)}`);
  // The checksum covers the payload, not the header: the raw length (what decompression allocates) must be what
  // the checked payload can hold before any buffer is sized by it.
  const holds = format === 'raw' ? storedLength : format === 'deflate' ? storedLength * DEFLATE_MAX_RATIO + 1024 : zstdContentSize(payload);
  if (format === 'zstd' ? holds !== rawLength : rawLength > holds!) {
    throw fail(`claims ${rawLength} raw bytes, but its ${storedLength}-byte ${format} payload ${holds === undefined ? 'does not say its size' : `holds ${format === 'deflate' ? 'at most ' : ''}${holds}`} (damaged header)`);
  }
  let raw: Uint8Array;
  try {
    raw = format === 'zstd' ? await codecs.zstdDecompress(payload, rawLength) : format === 'deflate' ? await codecs.inflateRaw(payload, rawLength) : payload;
  } catch (error) {
    throw fail(`does not decompress (${format}): ${error instanceof Error ? error.message : String(error)}`);
  }
  if (raw.length !== rawLength) throw fail(`decompresses to ${raw.length} bytes, expected ${rawLength}`);
  return raw;
}

/**
 * The content size a zstd frame declares in its header (RFC 8878 3.1.1.1: Frame_Content_Size), or undefined
 * when it declares none. Our encoder writes one frame with its size.
 */
function zstdContentSize(payload: Uint8Array): number | undefined {
  if (payload.length < 6 || payload[0] !== 0x28 || payload[1] !== 0xb5 || payload[2] !== 0x2f || payload[3] !== 0xfd) return undefined;
  const descriptor = payload[4]!;
  const fcsFlag = descriptor >> 6;
  const singleSegment = (descriptor >> 5) & 1;
  const dictBytes = [0, 1, 2, 4][descriptor & 3]!;
  const fcsBytes = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
  if (fcsBytes === 0) return undefined;
  const at = 5 + (singleSegment ? 0 : 1) + dictBytes;
  if (at + fcsBytes > payload.length) return undefined;
  let size = 0;
  for (let i = fcsBytes - 1; i >= 0; i--) size = size * 256 + payload[at + i]!;
  return fcsBytes === 2 ? size + 256 : size;
}

const hex32 = (n: number): string => `0x${n.toString(16).padStart(8, '0')}`;

let crcTable: Uint32Array | undefined;

/** CRC-32 (IEEE, as zlib); a table is cheap and keeps this file free of platform code. */
export function crc32(bytes: Uint8Array): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let crc = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) crc = crcTable[(crc ^ bytes[i]!) & 0xff]! ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

/**
 * Guest RAM size recorded in a v86 state (uncompressed save_state() layout: four little-endian int32s - magic
 * 0x86768676, version, total length, info length - then a JSON info block whose `state[0]` is the CPU's memory
 * size). v86 restores a state only into a machine of the same memory size, so a resume must create the machine
 * with it: sessions saved by a 64 MiB tab and a 128 MiB CLI guest then resume on either side. Undefined when the
 * blob is not in that layout.
 */
export function v86StateMemoryBytes(state: ArrayBuffer | Uint8Array): number | undefined {
  const bytes = state instanceof Uint8Array ? state : new Uint8Array(state);
  if (bytes.length < 16) return undefined;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint32(0, true) !== 0x86768676) return undefined;
  const infoLength = view.getUint32(12, true);
  if (16 + infoLength > bytes.length) return undefined;
  try {
    const info = JSON.parse(new TextDecoder().decode(bytes.subarray(16, 16 + infoLength))) as { state?: unknown[] };
    const memory = info.state?.[0];
    return typeof memory === 'number' && memory > 0 ? memory : undefined;
  } catch {
    return undefined;
  }
}

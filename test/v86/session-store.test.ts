/**
 * Sessions without a guest (the boot tests run a real one): storing a v86 state blob in an overlay, the listing
 * against qemu-img's, crash-safe replacement of a same-named session, and damaged VM-state areas through the
 * browser disk Worker's code path (src/web/disk-sessions.ts), which must fail before the disk is touched.
 */
import { copyFileSync, readFileSync, openSync, writeSync, closeSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { FileStore, nodeResolver } from '../../src/io/node.js';
import { nodeCodecs } from '../../src/io/node-codecs.js';
import { openImage } from '../../src/qcow2/open.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import type { ByteStore } from '../../src/qcow2/store.js';
import { crc32, encodeVmState, listSessions, loadSession, storeSession, v86StateMemoryBytes } from '../../src/v86/session.js';
import { deleteSessionById, resumeSessionState, saveSessionState, sessionsOf } from '../../src/web/disk-sessions.js';
import { qemuCheck, qemuImg, qemuIo, sha256Bytes, tempDir } from '../helpers/qemu.js';
import { createFile, expectClean, openRw } from '../helpers/engine.js';
import { qcow86 } from '../cli/cli.js';

const MiB = 1024 * 1024;
const sha256File = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

/** A blob in v86's save_state() layout: int32 LE magic, version, length, info length; JSON info; buffers. */
function fakeV86State(memoryBytes: number, seed: number, bufferBytes = 3 * MiB): Uint8Array {
  const info = new TextEncoder().encode(JSON.stringify({ buffer_infos: [{ offset: 0, length: bufferBytes }], state: [memoryBytes, { __state_type__: 'Uint8Array', buffer_id: 0 }] }));
  const start = (16 + info.length + 3) & ~3;
  const out = new Uint8Array(start + bufferBytes);
  const view = new DataView(out.buffer);
  view.setUint32(0, 0x86768676, true);
  view.setUint32(4, 6, true);
  view.setUint32(8, out.length, true);
  view.setUint32(12, info.length, true);
  out.set(info, 16);
  // A quarter noise, a quarter text-like, half zero pages: roughly what guest RAM compresses like.
  let x = seed * 2654435761 >>> 0 || 1;
  for (let i = 0; i < bufferBytes / 4; i++) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    out[start + i] = x & 0xff;
  }
  for (let i = bufferBytes / 4; i < bufferBytes / 2; i++) out[start + i] = 97 + ((i * seed) % 26);
  return out;
}

async function overlay(dir: string, name = 'disk.qcow2'): Promise<string> {
  const path = join(dir, name);
  await createFile(path, { size: 64 * MiB });
  await qemuIo(['-c', 'write -P 0x11 0 1M', path]);
  return path;
}

function patch(path: string, offset: number, bytes: Uint8Array): void {
  const fd = openSync(path, 'r+');
  writeSync(fd, bytes, 0, bytes.length, offset);
  closeSync(fd);
}

/** A store that fails every write once armed: a crash (or a full disk) in the middle of an operation. */
function failing(store: ByteStore): ByteStore & { arm(afterWrites: number): void } {
  let left = Infinity;
  return {
    name: store.name,
    readOnly: store.readOnly,
    get validator() {
      return store.validator;
    },
    size: () => store.size(),
    read: (offset, length) => store.read(offset, length),
    write: async (offset, data) => {
      if (left-- <= 0) throw new Error(`injected write failure at ${offset}`);
      return store.write(offset, data);
    },
    truncate: (size) => store.truncate(size),
    flush: () => store.flush(),
    close: () => store.close(),
    arm(afterWrites: number) {
      left = afterWrites;
    },
  };
}

describe('sessions stored in an overlay', () => {
  it('round trip; qcow86 snapshot -l equals qemu-img snapshot -l, VM SIZE column included', async () => {
    const path = await overlay(tempDir());
    const state = fakeV86State(64 * MiB, 7);
    expect(v86StateMemoryBytes(state)).toBe(64 * MiB);
    let image = await openRw(path);
    const saved = await storeSession(image, 'work', state, nodeCodecs(), { clockNsec: 83_456_000_000 });
    await image.write(0, new Uint8Array(4096).fill(0x22));
    await storeSession(image, 'later', fakeV86State(128 * MiB, 3, 5 * MiB), nodeCodecs(), { clockNsec: 3_725_001_000_000 });
    await image.close();
    await expectClean(path);
    expect(saved.vmStateSize).toBeLessThan(state.length);

    const ours = await qcow86(['snapshot', '-l', path]);
    expect(ours.exitCode, ours.stderr).toBe(0);
    const theirs = await qemuImg(['snapshot', '-l', path]);
    // ICOUNT: the engine writes no icount field (blank), qemu-img prints 0 for it; every other column equal.
    const columns = (text: string) => text.trimEnd().split('\n').map((line) => line.replace(/\s+\S*$/, '').replace(/\s+ICOUNT$/, ''));
    expect(columns(ours.stdout)).toEqual(columns(theirs));
    const vmSize = (text: string, name: string) => text.split('\n').find((l) => l.split(/\s+/)[1] === name)!.slice(27, 35);
    for (const name of ['work', 'later']) {
      expect(vmSize(ours.stdout, name)).toBe(vmSize(theirs, name));
      expect(vmSize(ours.stdout, name)).toMatch(/\d(\.\d+)? (KiB|MiB)/);
    }
    const info = JSON.parse(await qemuImg(['info', '--output=json', path]));
    expect(info.snapshots.map((s: any) => [s.name, s['vm-state-size'], s['vm-clock-sec']])).toEqual([['work', saved.vmStateSize, 83], ['later', expect.any(Number), 3725]]);

    image = await openRw(path);
    const loaded = await loadSession(image, 'work', nodeCodecs());
    expect(sha256Bytes(new Uint8Array(loaded.state))).toBe(sha256Bytes(state));
    await image.close();
  });

  it('saving over a session of the same name writes the new one completely before deleting the old', async () => {
    const dir = tempDir();
    const path = await overlay(dir);
    const first = fakeV86State(64 * MiB, 5);
    const second = fakeV86State(64 * MiB, 9);
    let image = await openRw(path);
    await storeSession(image, 's', first, nodeCodecs());
    await expect(storeSession(image, 's', second, nodeCodecs())).rejects.toThrow(/session 's' already exists/);
    await storeSession(image, 's', second, nodeCodecs(), { replace: true });
    expect(listSessions(image).map((s) => s.name)).toEqual(['s']);
    expect(sha256Bytes(new Uint8Array((await loadSession(image, 's', nodeCodecs())).state))).toBe(sha256Bytes(second));
    await image.close();
    await expectClean(path);

    // Interrupted between its two steps (new written, old not yet deleted): both are there, the image is clean,
    // and the name finds the newer one.
    image = await openRw(path);
    await image.createSnapshot('s', { vmState: await encodeVmState(first, 'zstd', nodeCodecs()), allowSameName: true });
    await image.close();
    await expectClean(path);
    const listed = (await qemuImg(['snapshot', '-l', path])).split('\n').filter((l) => l.split(/\s+/)[1] === 's');
    expect(listed).toHaveLength(2);
    image = await openRw(path);
    expect(sha256Bytes(new Uint8Array((await loadSession(image, 's', nodeCodecs())).state))).toBe(sha256Bytes(first));
    // A later save of the name replaces both.
    await storeSession(image, 's', second, nodeCodecs(), { replace: true });
    expect(listSessions(image).map((s) => s.name)).toEqual(['s']);
    await image.close();
    await expectClean(path);

    // The new session's writes fail part-way: the old session is still there, whole.
    const store = failing(await FileStore.open(path, { readOnly: false }));
    image = (await openImage(store, { readOnly: false, resolver: nodeResolver(), codecs: nodeCodecs() })) as Qcow2Image;
    store.arm(3);
    await expect(storeSession(image, 's', first, nodeCodecs(), { replace: true })).rejects.toThrow(/injected write failure/);
    await image.close().catch(() => {});
    const check = await qemuCheck(path);
    // Clusters allocated for the unfinished snapshot may leak (exit 3); nothing may be corrupt.
    expect([0, 3], JSON.stringify(check.result)).toContain(check.exitCode);
    expect(check.result.corruptions ?? 0).toBe(0);
    image = await openRw(path);
    expect(listSessions(image).map((s) => s.name)).toEqual(['s']);
    expect(sha256Bytes(new Uint8Array((await loadSession(image, 's', nodeCodecs())).state))).toBe(sha256Bytes(second));
    await image.close();
  });
});

describe('the machine record: the disk bus and the virtio device state beside v86 state', () => {
  const virtio = { version: 1, transport: { status: 15, deviceFeatureSelect: 1, driverFeatureSelect: 1, driverFeatures: [0x30006246, 1], queueSelect: 0, isr: 0, queues: [{ size: 128, enabled: true, desc: 0x1000, avail: 0x2000, used: 0x3000, nextAvail: 7, usedIdx: 6 }] }, inFlight: [3] };

  it('a session saved with a record loads it; one saved before buses (version 1) resumes on IDE', async () => {
    const path = await overlay(tempDir());
    const image = await openRw(path);
    const state = fakeV86State(64 * MiB, 21, MiB);
    await storeSession(image, 'virtio', state, nodeCodecs(), { machine: { diskBus: 'virtio', virtio: virtio as never } });
    await storeSession(image, 'ide', state, nodeCodecs(), { machine: { diskBus: 'ide' } });
    await image.createSnapshot('old', { vmState: await encodeVmState(state, 'zstd', nodeCodecs()), allowSameName: true });
    await image.flush();
    const onVirtio = await loadSession(image, 'virtio', nodeCodecs());
    expect(onVirtio.machine).toEqual({ diskBus: 'virtio', virtio });
    expect(sha256Bytes(new Uint8Array(onVirtio.state))).toBe(sha256Bytes(state));
    expect((await loadSession(image, 'ide', nodeCodecs())).machine).toEqual({ diskBus: 'ide' });
    const old = await loadSession(image, 'old', nodeCodecs());
    expect(old.machine.diskBus).toBe('ide');
    expect(sha256Bytes(new Uint8Array(old.state))).toBe(sha256Bytes(state));
    await image.close();
    await expectClean(path);
  });

  it('a damaged record is refused by name: checksum, JSON, unknown bus, an absurd length', async () => {
    const state = fakeV86State(64 * MiB, 22, 64 * 1024);
    const good = await encodeVmState(state, 'raw', nodeCodecs(), { diskBus: 'virtio', virtio: virtio as never });
    const view = new DataView(good.buffer);
    expect(view.getUint32(8)).toBe(2);
    const { decodeMachineRecord, decodeVmState } = await import('../../src/v86/session.js');
    expect(decodeMachineRecord(good, 'f', 's').diskBus).toBe('virtio');
    expect(await decodeVmState(good, good.length, nodeCodecs(), 'f', 's')).toEqual(state);
    const flipped = good.slice();
    flipped[45]! ^= 0x01;
    expect(() => decodeMachineRecord(flipped, 'f.qcow2', 's')).toThrow(/f\.qcow2: session 's' machine record is corrupted: CRC-32/);
    const record = (text: string) => {
      const bytes = new TextEncoder().encode(text);
      const out = new Uint8Array(40 + bytes.length);
      out.set(good.subarray(0, 40));
      const v = new DataView(out.buffer);
      v.setUint32(32, bytes.length);
      v.setUint32(36, crc32(bytes));
      out.set(bytes, 40);
      return out;
    };
    expect(() => decodeMachineRecord(record('{"diskBus":"scsi"}'), 'f', 's')).toThrow(/names no known disk bus \("scsi"\)/);
    expect(() => decodeMachineRecord(record('{nope'), 'f', 's')).toThrow(/machine record is not JSON/);
    const long = good.slice();
    new DataView(long.buffer).setUint32(32, 0x7fffffff);
    await expect(decodeVmState(long, long.length, nodeCodecs(), 'f', 's')).rejects.toThrow(/claims a 2147483647-byte machine record/);
  });
});

describe("the disk Worker's session path (src/web/disk-sessions.ts)", () => {
  it('save, list, resume (disk reverted, state returned), delete', async () => {
    const path = await overlay(tempDir());
    const state = fakeV86State(64 * MiB, 11);
    const image = await openRw(path);
    const saved = await saveSessionState(image, 'tab', state.slice().buffer, { clockNsec: 5e9, replace: false });
    expect(saved).toMatchObject({ name: 'tab', rawBytes: state.length });
    await image.write(0, new Uint8Array(65536).fill(0x33));
    expect(sessionsOf(image).map((s) => [s.name, s.vmStateSize])).toEqual([['tab', saved.vmStateSize]]);
    const resumed = await resumeSessionState(image, saved.id);
    expect(sha256Bytes(new Uint8Array(resumed.state))).toBe(sha256Bytes(state));
    expect((await image.read(0, 1))[0]).toBe(0x11);
    await deleteSessionById(image, saved.id);
    expect(sessionsOf(image)).toEqual([]);
    await image.close();
    await expectClean(path);
  });

  it('a corrupted or truncated VM-state area fails clearly and leaves the disk as it was, usable', async () => {
    const dir = tempDir();
    const path = await overlay(dir);
    let image = await openRw(path);
    const saved = await saveSessionState(image, 'tab', fakeV86State(64 * MiB, 13).buffer as ArrayBuffer, { clockNsec: 0, replace: false });
    // A change after the session: a resume would discard it, a failed one must not.
    await image.write(0, new Uint8Array(65536).fill(0x44));
    await image.close();

    // The VM state's stored bytes, found in the file by content (one run of clusters: nothing else was written).
    image = await openRw(path);
    const snapshot = image.snapshots[0]!;
    const area = await image.readVmState(snapshot);
    await image.close();
    const file = readFileSync(path);
    const at = file.indexOf(Buffer.from(area.subarray(0, 64)));
    expect(at).toBeGreaterThan(0);

    const corrupted = join(dir, 'corrupted.qcow2');
    copyFileSync(path, corrupted);
    patch(corrupted, at + 200, Uint8Array.of(file[at + 200]! ^ 0xff));
    const truncated = join(dir, 'truncated.qcow2');
    copyFileSync(path, truncated);
    // The snapshot entry's vm_state_size (u32 at +32) and the 64-bit one in its extra data (+40), halved.
    const header = file.subarray(0, 72);
    const entry = Number(header.readBigUInt64BE(64));
    const half = Math.floor(saved.vmStateSize / 2);
    const u32 = Buffer.alloc(4);
    u32.writeUInt32BE(half);
    patch(truncated, entry + 32, u32);
    const u64 = Buffer.alloc(8);
    u64.writeBigUInt64BE(BigInt(half));
    patch(truncated, entry + 40, u64);

    // Numbers that would size an allocation: vm_state_size of 1 TiB (entry), the header's raw length at 4 GiB - 1.
    const huge = join(dir, 'huge.qcow2');
    copyFileSync(path, huge);
    const tib = Buffer.alloc(8);
    tib.writeBigUInt64BE(1n << 40n);
    patch(huge, entry + 40, tib);
    const rawLength = join(dir, 'rawlength.qcow2');
    copyFileSync(path, rawLength);
    const claim = Buffer.alloc(8);
    claim.writeBigUInt64BE(2n ** 32n - 1n);
    patch(rawLength, at + 16, claim);

    for (const [file, message] of [
      [corrupted, /corrupted\.qcow2: session '1' VM state is corrupted: CRC-32 0x[0-9a-f]{8} of \d+ bytes, expected 0x[0-9a-f]{8}/],
      [truncated, new RegExp(`truncated\\.qcow2: session '1' VM state is truncated: the header announces ${saved.vmStateSize} bytes, the snapshot records ${half}`)],
      [huge, /huge\.qcow2: session '1' VM state claims 1099511627776 bytes \(vm_state_size of snapshot 1\), more than the image stores \(\d+ bytes\): damaged/],
      [rawLength, /rawlength\.qcow2: session '1' VM state claims 4294967295 raw bytes, but its \d+-byte zstd payload holds \d+ \(damaged header\)/],
    ] as const) {
      const before = sha256File(file);
      const device = await openRw(file);
      // Refused at once, before anything is sized by the damaged number.
      const started = performance.now();
      const memory = process.memoryUsage().arrayBuffers;
      await expect(resumeSessionState(device, saved.id)).rejects.toThrow(message);
      expect(performance.now() - started).toBeLessThan(10_000);
      expect(process.memoryUsage().arrayBuffers - memory).toBeLessThan(512 * MiB);
      // Nothing reverted: the change made after the session is still there, and the disk takes writes.
      expect((await device.read(0, 1))[0]).toBe(0x44);
      await device.close();
      expect(sha256File(file)).toBe(before);
      await expectClean(file);
      const again = await openRw(file);
      await again.write(MiB, new Uint8Array(4096).fill(0x55));
      await again.close();
      await expectClean(file);
      await qemuIo(['-c', 'read -P 0x44 0 64k', '-c', 'read -P 0x55 1M 4k', file]);
    }
  });
});

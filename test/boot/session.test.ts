/**
 * Sessions (issue 8): a running guest saved inside its overlay and resumed by a new `qcow86 boot` process.
 *
 * One boot in this process starts a counter that writes to a file and the console, saves session 'counter' and
 * keeps running a little; the resumed process must print exactly the value the original printed next (the guest
 * state is the same), with no replay of the old console. qemu-img is the oracle for the file: it lists the
 * sessions with their VM sizes, finds the image clean and converts a session's disk. Damaged VM-state areas fail
 * before the disk is touched.
 */
import { copyFileSync, openSync, readSync, writeSync, closeSync, readFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { buildEngine } from '../helpers/build.js';
import { qemuCheck, qemuImg, run, tempDir } from '../helpers/qemu.js';
import { FileStore, nodeCodecs, nodeResolver } from '../../src/io/node.js';
import { openImage } from '../../src/qcow2/open.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import type { Machine } from '../../src/v86/machine.js';
import { crc32, decodeVmState, encodeVmState, listSessions, saveSession } from '../../src/v86/session.js';
import { bootGuest, BOOT_TIMEOUT_MS } from './guest.js';

const COUNTER = 'i=0; while true; do i=$((i+1)); echo $i > /c; echo C=$i; sleep 1; done &\n';
const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

/** `qcow86 boot ...` in a new process, from a private build (a concurrent `npm run build` cannot interfere). */
async function qcow86(args: string[]) {
  const dist = buildEngine();
  const cli = join(dist, 'node/cli.js');
  return run(process.execPath, ['--input-type=module', '-e', 'const { main } = await import(process.argv[1]); process.exitCode = await main(process.argv.slice(2));', cli, ...args]);
}

/** Big-endian fields of a qcow2 file, read and patched in place. */
function readAt(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  const buffer = Buffer.alloc(length);
  readSync(fd, buffer, 0, length, offset);
  closeSync(fd);
  return buffer;
}

function writeAt(path: string, offset: number, bytes: Buffer): void {
  const fd = openSync(path, 'r+');
  writeSync(fd, bytes, 0, bytes.length, offset);
  closeSync(fd);
}

/** The first snapshot entry's offset and the host offset of its VM state's first cluster, found by hand. */
function locateVmState(path: string): { entry: number; host: number } {
  const header = readAt(path, 0, 72);
  const clusterBits = header.readUInt32BE(20);
  const clusterSize = 2 ** clusterBits;
  const entry = Number(header.readBigUInt64BE(64));
  const e = readAt(path, entry, 56);
  const l1Offset = Number(e.readBigUInt64BE(0));
  const diskSize = Number(e.readBigUInt64BE(48));
  const l2Entries = clusterSize / 8;
  // QEMU's (and our) VM-state offset: the first L1 slot wholly past the disk.
  const l1Index = Math.ceil(diskSize / (l2Entries * clusterSize));
  const mask = 0x00fffffffffffe00n;
  const l2Offset = Number(readAt(path, l1Offset + l1Index * 8, 8).readBigUInt64BE(0) & mask);
  const host = Number(readAt(path, l2Offset, 8).readBigUInt64BE(0) & mask);
  expect(host).toBeGreaterThan(0);
  return { entry, host };
}

describe('the VM-state area format', () => {
  test('round trip in each format; every kind of damage is named', async () => {
    const codecs = nodeCodecs();
    const raw = new Uint8Array(200_000).map((_, i) => (i * 7) % 251);
    for (const format of ['raw', 'deflate', 'zstd'] as const) {
      const area = await encodeVmState(raw, format, codecs);
      expect(await decodeVmState(area, area.length, codecs, 'f', 's')).toEqual(raw);
      if (format !== 'raw') expect(area.length).toBeLessThan(raw.length);
    }
    const area = await encodeVmState(raw, 'zstd', codecs);
    const decode = (bytes: Uint8Array) => decodeVmState(bytes, bytes.length, codecs, 'x.qcow2', 'one');
    await expect(decode(area.subarray(0, area.length - 10))).rejects.toThrow(/x\.qcow2: session 'one' VM state is truncated/);
    await expect(decode(area.subarray(0, 10))).rejects.toThrow(/shorter than its 32-byte header/);
    const flipped = area.slice();
    flipped[100]! ^= 0xff;
    await expect(decode(flipped)).rejects.toThrow(/corrupted: CRC-32/);
    await expect(decode(new Uint8Array(area.length))).rejects.toThrow(/does not start with 'qcow86vm'/);
    expect(crc32(new TextEncoder().encode('123456789'))).toBe(0xcbf43926);
  });
});

describe('sessions in the overlay', { timeout: BOOT_TIMEOUT_MS + 600_000 }, () => {
  const dir = tempDir('qcow86-session-');
  const overlay = join(dir, 'guest.qcow2');
  let machine: Machine | undefined;
  let image: Qcow2Image;
  /** What the original guest printed next after the save: the resumed guest must print the same. */
  let nextAfterSave: number;
  let saved: Awaited<ReturnType<typeof saveSession>>;
  let resumed: Awaited<ReturnType<typeof qcow86>>;

  beforeAll(async () => {
    machine = await bootGuest({ overlay });
    image = machine.disk.device as Qcow2Image;
    expect(image).toBeInstanceOf(Qcow2Image);
    await machine.send(COUNTER).expect('C=3\n');
    saved = await saveSession(machine, image, 'counter', nodeCodecs());
    const next = await machine.expect(/C=(\d+)\n/);
    nextAfterSave = Number(next.match[1]);
    await machine.expect(`C=${nextAfterSave + 2}\n`);
    // Disk changes after the save: resuming discards them.
    await machine.send('echo later > /after-save; sync\n').expect(`C=${nextAfterSave + 4}\n`);
    await machine.close();
    machine = undefined;
    resumed = await qcow86([
      'boot', '--overlay', overlay, '--resume', 'counter', '--timeout', '300',
      '--expect', `C=${nextAfterSave + 1}\n`,
      '--send', 'cat /c; ls /after-save; echo DONE$((1+1))\n', '--expect', 'DONE2',
      '--save-on-exit', 'later',
    ]);
  }, BOOT_TIMEOUT_MS + 500_000);

  afterAll(async () => {
    await machine?.close().catch(() => {});
  });

  test('the saved VM state is v86 state compressed below its raw size', () => {
    expect(saved.rawBytes).toBeGreaterThan(1024 * 1024);
    expect(saved.vmStateSize).toBeGreaterThan(32);
    expect(saved.vmStateSize).toBeLessThan(saved.rawBytes);
    console.log(`session: raw ${saved.rawBytes} B, stored ${saved.vmStateSize} B (${saved.format}), paused ${saved.pausedMs.toFixed(0)} ms`);
  });

  test('a new process resumes: the counter continues from the saved value, the file agrees, no old output', () => {
    expect(resumed.exitCode, resumed.stderr).toBe(0);
    expect(resumed.stderr).toMatch(/resumed session 'counter'.*disk changes made after it were discarded/);
    const out = resumed.stdout.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '').replace(/\r/g, '');
    const counts = [...out.matchAll(/^C=(\d+)$/gm)].map((m) => Number(m[1]));
    // The first value printed is the one the original printed right after the save: same state, not a reboot.
    expect(counts[0]).toBe(nextAfterSave);
    expect(counts).toEqual(counts.map((_, i) => nextAfterSave + i));
    // Nothing from before the save: no boot messages, no earlier counter values.
    expect(out).not.toMatch(/SYSLINUX|Linux version|C=1\n/);
    const command = out.indexOf('DONE$((1+1))');
    const file = /^(\d+)$/m.exec(out.slice(command));
    expect(file, out).not.toBeNull();
    const before = Number([...out.slice(0, command + file!.index).matchAll(/^C=(\d+)$/gm)].at(-1)![1]);
    // `echo $i > /c` runs just before `echo C=$i`: the file holds the last printed value or the next one.
    expect([before, before + 1]).toContain(Number(file![1]));
    // The file written after the save belongs to the discarded disk changes.
    expect(out).toMatch(/ls: \/after-save: No such file or directory/);
    expect(resumed.stderr).toMatch(/saved session 'later': VM state [\d.]+ MiB raw, [\d.]+ MiB stored/);
  });

  test('qemu-img lists both sessions with their VM sizes, checks clean and converts a session', async () => {
    const list = await qemuImg(['snapshot', '-l', overlay]);
    for (const name of ['counter', 'later']) {
      const line = list.split('\n').find((l) => l.split(/\s+/)[1] === name);
      expect(line, list).toBeDefined();
      expect(line).not.toMatch(/\s0 B\s/);
      expect(line).toMatch(/[\d.]+ MiB/);
    }
    const info = JSON.parse(await qemuImg(['info', '--output=json', overlay]));
    const sizes = Object.fromEntries(info.snapshots.map((s: { name: string; 'vm-state-size': number }) => [s.name, s['vm-state-size']]));
    expect(sizes.counter).toBe(saved.vmStateSize);
    expect(sizes.later).toBeGreaterThan(0);
    const check = await qemuCheck(overlay);
    expect(check.exitCode, JSON.stringify(check.result)).toBe(0);
    const out = join(dir, 'counter.qcow2');
    await qemuImg(['convert', '-l', 'counter', '-O', 'qcow2', overlay, out]);
    expect(JSON.parse(await qemuImg(['info', '--output=json', out]))['virtual-size']).toBe(image.virtualSize);
  });

  test('a corrupted or truncated VM-state area fails with a clear message and changes nothing', async () => {
    const corrupted = join(dir, 'corrupted.qcow2');
    copyFileSync(overlay, corrupted);
    const { entry, host } = locateVmState(corrupted);
    // A byte of the compressed v86 state (past the 40-byte header and the machine record), then one of the
    // machine record (the disk bus and the virtio device's state).
    for (const [at, damaged] of [[4000, 'VM state'], [60, 'machine record']] as const) {
      copyFileSync(overlay, corrupted);
      const byte = readAt(corrupted, host + at, 1);
      writeAt(corrupted, host + at, Buffer.of(byte[0]! ^ 0xff));
      const hash = sha256(corrupted);
      const bad = await qcow86(['boot', '--overlay', corrupted, '--resume', 'counter', '--expect', 'never']);
      expect(bad.exitCode).toBe(1);
      expect(bad.stderr).toMatch(new RegExp(`qcow86 boot: .*corrupted\\.qcow2: session 'counter' ${damaged} is corrupted: CRC-32 0x[0-9a-f]{8} of \\d+ bytes`));
      expect(sha256(corrupted)).toBe(hash);
      expect((await qemuCheck(corrupted)).exitCode).toBe(0);
    }

    const truncated = join(dir, 'truncated.qcow2');
    copyFileSync(overlay, truncated);
    const half = Math.floor(saved.vmStateSize / 2);
    const size = Buffer.alloc(4);
    size.writeUInt32BE(half);
    writeAt(truncated, entry + 32, size);
    const large = Buffer.alloc(8);
    large.writeBigUInt64BE(BigInt(half));
    writeAt(truncated, entry + 40, large);
    const cut = await qcow86(['boot', '--overlay', truncated, '--resume', 'counter', '--expect', 'never']);
    expect(cut.exitCode).toBe(1);
    expect(cut.stderr).toMatch(new RegExp(`session 'counter' VM state is truncated: the header announces ${saved.vmStateSize} bytes, the snapshot records ${half}`));
    expect((await qemuCheck(truncated)).exitCode).toBe(0);

    // The disk stays usable: the engine opens it, the intact session is listed, the guest's disk reads.
    const device = await openImage(await FileStore.open(corrupted, { readOnly: false }), { readOnly: false, resolver: nodeResolver(), codecs: nodeCodecs() });
    try {
      expect(listSessions(device as Qcow2Image).map((s) => s.name)).toEqual(['counter', 'later']);
      const mbr = await device.read(0, 512);
      expect(mbr[510]).toBe(0x55);
      expect(mbr[511]).toBe(0xaa);
    } finally {
      await device.close();
    }
  });
});

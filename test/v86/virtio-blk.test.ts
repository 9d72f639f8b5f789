/**
 * Our virtio-blk device inside a real v86 (no guest running), driven by a spec-written test driver
 * (virtio-driver.ts) through the PCI configuration ports, the I/O BAR and guest RAM. The disk behind it is a real
 * image: bytes are checked on the image itself, and for discard and zero writes on a qcow2 overlay made by
 * qemu-img, with qemu-img map/check and qemu-io as the independent truth.
 */
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { afterEach, describe, expect, test } from 'vitest';
import { MemoryStore } from '../../src/io/memory.js';
import { FileStore, nodeCodecs, nodeResolver } from '../../src/io/node.js';
import { RawImage } from '../../src/qcow2/raw.js';
import { openImage } from '../../src/qcow2/open.js';
import type { BlockDevice } from '../../src/qcow2/device.js';
import { restoreV86State } from '../../src/v86/disk-bus.js';
import { tempDir } from '../helpers/qemu.js';
import { Driver, F, STATUS, T, segment, virtioMachine, type TestMachine } from './virtio-driver.js';

const MiB = 1024 * 1024;
const DISK = 4 * MiB;
/** What a current Linux negotiates. */
const LINUX = [F.SIZE_MAX, F.SEG_MAX, F.BLK_SIZE, F.FLUSH, F.DISCARD, F.WRITE_ZEROES, F.INDIRECT_DESC, F.EVENT_IDX, F.VERSION_1];

const machines: TestMachine[] = [];
afterEach(async () => {
  for (const m of machines.splice(0)) await m.destroy();
});

/** A raw disk in memory whose writes (or reads) can be held, to see what waits for them. */
class GatedDisk implements BlockDevice {
  readonly format = 'raw' as const;
  readonly name = 'gated';
  readonly virtualSize: number;
  writeGate: Promise<void> | undefined;
  readGate: Promise<void> | undefined;
  private openWrites: (() => void) | undefined;
  private openReads: (() => void) | undefined;
  constructor(readonly inner: RawImage, readonly readOnly = false) {
    this.virtualSize = inner.virtualSize;
  }
  holdWrites(): void {
    this.writeGate = new Promise((resolve) => (this.openWrites = resolve));
  }
  releaseWrites(): void {
    this.openWrites?.();
    this.writeGate = undefined;
  }
  holdReads(): void {
    this.readGate = new Promise((resolve) => (this.openReads = resolve));
  }
  releaseReads(): void {
    this.openReads?.();
    this.readGate = undefined;
  }
  async read(offset: number, length: number) {
    await this.readGate;
    return this.inner.read(offset, length);
  }
  async write(offset: number, data: Uint8Array) {
    await this.writeGate;
    return this.inner.write(offset, data);
  }
  flush() {
    return this.inner.flush();
  }
  close() {
    return this.inner.close();
  }
}

async function gatedDisk(readOnly = false): Promise<GatedDisk> {
  const bytes = new Uint8Array(DISK).map((_, i) => (i * 7 + (i >> 9)) & 0xff);
  return new GatedDisk(await RawImage.open(new MemoryStore('disk', bytes), { readOnly: false }), readOnly);
}

async function setup(disk: BlockDevice, features = LINUX): Promise<{ m: TestMachine; driver: Driver }> {
  const m = await virtioMachine(disk);
  machines.push(m);
  const driver = new Driver(m);
  driver.init(features);
  return { m, driver };
}

const pattern = (length: number, seed: number) => new Uint8Array(length).map((_, i) => (i * 31 + seed) & 0xff);

describe('virtio-blk device', () => {
  test('PCI identity, capabilities, features and configuration are what the spec and the issue ask', async () => {
    const disk = await gatedDisk();
    const m = await virtioMachine(disk);
    machines.push(m);
    const driver = new Driver(m);
    const space = driver.configSpace();
    const view = new DataView(space.buffer);
    expect(view.getUint16(0, true)).toBe(0x1af4);
    expect(view.getUint16(2, true)).toBe(0x1042);
    expect(space[8]).toBe(1);
    expect(view.getUint16(6, true) & 0x10).toBe(0x10);
    // Walk the capability list: common (1), ISR (3), device (4) and notify (2) configurations, all in BAR 0.
    const types = new Set<number>();
    for (let at = space[0x34]!; at; at = space[at + 1]!) {
      expect(space[at]).toBe(0x09);
      expect(space[at + 4]).toBe(0);
      types.add(space[at + 3]!);
    }
    expect([...types].sort()).toEqual([1, 2, 3, 4]);
    expect(space[0x3d]).toBe(1);

    const offered = driver.deviceFeatures();
    for (const bit of [F.SIZE_MAX, F.SEG_MAX, F.BLK_SIZE, F.FLUSH, F.DISCARD, F.WRITE_ZEROES, F.VERSION_1, F.INDIRECT_DESC, F.EVENT_IDX]) {
      expect(offered & (1n << BigInt(bit)), `feature ${bit}`).not.toBe(0n);
    }
    expect(offered & (1n << BigInt(F.RO))).toBe(0n);
    const config = driver.deviceConfig();
    expect(config.getBigUint64(0, true)).toBe(BigInt(DISK / 512));
    expect(config.getUint32(8, true)).toBeGreaterThanOrEqual(4096); // size_max
    expect(config.getUint32(12, true)).toBeGreaterThanOrEqual(1); // seg_max
    expect(config.getUint32(20, true)).toBe(512); // blk_size
    expect(config.getUint32(36, true)).toBeGreaterThan(0); // max_discard_sectors
    expect(config.getUint32(48, true)).toBeGreaterThan(0); // max_write_zeroes_sectors

    // A driver without VERSION_1 (a legacy one) is refused FEATURES_OK.
    driver.setStatus(0);
    driver.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER);
    driver.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK);
    expect(driver.status() & STATUS.FEATURES_OK).toBe(0);
  });

  test('writes then reads, many in flight at once, direct and indirect chains, several segments', async () => {
    const disk = await gatedDisk();
    const { driver } = await setup(disk);
    const data = pattern(64 * 1024, 3);
    const wrote = await driver.run({ type: T.OUT, sector: 100, out: data, pieces: 4096 });
    expect(wrote.status).toBe(0);
    // Eight reads made available before one notify: all run, answered in any order, each with its own bytes.
    const heads = new Map<number, number>();
    for (let i = 0; i < 8; i++) heads.set(driver.post({ type: T.IN, sector: 100 + 16 * i, inLength: 8192, indirect: i % 2 === 1, pieces: i % 3 === 0 ? 512 : 8192 }), i);
    driver.notify();
    const done = await driver.completions(8);
    expect(new Set(done.map((d) => d.head))).toEqual(new Set(heads.keys()));
    for (const d of done) {
      const i = heads.get(d.head)!;
      expect(d.status).toBe(0);
      expect(d.written).toBe(8192 + 1);
      expect(d.data).toEqual(data.subarray(i * 8192, (i + 1) * 8192));
    }
    // Untouched sectors read the disk's own bytes.
    const before = await driver.run({ type: T.IN, sector: 0, inLength: 4096 });
    expect(before.data).toEqual(await disk.inner.read(0, 4096));
  });

  test('FLUSH completes only once every write acknowledged before it is on the disk', async () => {
    const disk = await gatedDisk();
    const { driver } = await setup(disk);
    const data = pattern(32 * 1024, 9);
    // The write is acknowledged from the cache (the disk has not seen it).
    expect((await driver.run({ type: T.OUT, sector: 8, out: data })).status).toBe(0);
    expect(await disk.inner.read(8 * 512, data.length)).not.toEqual(data);
    disk.holdWrites();
    driver.post({ type: T.FLUSH });
    driver.notify();
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(driver.takeUsed()).toEqual([]);
    disk.releaseWrites();
    const [flushed] = await driver.completions(1);
    expect(flushed!.status).toBe(0);
    expect(await disk.inner.read(8 * 512, data.length)).toEqual(data);
  });

  test('without FLUSH negotiated a write completes only once durable (write-through)', async () => {
    const disk = await gatedDisk();
    const { driver } = await setup(disk, LINUX.filter((f) => f !== F.FLUSH));
    disk.holdWrites();
    driver.post({ type: T.OUT, sector: 0, out: pattern(4096, 1) });
    driver.notify();
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(driver.takeUsed()).toEqual([]);
    disk.releaseWrites();
    expect((await driver.completions(1))[0]!.status).toBe(0);
    expect(await disk.inner.read(0, 4096)).toEqual(pattern(4096, 1));
  });

  test('GET_ID, unknown requests, out-of-range sectors and odd lengths get their status', async () => {
    const { driver } = await setup(await gatedDisk());
    const id = await driver.run({ type: T.GET_ID, inLength: 20 });
    expect(id.status).toBe(0);
    expect(new TextDecoder().decode(id.data).replace(/\0+$/, '')).toBe('qcow86');
    expect((await driver.run({ type: 99 })).status).toBe(2);
    expect((await driver.run({ type: T.IN, sector: DISK / 512, inLength: 512 })).status).toBe(1);
    expect((await driver.run({ type: T.IN, sector: DISK / 512 - 1, inLength: 1024 })).status).toBe(1);
    expect((await driver.run({ type: T.IN, sector: 2 ** 52, inLength: 512 })).status).toBe(1);
    expect((await driver.run({ type: T.OUT, sector: 0, out: new Uint8Array(100) })).status).toBe(1);
    // A discard with the unmap flag (only write-zeroes has it) or a reserved bit is unsupported.
    expect((await driver.run({ type: T.DISCARD, out: segment(0, 8, 1) })).status).toBe(2);
    expect((await driver.run({ type: T.WRITE_ZEROES, out: segment(0, 8, 2) })).status).toBe(2);
    expect((await driver.run({ type: T.DISCARD, out: segment(DISK / 512 - 4, 8) })).status).toBe(1);
  });

  test('a read-only disk offers RO and refuses writes, discards and zero writes', async () => {
    const disk = await gatedDisk(true);
    const m = await virtioMachine(disk);
    machines.push(m);
    const driver = new Driver(m);
    expect(driver.deviceFeatures() & (1n << BigInt(F.RO))).not.toBe(0n);
    driver.init([...LINUX, F.RO]);
    const before = await disk.inner.read(0, 4096);
    expect((await driver.run({ type: T.OUT, sector: 0, out: pattern(4096, 5) })).status).toBe(1);
    expect((await driver.run({ type: T.DISCARD, out: segment(0, 8) })).status).toBe(1);
    expect((await driver.run({ type: T.WRITE_ZEROES, out: segment(0, 8) })).status).toBe(1);
    expect((await driver.run({ type: T.IN, sector: 0, inLength: 4096 })).data).toEqual(before);
    await m.adapter.flush();
    expect(await disk.inner.read(0, 4096)).toEqual(before);
  });

  test('interrupts: raised per the NO_INTERRUPT flag or used_event (EVENT_IDX), ISR read clears them', async () => {
    const plain = await setup(await gatedDisk(), LINUX.filter((f) => f !== F.EVENT_IDX));
    await plain.driver.run({ type: T.IN, inLength: 512 });
    expect(plain.m.irqs()).toBe(1);
    expect(plain.driver.isr()).toBe(1);
    expect(plain.driver.isr()).toBe(0);
    plain.driver.availFlags(1);
    await plain.driver.run({ type: T.IN, inLength: 512 });
    expect(plain.m.irqs()).toBe(1);

    const evented = await setup(await gatedDisk());
    const { driver, m } = evented;
    // used_event 2: the driver wants to hear once the used index passes 2, i.e. at the third completion.
    driver.usedEvent(2);
    await driver.run({ type: T.IN, inLength: 512 });
    await driver.run({ type: T.IN, inLength: 512 });
    expect(m.irqs()).toBe(0);
    await driver.run({ type: T.IN, inLength: 512 });
    expect(m.irqs()).toBe(1);
    // The device asks to be notified of the next request (avail_event = the next available index).
    expect(driver.availEvent()).toBe(3);
  });

  test('a polling driver (no interrupts, like SeaBIOS) reading on is answered from read-ahead, and a write drops it', async () => {
    const disk = await gatedDisk();
    const { m, driver } = await setup(disk, LINUX.filter((f) => f !== F.EVENT_IDX));
    driver.availFlags(1);
    const expected = await disk.inner.read(0, 1024 * 1024);
    for (let sector = 0; sector < 1024; sector += 128) {
      const done = await driver.run({ type: T.IN, sector, inLength: 65536 });
      expect(done.status).toBe(0);
      expect(done.data).toEqual(expected.subarray(sector * 512, sector * 512 + 65536));
    }
    // The first two reads went to the disk; the next ones were read while the driver worked on the last.
    expect(m.adapter.stats.cacheHits).toBeGreaterThanOrEqual(5);
    // A write into the stretch read ahead: the next read sees the write, not the stale read-ahead.
    expect((await driver.run({ type: T.OUT, sector: 1024 + 8, out: pattern(4096, 77) })).status).toBe(0);
    const after = await driver.run({ type: T.IN, sector: 1024, inLength: 65536 });
    expect(after.data.subarray(4096, 8192)).toEqual(pattern(4096, 77));
    expect(after.data.subarray(0, 4096)).toEqual(await disk.inner.read(1024 * 512, 4096));
    // A driver that takes interrupts gets no read-ahead.
    const { m: other, driver: interrupted } = await setup(await gatedDisk());
    for (let sector = 0; sector < 512; sector += 128) await interrupted.run({ type: T.IN, sector, inLength: 65536 });
    expect(other.adapter.stats.cacheHits).toBe(0);
  });

  test('a malformed ring (a descriptor loop, a buffer outside RAM) sets DEVICE_NEEDS_RESET with a config interrupt', async () => {
    for (const chain of [
      [[0x200000, 16, 1, 1], [0x200100, 1, 3, 0]] as Array<[number, number, number, number]>, // 0 -> 1 -> 0 -> ...
      [[0x7fff0000, 16, 1, 1], [0x200100, 1, 2, 0]] as Array<[number, number, number, number]>,
    ]) {
      const { m, driver } = await setup(await gatedDisk());
      driver.postRaw(chain);
      driver.notify();
      expect(driver.status() & STATUS.NEEDS_RESET).toBe(STATUS.NEEDS_RESET);
      expect(driver.isr() & 2).toBe(2);
      expect(m.irqs()).toBe(1);
      // A reset brings it back.
      driver.init(LINUX);
      expect((await driver.run({ type: T.IN, inLength: 512 })).status).toBe(0);
    }
  });

  test('device state saved with a request in flight resumes in another machine, which runs the request again', async () => {
    const disk = await gatedDisk();
    const { m, driver } = await setup(disk);
    await driver.run({ type: T.OUT, sector: 64, out: pattern(8192, 11) });
    await m.adapter.flush();
    disk.holdReads();
    driver.post({ type: T.IN, sector: 64, inLength: 8192 });
    driver.notify();
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(m.device.requestsInFlight).toBe(1);
    const v86State = await m.emulator.save_state();
    const deviceState = JSON.parse(JSON.stringify(m.device.state()));
    expect(deviceState.inFlight).toHaveLength(1);

    const other = await virtioMachine(disk);
    machines.push(other);
    disk.releaseReads();
    await restoreV86State(other.emulator, v86State);
    other.device.restore(deviceState);
    // The restored machine's driver state: the same rings in the same memory.
    const resumed = Object.assign(Object.create(Driver.prototype) as Driver, driver, { m: other });
    const [done] = await resumed.completions(1);
    expect(done!.status).toBe(0);
    expect(done!.data).toEqual(pattern(8192, 11));
    expect(other.irqs()).toBeGreaterThanOrEqual(1);
    // A state that does not fit is refused by name.
    expect(() => other.device.restore({ ...deviceState, inFlight: [9999] })).toThrow(/descriptor index 9999/);
  });
});

describe('DISCARD and WRITE_ZEROES on a qcow2 overlay (qemu-img as the oracle)', () => {
  test('discarded and zeroed ranges read as zeros over backing data; whole discarded clusters leave the overlay', async () => {
    const dir = tempDir('qcow86-virtio-');
    const base = join(dir, 'base.qcow2');
    const overlay = join(dir, 'overlay.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '8M']);
    execFileSync('qemu-io', ['-c', 'write -P 0x5a 0 8M', base], { stdio: 'ignore' });
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay]);
    const device = await openImage(await FileStore.open(overlay, { readOnly: false }), { readOnly: false, resolver: nodeResolver(), codecs: nodeCodecs() });
    const { m, driver } = await setup(device);
    const overlayData = () => (JSON.parse(execFileSync('qemu-img', ['map', '--output=json', overlay]).toString()) as Array<{ depth: number; data: boolean; length: number; start: number }>)
      .filter((e) => e.depth === 0 && e.data);

    // 2 MiB of guest data in the overlay (32 clusters), flushed.
    expect((await driver.run({ type: T.OUT, sector: 2048, out: pattern(1 * MiB, 1) })).status).toBe(0);
    expect((await driver.run({ type: T.OUT, sector: 4096, out: pattern(1 * MiB, 2) })).status).toBe(0);
    expect((await driver.run({ type: T.FLUSH })).status).toBe(0);
    expect(overlayData().reduce((sum, e) => sum + e.length, 0)).toBe(2 * MiB);

    // Discard 1 MiB of overlay data and 1 MiB of base data (two segments); zero 64 KiB of base data with unmap
    // and 64 KiB of overlay data without.
    expect((await driver.run({ type: T.DISCARD, out: new Uint8Array([...segment(2048, 2048), ...segment(8192, 2048)]) })).status).toBe(0);
    expect((await driver.run({ type: T.WRITE_ZEROES, out: segment(12288, 128, 1) })).status).toBe(0);
    expect((await driver.run({ type: T.WRITE_ZEROES, out: segment(4096, 128) })).status).toBe(0);
    // Read back through the device before the write-back: the same zeros.
    for (const sector of [2048, 8192, 12288, 4096]) {
      const read = await driver.run({ type: T.IN, sector, inLength: 64 * 1024 });
      expect([...new Set(read.data)], `sector ${sector}`).toEqual([0]);
    }
    expect([...new Set((await driver.run({ type: T.IN, sector: 4096 + 128, inLength: 4096 })).data)].length).toBeGreaterThan(1);
    expect((await driver.run({ type: T.FLUSH })).status).toBe(0);
    expect(m.adapter.stats.discards).toBe(2);
    expect(m.adapter.stats.zeroWrites).toBe(2);

    // qemu-img: the discarded megabyte left the overlay; the image is clean; qemu-io reads zeros where the
    // base has 0x5a.
    const data = overlayData();
    const covered = (from: number, to: number) => data.some((e) => e.start < to && e.start + e.length > from);
    expect(covered(1 * MiB, 2 * MiB)).toBe(false);
    expect(covered(2 * MiB, 3 * MiB)).toBe(true);
    execFileSync('qemu-img', ['check', overlay]);
    for (const [offset, length] of [[1 * MiB, 1 * MiB], [4 * MiB, 1 * MiB], [6 * MiB, 64 * 1024], [2 * MiB, 64 * 1024]]) {
      const out = execFileSync('qemu-io', ['-r', '-c', `read -P 0 ${offset} ${length}`, overlay]).toString();
      expect(out, `${offset}+${length}`).not.toMatch(/Pattern verification failed/);
    }
    const base5a = execFileSync('qemu-io', ['-r', '-c', `read -P 0x5a ${7 * MiB} 64k`, overlay]).toString();
    expect(base5a).not.toMatch(/Pattern verification failed/);
    await m.adapter.close();
  });
});

/**
 * V86DiskAdapter semantics against a real raw image in memory whose device calls can be held back: the guest
 * always reads what it wrote last, also while the write is in flight; PIO buffers are copied before set()
 * returns; dirty data is bounded; flush() makes every acknowledged write reach the device; aborted reads stay
 * unanswered; get_state never carries disk contents.
 */
import { describe, expect, test } from 'vitest';
import { MemoryStore } from '../../src/io/memory.js';
import { RawImage } from '../../src/qcow2/raw.js';
import type { BlockDevice } from '../../src/qcow2/device.js';
import { V86DiskAdapter } from '../../src/v86/disk.js';

const SIZE = 1024 * 1024;

/** A real device whose writes wait until `release()`: models a slow store with writes in flight. */
class GatedDevice implements BlockDevice {
  readonly format = 'raw' as const;
  readonly name = 'gated';
  readonly readOnly = false;
  readonly virtualSize: number;
  gate: Promise<void> | undefined;
  private open: (() => void) | undefined;
  writes = 0;
  constructor(private readonly inner: RawImage) {
    this.virtualSize = inner.virtualSize;
  }
  hold(): void {
    this.gate = new Promise((resolve) => (this.open = resolve));
  }
  release(): void {
    this.open?.();
    this.gate = undefined;
  }
  read(offset: number, length: number) {
    return this.inner.read(offset, length);
  }
  async write(offset: number, data: Uint8Array) {
    this.writes++;
    await this.gate;
    return this.inner.write(offset, data);
  }
  /** Whole 4 KiB units read as zeros afterwards; parts of a unit keep their bytes (like qcow2 clusters). */
  discarded = 0;
  async discard(offset: number, length: number) {
    this.discarded++;
    await this.gate;
    const from = Math.ceil(offset / 4096) * 4096;
    const to = Math.floor((offset + length) / 4096) * 4096;
    if (to > from) await this.inner.write(from, new Uint8Array(to - from));
  }
  flush() {
    return this.inner.flush();
  }
  close() {
    return this.inner.close();
  }
}

async function setup(options: ConstructorParameters<typeof V86DiskAdapter>[1] = {}) {
  const store = new MemoryStore('disk', new Uint8Array(SIZE));
  const raw = await RawImage.open(store, { readOnly: false });
  const device = new GatedDevice(raw);
  return { raw, device, disk: new V86DiskAdapter(device, { flushDelayMs: 10, ...options }) };
}

const read = (disk: V86DiskAdapter, start: number, length: number, signal?: AbortSignal) =>
  new Promise<Uint8Array>((resolve) => disk.get(start, length, resolve, signal ? { signal } : undefined));
const write = (disk: V86DiskAdapter, start: number, data: Uint8Array) => new Promise<void>((resolve) => disk.set(start, data, resolve));
const filled = (length: number, value: number) => new Uint8Array(length).fill(value);

describe('V86DiskAdapter', () => {
  test('load() calls onload; get_and_cache(0) feeds get_from_cache(0) with the MBR', async () => {
    const { raw, disk } = await setup();
    await raw.write(510, Uint8Array.of(0x55, 0xaa));
    let loaded = false;
    disk.onload = () => (loaded = true);
    disk.load();
    expect(loaded).toBe(true);
    await new Promise<Uint8Array>((resolve) => disk.get_and_cache(0, 512, resolve));
    expect([...disk.get_from_cache(0, 512)!.subarray(510)]).toEqual([0x55, 0xaa]);
  });

  test('a PIO scratch buffer reused right after set() does not change what was written', async () => {
    const { raw, disk } = await setup();
    const scratch = filled(512, 7);
    disk.set(4096, scratch, () => {});
    scratch.fill(9);
    expect([...new Set(await read(disk, 4096, 512))]).toEqual([7]);
    await disk.flush();
    expect([...new Set(await raw.read(4096, 512))]).toEqual([7]);
  });

  test('reads see the last write while its device write is still in flight, and after it lands', async () => {
    const { raw, device, disk } = await setup();
    device.hold();
    await write(disk, 0, filled(2048, 1));
    await write(disk, 1024, filled(512, 2));
    const flushing = disk.flush();
    await new Promise((resolve) => setTimeout(resolve, 5));
    expect(device.writes).toBeGreaterThan(0);
    // Still held: the device has nothing, the guest sees both writes, the later one on top.
    expect([...new Set(await raw.read(0, 2048))]).toEqual([0]);
    const during = await read(disk, 512, 1536);
    expect([...new Set(during.subarray(0, 512))]).toEqual([1]);
    expect([...new Set(during.subarray(512, 1024))]).toEqual([2]);
    expect([...new Set(during.subarray(1024))]).toEqual([1]);
    device.release();
    await flushing;
    expect(disk.unflushedBytes).toBe(0);
    expect(await read(disk, 512, 1536)).toEqual(during);
    expect(await raw.read(512, 1536)).toEqual(during);
    expect(disk.stats.cacheHits).toBeGreaterThanOrEqual(1);
  });

  test('acknowledgements wait once the dirty bound is reached, and resume when write-back drains', async () => {
    const { device, disk } = await setup({ maxDirtyBytes: 64 * 1024, flushDelayMs: 60_000 });
    device.hold();
    const acks: number[] = [];
    for (let i = 0; i < 4; i++) disk.set(i * 32768, filled(32768, i + 1), () => acks.push(i));
    expect(acks).toEqual([0, 1]);
    expect(disk.stats.throttledWrites).toBe(2);
    device.release();
    await disk.flush();
    expect(acks).toEqual([0, 1, 2, 3]);
  });

  test('the periodic write-back reaches the device without an explicit flush', async () => {
    const { raw, disk } = await setup({ flushDelayMs: 20 });
    await write(disk, 8192, filled(4096, 5));
    await new Promise((resolve) => setTimeout(resolve, 200));
    expect(disk.unflushedBytes).toBe(0);
    expect([...new Set(await raw.read(8192, 4096))]).toEqual([5]);
  });

  test('a read whose signal was aborted is never answered', async () => {
    const { disk } = await setup();
    const controller = new AbortController();
    let answered = false;
    disk.get(0, 512, () => (answered = true), { signal: controller.signal });
    controller.abort();
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(answered).toBe(false);
  });

  test('get_state carries no disk contents; set_state refuses a state made for another disk size', async () => {
    const { disk } = await setup();
    await write(disk, 0, filled(65536, 3));
    expect(JSON.stringify(disk.get_state()).length).toBeLessThan(100);
    expect(() => disk.set_state(['qcow86-disk', 1, SIZE * 2])).toThrow(/disk/);
    disk.set_state(disk.get_state());
    await disk.close();
  });

  test('zero writes read as zeros at once and land in order with the writes around them', async () => {
    const { raw, disk } = await setup();
    await write(disk, 0, filled(8192, 1));
    await disk.guestWriteZeroes(1024, 4096, true);
    await write(disk, 2048, filled(512, 2));
    const expected = filled(8192, 1);
    expected.fill(0, 1024, 5120);
    expected.fill(2, 2048, 2560);
    expect(await read(disk, 0, 8192)).toEqual(expected);
    await disk.flush();
    expect(await raw.read(0, 8192)).toEqual(expected);
    expect(disk.unflushedBytes).toBe(0);
  });

  test('a discard reaches the device before a read over it: the device says what it left', async () => {
    const { raw, device, disk } = await setup();
    await raw.write(0, filled(16384, 7));
    await disk.guestDiscard(1024, 12288);
    const bytes = await read(disk, 0, 16384);
    expect(device.discarded).toBe(1);
    // Whole units 4096..12287 are zeros; the partial units keep their bytes.
    expect([...new Set(bytes.subarray(4096, 12288))]).toEqual([0]);
    expect([...new Set(bytes.subarray(1024, 4096))]).toEqual([7]);
    expect([...new Set(bytes.subarray(12288, 13312))]).toEqual([7]);
    // A later write over the discarded range wins.
    await write(disk, 4096, filled(512, 9));
    expect([...new Set((await read(disk, 4096, 512)))]).toEqual([9]);
  });

  test('a guest flush resolves once everything acknowledged before it is on the device; settle() waits for it', async () => {
    const { raw, device, disk } = await setup({ flushDelayMs: 60_000 });
    await write(disk, 0, filled(4096, 4));
    device.hold();
    let flushed = false;
    const flush = disk.flushForGuest().then(() => (flushed = true));
    let settled = false;
    const settling = disk.settle().then(() => (settled = true));
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(flushed).toBe(false);
    expect(settled).toBe(false);
    device.release();
    await flush;
    await settling;
    expect([...new Set(await raw.read(0, 4096))]).toEqual([4]);
    expect(disk.stats.guestFlushes).toBe(1);
  });

  test('write-through: a write is acknowledged only once it is durable', async () => {
    const { raw, device, disk } = await setup({ writeThrough: true, flushDelayMs: 60_000 });
    device.hold();
    let acked = false;
    disk.set(0, filled(512, 3), () => (acked = true));
    await new Promise((resolve) => setTimeout(resolve, 20));
    expect(acked).toBe(false);
    device.release();
    await disk.settle();
    expect(acked).toBe(true);
    expect([...new Set(await raw.read(0, 512))]).toEqual([3]);
  });
});

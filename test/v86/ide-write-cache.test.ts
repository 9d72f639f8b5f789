/**
 * The IDE write-cache hook (src/v86/ide-write-cache.ts) inside a real v86, driven through the ATA ports as
 * Linux's libata drives them: IDENTIFY DEVICE reports a volatile write cache (words 82 and 85, bit 5) only on our
 * disk, and FLUSH CACHE / FLUSH CACHE EXT keep the drive busy until every acknowledged write is on the image.
 *
 * This is the test that fails when a v86 upgrade moves the internals the hook relies on (the drive object's
 * method and field names, sealed objects, where IDENTIFY is built): then either the hook refuses to install
 * (the machine does not start) or these port-level checks see v86's own behaviour again.
 */
import { afterEach, describe, expect, test } from 'vitest';
import { V86 } from 'v86';
import { MemoryStore } from '../../src/io/memory.js';
import { RawImage } from '../../src/qcow2/raw.js';
import { V86DiskAdapter } from '../../src/v86/disk.js';
import { attachDisk, diskBusOptions } from '../../src/v86/disk-bus.js';
import { v86WasmPath } from '../../src/node/machine-assets.js';
import type { BlockDevice } from '../../src/qcow2/device.js';

const PORT = { DATA: 0x1f0, SECTORS: 0x1f2, LBA_LOW: 0x1f3, DEVICE: 0x1f6, COMMAND: 0x1f7, CONTROL: 0x3f6 };
const BUSY = 0x80;

interface Io {
  port_write8(port: number, value: number): void;
  port_read8(port: number): number;
  port_read16(port: number): number;
}

const emulators: V86[] = [];
afterEach(async () => {
  for (const e of emulators.splice(0)) await e.destroy();
});

/** A raw disk whose writes can be held back. */
class HeldDisk implements BlockDevice {
  readonly format = 'raw' as const;
  readonly name = 'held';
  readonly readOnly = false;
  readonly virtualSize: number;
  gate: Promise<void> | undefined;
  private open: (() => void) | undefined;
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
  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.gate;
    return this.inner.write(offset, data);
  }
  flush() {
    return this.inner.flush();
  }
  close() {
    return this.inner.close();
  }
}

async function machine(options: { writeCache: boolean }): Promise<{ io: Io; adapter: V86DiskAdapter; disk: HeldDisk }> {
  const store = new MemoryStore('disk', new Uint8Array(1024 * 1024));
  const disk = new HeldDisk(await RawImage.open(store, { readOnly: false }));
  const adapter = new V86DiskAdapter(disk, { flushDelayMs: 60_000 });
  const emulator = new V86({ wasm_path: v86WasmPath(), memory_size: 32 * 1024 * 1024, autostart: false, disable_keyboard: true, disable_mouse: true, disable_speaker: true, ...diskBusOptions('ide', adapter) });
  emulators.push(emulator);
  const loaded = new Promise<void>((resolve) => emulator.add_listener('emulator-loaded', () => resolve()));
  await attachDisk(emulator, 'ide', adapter, { ideWriteCache: options.writeCache });
  await loaded;
  const io = (emulator as unknown as { v86: { cpu: { io: Io } } }).v86.cpu.io;
  io.port_write8(PORT.DEVICE, 0xe0);
  return { io, adapter, disk };
}

function identify(io: Io): number[] {
  io.port_write8(PORT.COMMAND, 0xec);
  return Array.from({ length: 256 }, () => io.port_read16(PORT.DATA));
}

const settle = () => new Promise((resolve) => setTimeout(resolve, 30));

describe('IDE write cache and FLUSH CACHE', () => {
  test("v86's own drive reports no write cache and completes FLUSH CACHE at once (what the hook changes)", async () => {
    const { io, adapter } = await machine({ writeCache: false });
    const id = identify(io);
    expect(id[82]! & 0x20).toBe(0);
    expect(id[85]! & 0x20).toBe(0);
    io.port_write8(PORT.COMMAND, 0xe7);
    expect(io.port_read8(PORT.COMMAND) & BUSY).toBe(0);
    await settle();
    expect(adapter.stats.guestFlushes).toBe(0);
  });

  test('with the hook: IDENTIFY reports a volatile write cache supported and enabled; FLUSH CACHE (EXT) waits for the disk', async () => {
    const { io, adapter, disk } = await machine({ writeCache: true });
    const id = identify(io);
    expect(id[82]! & 0x20).toBe(0x20);
    expect(id[85]! & 0x20).toBe(0x20);
    // Word 83/86 still announce FLUSH CACHE (bit 12) and FLUSH CACHE EXT (bit 13), and word 87 is valid.
    expect(id[83]! & 0x3000).toBe(0x3000);
    expect(id[87]! & 0xc000).toBe(0x4000);

    for (const command of [0xe7, 0xea]) {
      // A write acknowledged from the cache, its device write held back: the flush must wait for it.
      await new Promise<void>((resolve) => adapter.set(4096, new Uint8Array(512).fill(command), resolve));
      disk.hold();
      io.port_write8(PORT.COMMAND, command);
      await settle();
      expect(io.port_read8(PORT.COMMAND) & BUSY, `0x${command.toString(16)} busy while the write is held`).toBe(BUSY);
      expect([...new Set(await disk.read(4096, 512))]).not.toEqual([command]);
      disk.release();
      await settle();
      expect(io.port_read8(PORT.COMMAND)).toBe(0x50);
      expect([...new Set(await disk.read(4096, 512))]).toEqual([command]);
    }
    expect(adapter.stats.guestFlushes).toBe(2);
  });

  test('a drive reset during a flush: the late completion does not touch the commands after it', async () => {
    const { io, adapter, disk } = await machine({ writeCache: true });
    await new Promise<void>((resolve) => adapter.set(0, new Uint8Array(512).fill(1), resolve));
    disk.hold();
    io.port_write8(PORT.COMMAND, 0xe7);
    await settle();
    // Software reset (SRST), as libata does after a timeout.
    io.port_write8(PORT.CONTROL, 0x04);
    io.port_write8(PORT.CONTROL, 0x00);
    // The next command, IDENTIFY, has its data ready (DRQ) when the old flush finally completes.
    io.port_write8(PORT.COMMAND, 0xec);
    expect(io.port_read8(PORT.COMMAND)).toBe(0x58);
    disk.release();
    await settle();
    expect(adapter.unflushedBytes).toBe(0);
    // Still IDENTIFY's: data ready, not a flush's completion status.
    expect(io.port_read8(PORT.COMMAND)).toBe(0x58);
    const words = Array.from({ length: 256 }, () => io.port_read16(PORT.DATA));
    expect(words[85]! & 0x20).toBe(0x20);
  });
});

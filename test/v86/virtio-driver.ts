/**
 * A small virtio 1.0 PCI driver written from the spec, for testing our virtio-blk device inside a real v86 (not
 * running a guest): it finds the device through PCI configuration ports 0xcf8/0xcfc, reads its capabilities,
 * negotiates features through the common configuration in the I/O BAR, lays out a split queue in guest RAM and
 * submits requests the way a driver does (descriptors, available ring, notify), then watches the used ring.
 */
import { V86 } from 'v86';
import { V86DiskAdapter } from '../../src/v86/disk.js';
import { attachDisk, diskBusOptions } from '../../src/v86/disk-bus.js';
import type { VirtioBlk } from '../../src/v86/virtio-blk.js';
import type { BlockDevice } from '../../src/qcow2/device.js';
import { v86WasmPath } from '../../src/node/machine-assets.js';

export const F = { SIZE_MAX: 1, SEG_MAX: 2, RO: 5, BLK_SIZE: 6, FLUSH: 9, DISCARD: 13, WRITE_ZEROES: 14, INDIRECT_DESC: 28, EVENT_IDX: 29, VERSION_1: 32 };
export const T = { IN: 0, OUT: 1, FLUSH: 4, GET_ID: 8, DISCARD: 11, WRITE_ZEROES: 13 };
export const STATUS = { ACKNOWLEDGE: 1, DRIVER: 2, DRIVER_OK: 4, FEATURES_OK: 8, NEEDS_RESET: 0x40 };

const DESC = 0x100000;
const AVAIL = 0x102000;
const USED = 0x103000;
const INDIRECT = 0x104000;
const BUFFERS = 0x200000;

interface Io {
  port_write8(port: number, value: number): void;
  port_write16(port: number, value: number): void;
  port_write32(port: number, value: number): void;
  port_read8(port: number): number;
  port_read16(port: number): number;
  port_read32(port: number): number;
}

interface Cpu {
  io: Io;
  mem8: Uint8Array;
  devices: { pci: { raise_irq(id: number): void } };
}

export interface TestMachine {
  emulator: V86;
  adapter: V86DiskAdapter;
  device: VirtioBlk;
  cpu: Cpu;
  /** Interrupts raised on the device's PCI slot so far. */
  irqs: () => number;
  destroy(): Promise<void>;
}

/** A v86 machine (not started) with `disk` on our virtio-blk device. */
export async function virtioMachine(disk: BlockDevice, options: { memoryBytes?: number } = {}): Promise<TestMachine> {
  const adapter = new V86DiskAdapter(disk, { flushDelayMs: 60_000 });
  const emulator = new V86({
    wasm_path: v86WasmPath(),
    memory_size: options.memoryBytes ?? 32 * 1024 * 1024,
    autostart: false,
    disable_keyboard: true,
    disable_mouse: true,
    disable_speaker: true,
    ...diskBusOptions('virtio', adapter),
  });
  const loaded = new Promise<void>((resolve) => emulator.add_listener('emulator-loaded', () => resolve()));
  const attached = await attachDisk(emulator, 'virtio', adapter);
  await loaded;
  const cpu = (emulator as unknown as { v86: { cpu: Cpu } }).v86.cpu;
  let irqs = 0;
  const pci = cpu.devices.pci;
  const raise = pci.raise_irq.bind(pci);
  pci.raise_irq = (id: number) => {
    if (id === attached.virtio!.transport.pci_id) irqs++;
    raise(id);
  };
  return {
    emulator, adapter, device: attached.virtio!, cpu, irqs: () => irqs,
    async destroy() {
      await emulator.destroy();
    },
  };
}

export interface Request {
  type: number;
  sector?: number;
  /** Bytes the device reads after the header (OUT data, DISCARD/WRITE_ZEROES segments). */
  out?: Uint8Array;
  /** Bytes the device may write before the status byte (IN, GET_ID). */
  inLength?: number;
  /** Put the chain in an indirect table. */
  indirect?: boolean;
  /** Split data buffers into pieces of this size (several descriptors). */
  pieces?: number;
}

export interface Completion {
  head: number;
  written: number;
  status: number;
  data: Uint8Array;
}

const u16 = (b: Uint8Array, at: number) => b[at]! | (b[at + 1]! << 8);

/** The driver's side of one device. */
export class Driver {
  readonly base: number;
  private nextDesc = 0;
  private nextBuffer = BUFFERS;
  private availIdx = 0;
  private usedSeen = 0;
  queueSize = 0;
  private readonly outstanding = new Map<number, { statusAddr: number; inAddr: number; inLength: number }>();

  constructor(readonly m: TestMachine) {
    const slot = m.device.transport.pci_id >> 3;
    const bar0 = this.config32(slot, 0x10);
    if (!(bar0 & 1)) throw new Error('BAR0 is not an I/O BAR');
    this.base = bar0 & ~3;
    this.slot = slot;
  }

  private readonly slot: number;

  config32(slot: number, register: number): number {
    this.m.cpu.io.port_write32(0xcf8, (0x80000000 | (slot << 11) | register) | 0);
    return this.m.cpu.io.port_read32(0xcfc) >>> 0;
  }

  /** The PCI configuration space bytes 0..255. */
  configSpace(): Uint8Array {
    const bytes = new Uint8Array(256);
    const view = new DataView(bytes.buffer);
    for (let r = 0; r < 256; r += 4) view.setUint32(r, this.config32(this.slot, r), true);
    return bytes;
  }

  status(): number {
    return this.m.cpu.io.port_read8(this.base + 0x14);
  }

  setStatus(value: number): void {
    this.m.cpu.io.port_write8(this.base + 0x14, value);
  }

  deviceFeatures(): bigint {
    const io = this.m.cpu.io;
    io.port_write32(this.base + 0x00, 0);
    const low = io.port_read32(this.base + 0x04) >>> 0;
    io.port_write32(this.base + 0x00, 1);
    const high = io.port_read32(this.base + 0x04) >>> 0;
    return (BigInt(high) << 32n) | BigInt(low);
  }

  /** The device configuration (struct virtio_blk_config), read byte by byte. */
  deviceConfig(): DataView {
    const bytes = new Uint8Array(64);
    for (let i = 0; i < 64; i++) bytes[i] = this.m.cpu.io.port_read8(this.base + 0x60 + i);
    return new DataView(bytes.buffer);
  }

  /** ISR status (reading it clears it). */
  isr(): number {
    return this.m.cpu.io.port_read8(this.base + 0x40);
  }

  /** Resets the device, negotiates `features` (bit numbers) and sets up queue 0 with `size` entries. */
  init(features: number[], size = 128): void {
    const io = this.m.cpu.io;
    this.setStatus(0);
    this.setStatus(STATUS.ACKNOWLEDGE);
    this.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER);
    let wanted = 0n;
    for (const bit of features) wanted |= 1n << BigInt(bit);
    io.port_write32(this.base + 0x08, 0);
    io.port_write32(this.base + 0x0c, Number(wanted & 0xffffffffn) | 0);
    io.port_write32(this.base + 0x08, 1);
    io.port_write32(this.base + 0x0c, Number(wanted >> 32n) | 0);
    this.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK);
    if (!(this.status() & STATUS.FEATURES_OK)) throw new Error('the device refused the features');
    io.port_write16(this.base + 0x16, 0);
    const max = io.port_read16(this.base + 0x18);
    this.queueSize = Math.min(size, max);
    io.port_write16(this.base + 0x18, this.queueSize);
    io.port_write32(this.base + 0x20, DESC);
    io.port_write32(this.base + 0x24, 0);
    io.port_write32(this.base + 0x28, AVAIL);
    io.port_write32(this.base + 0x2c, 0);
    io.port_write32(this.base + 0x30, USED);
    io.port_write32(this.base + 0x34, 0);
    this.m.cpu.mem8.fill(0, DESC, USED + 0x1000);
    io.port_write16(this.base + 0x1c, 1);
    this.setStatus(STATUS.ACKNOWLEDGE | STATUS.DRIVER | STATUS.FEATURES_OK | STATUS.DRIVER_OK);
    this.availIdx = this.usedSeen = this.nextDesc = 0;
  }

  write(addr: number, bytes: Uint8Array): void {
    this.m.cpu.mem8.set(bytes, addr);
  }

  read(addr: number, length: number): Uint8Array {
    return this.m.cpu.mem8.slice(addr, addr + length);
  }

  private buffer(length: number): number {
    const addr = this.nextBuffer;
    this.nextBuffer += Math.ceil(Math.max(length, 1) / 4096) * 4096;
    if (this.nextBuffer > BUFFERS + 0x800000) this.nextBuffer = BUFFERS;
    return addr;
  }

  private descriptor(table: number, index: number, addr: number, length: number, flags: number, next: number): void {
    const d = new DataView(new ArrayBuffer(16));
    d.setUint32(0, addr, true);
    d.setUint32(8, length, true);
    d.setUint16(12, flags, true);
    d.setUint16(14, next, true);
    this.write(table + 16 * index, new Uint8Array(d.buffer));
  }

  /** Makes a request available (without notifying); returns its head index. */
  post(request: Request): number {
    const header = new DataView(new ArrayBuffer(16));
    header.setUint32(0, request.type, true);
    header.setBigUint64(8, BigInt(request.sector ?? 0), true);
    const parts: Array<{ addr: number; length: number; writable: boolean }> = [];
    const headerAddr = this.buffer(16);
    this.write(headerAddr, new Uint8Array(header.buffer));
    parts.push({ addr: headerAddr, length: 16, writable: false });
    const split = (addr: number, length: number, writable: boolean) => {
      const piece = request.pieces ?? length;
      for (let at = 0; at < length; at += piece) parts.push({ addr: addr + at, length: Math.min(piece, length - at), writable });
    };
    if (request.out?.length) {
      const addr = this.buffer(request.out.length);
      this.write(addr, request.out);
      split(addr, request.out.length, false);
    }
    const inLength = request.inLength ?? 0;
    const inAddr = this.buffer(inLength);
    if (inLength) split(inAddr, inLength, true);
    const statusAddr = this.buffer(1);
    this.write(statusAddr, Uint8Array.of(0xee));
    parts.push({ addr: statusAddr, length: 1, writable: true });

    let head: number;
    if (request.indirect) {
      head = this.nextDesc;
      // One table per head (up to 64 descriptors each), so tables of requests in flight never overlap.
      const table = INDIRECT + 0x400 * head;
      parts.forEach((p, i) => this.descriptor(table, i, p.addr, p.length, (p.writable ? 2 : 0) | (i < parts.length - 1 ? 1 : 0), i + 1));
      this.nextDesc = (this.nextDesc + 1) % this.queueSize;
      this.descriptor(DESC, head, table, 16 * parts.length, 4, 0);
    } else {
      const indices = parts.map(() => {
        const i = this.nextDesc;
        this.nextDesc = (this.nextDesc + 1) % this.queueSize;
        return i;
      });
      parts.forEach((p, i) => this.descriptor(DESC, indices[i]!, p.addr, p.length, (p.writable ? 2 : 0) | (i < parts.length - 1 ? 1 : 0), indices[i + 1] ?? 0));
      head = indices[0]!;
    }
    this.write(AVAIL + 4 + 2 * (this.availIdx % this.queueSize), Uint8Array.of(head & 0xff, head >> 8));
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.write(AVAIL + 2, Uint8Array.of(this.availIdx & 0xff, this.availIdx >> 8));
    this.outstanding.set(head, { statusAddr, inAddr, inLength });
    return head;
  }

  notify(): void {
    this.m.cpu.io.port_write16(this.base + 0xc0, 0);
  }

  /** Writes a raw descriptor (for malformed chains) and makes `head` available. */
  postRaw(descriptors: Array<[addr: number, length: number, flags: number, next: number]>, head = 0): void {
    descriptors.forEach(([addr, length, flags, next], i) => this.descriptor(DESC, i, addr, length, flags, next));
    this.write(AVAIL + 4 + 2 * (this.availIdx % this.queueSize), Uint8Array.of(head, 0));
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.write(AVAIL + 2, Uint8Array.of(this.availIdx & 0xff, this.availIdx >> 8));
  }

  /** Sets the available ring's flags (1: no interrupts) or, with EVENT_IDX, used_event. */
  availFlags(flags: number): void {
    this.write(AVAIL, Uint8Array.of(flags, 0));
  }

  usedEvent(value: number): void {
    this.write(AVAIL + 4 + 2 * this.queueSize, Uint8Array.of(value & 0xff, value >> 8));
  }

  /** avail_event as the device wrote it. */
  availEvent(): number {
    return u16(this.read(USED + 4 + 8 * this.queueSize, 2), 0);
  }

  usedIdx(): number {
    return u16(this.read(USED + 2, 2), 0);
  }

  /** Completions the device has returned since the last call. */
  takeUsed(): Completion[] {
    const out: Completion[] = [];
    const idx = this.usedIdx();
    while (this.usedSeen !== idx) {
      const entry = new DataView(this.read(USED + 4 + 8 * (this.usedSeen % this.queueSize), 8).buffer);
      const head = entry.getUint32(0, true);
      const written = entry.getUint32(4, true);
      const request = this.outstanding.get(head);
      this.outstanding.delete(head);
      out.push({
        head, written,
        status: request ? this.read(request.statusAddr, 1)[0]! : -1,
        data: request ? this.read(request.inAddr, request.inLength) : new Uint8Array(0),
      });
      this.usedSeen = (this.usedSeen + 1) & 0xffff;
    }
    return out;
  }

  /** Waits until `count` more completions arrive (or fails after timeoutMs). */
  async completions(count: number, timeoutMs = 5000): Promise<Completion[]> {
    const got: Completion[] = [];
    const until = Date.now() + timeoutMs;
    while (got.length < count) {
      got.push(...this.takeUsed());
      if (got.length >= count) break;
      if (Date.now() > until) throw new Error(`only ${got.length} of ${count} completions within ${timeoutMs} ms`);
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
    return got;
  }

  /** Submits one request, notifies, and waits for its completion. */
  async run(request: Request): Promise<Completion> {
    const head = this.post(request);
    this.notify();
    const [done] = await this.completions(1);
    if (done!.head !== head) throw new Error(`completion for ${done!.head}, expected ${head}`);
    return done!;
  }
}

export function segment(sector: number, sectors: number, flags = 0): Uint8Array {
  const d = new DataView(new ArrayBuffer(16));
  d.setBigUint64(0, BigInt(sector), true);
  d.setUint32(8, sectors, true);
  d.setUint32(12, flags, true);
  return new Uint8Array(d.buffer);
}

/**
 * The virtio 1.0 PCI transport ("modern" only, virtio spec section 4.1) for a device attached to v86 from the
 * outside: v86's npm build does not export its own virtio code, but its PCI bus takes any object with `pci_id`,
 * `pci_space` and `pci_bars` (`cpu.devices.pci.register_device`), I/O ports are registered per port
 * (`cpu.io.register_read/register_write`) and moved with the BAR when the BIOS relocates it, and interrupts are
 * raised on the device's PCI slot (`pci.raise_irq(pci_id)`). See ../shared/v86-disk-facts.md.
 *
 * Layout: one 256-byte I/O BAR holding the common configuration (0x00), the ISR status (0x40), the device
 * configuration (0x60) and the queue notification register (0xc0, multiplier 0: one register for every queue).
 * No MSI-X: interrupts are INTx on pin A, with the ISR byte saying why (bit 0 a queue, bit 1 the configuration)
 * and reading it lowering the line, as the spec's non-MSI-X rules say.
 */
import { Virtqueue, VirtqueueError, type GuestMemory, type QueueState } from './virtqueue.js';

export const VIRTIO_F_INDIRECT_DESC = 28;
export const VIRTIO_F_EVENT_IDX = 29;
export const VIRTIO_F_VERSION_1 = 32;

const STATUS_ACKNOWLEDGE = 1;
const STATUS_DRIVER = 2;
const STATUS_DRIVER_OK = 4;
const STATUS_FEATURES_OK = 8;
const STATUS_NEEDS_RESET = 0x40;
const STATUS_FAILED = 0x80;
const ISR_QUEUE = 1;
const ISR_CONFIG = 2;
const NO_VECTOR = 0xffff;

const COMMON = 0x00;
const ISR = 0x40;
const DEVICE = 0x60;
const DEVICE_BYTES = 0x60;
const NOTIFY = 0xc0;
const BAR_BYTES = 0x100;

/** The parts of v86's CPU the transport uses (its property names survive v86's minified build). */
export interface V86Cpu {
  /** A Proxy that makes a fresh view of the wasm memory on each access (the buffer may be replaced). */
  mem8: Uint8Array;
  write_blob(bytes: Uint8Array, addr: number): void;
  io: {
    register_read(port: number, device: object, r8: (port: number) => number, r16: (port: number) => number, r32: (port: number) => number): void;
    register_write(port: number, device: object, w8: (value: number) => void, w16: (value: number) => void, w32: (value: number) => void): void;
  };
  devices: { pci: { register_device(device: object): void; raise_irq(pciId: number): void; lower_irq(pciId: number): void; devices: unknown[] } };
}

/** Guest RAM through v86: reads copy, writes go through write_blob (which also drops JIT code on those pages). */
export function v86Memory(cpu: V86Cpu): GuestMemory {
  return {
    get size() {
      return cpu.mem8.length;
    },
    read: (addr, length) => cpu.mem8.slice(addr, addr + length),
    write: (addr, bytes) => cpu.write_blob(bytes, addr),
  };
}

/** What a transport carries in a session, beside the device's own state. */
export interface TransportState {
  status: number;
  deviceFeatureSelect: number;
  driverFeatureSelect: number;
  driverFeatures: [number, number];
  queueSelect: number;
  isr: number;
  queues: QueueState[];
}

export interface TransportOptions {
  /** v86's PCI id: slot << 3. */
  pciId: number;
  /** Virtio device type (2: block); the PCI device id is 0x1040 + type. */
  deviceType: number;
  /** PCI class code (class << 16 | subclass << 8 | interface). */
  classCode: number;
  name: string;
  /** Where the BAR starts before the BIOS moves it (aligned to 256, at 0x1000 or above, free in v86). */
  initialPort: number;
  /** Device feature bits (VERSION_1 is added). */
  features: number[];
  queueSizes: number[];
  /** The device configuration's bytes (read-only to the driver), up to 96. */
  config: Uint8Array;
  /** The driver made buffers available in queue `index`. */
  onNotify: (index: number) => void;
  /** The device was reset (by the driver, or by the machine). */
  onReset: () => void;
  /** The driver broke the rules (a malformed ring): logged, the device needs a reset. */
  onDriverError?: (error: Error) => void;
}

export class VirtioPciTransport {
  readonly memory: GuestMemory;
  readonly queues: Virtqueue[];
  readonly pci_id: number;
  readonly name: string;
  readonly pci_space: number[];
  readonly pci_bars: Array<{ size: number } | undefined>;
  private readonly deviceFeatures: [number, number] = [0, 0];
  private driverFeatures: [number, number] = [0, 0];
  private deviceFeatureSelect = 0;
  private driverFeatureSelect = 0;
  private queueSelect = 0;
  private status = 0;
  private isr = 0;

  constructor(private readonly cpu: V86Cpu, private readonly options: TransportOptions) {
    this.memory = v86Memory(cpu);
    this.pci_id = options.pciId;
    this.name = options.name;
    for (const bit of [...options.features, VIRTIO_F_VERSION_1]) this.deviceFeatures[bit >> 5]! |= 1 << (bit & 31);
    const features = { eventIdx: () => this.negotiated(VIRTIO_F_EVENT_IDX), indirect: () => this.negotiated(VIRTIO_F_INDIRECT_DESC) };
    this.queues = options.queueSizes.map((size) => new Virtqueue(size, this.memory, features));
    this.pci_space = this.configSpace();
    this.pci_bars = [{ size: BAR_BYTES }];
  }

  /** Registers the BAR's ports and the device on v86's PCI bus. Call on 'emulator-ready', before the BIOS runs. */
  attach(): void {
    const pci = this.cpu.devices.pci;
    if (pci.devices[this.pci_id]) throw new Error(`${this.name}: PCI slot ${this.pci_id >> 3} is taken in this v86 machine`);
    for (let offset = 0; offset < BAR_BYTES; offset++) {
      const port = this.options.initialPort + offset;
      this.cpu.io.register_read(port, this, () => this.read(offset, 1), () => this.read(offset, 2), () => this.read(offset, 4) | 0);
      this.cpu.io.register_write(port, this, (v) => this.write(offset, 1, v), (v) => this.write(offset, 2, v), (v) => this.write(offset, 4, v));
    }
    pci.register_device(this);
  }

  negotiated(bit: number): boolean {
    return (this.driverFeatures[bit >> 5]! & (1 << (bit & 31))) !== 0;
  }

  get driverOk(): boolean {
    return (this.status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET)) === STATUS_DRIVER_OK;
  }

  /** A queue finished requests the driver wants to hear about. */
  interruptQueue(): void {
    this.raise(ISR_QUEUE);
  }

  /** The driver broke a queue's rules: stop using the device until it resets it (DEVICE_NEEDS_RESET). */
  needsReset(error: Error): void {
    this.options.onDriverError?.(error);
    if (this.status & STATUS_NEEDS_RESET) return;
    this.status |= STATUS_NEEDS_RESET;
    if (this.status & STATUS_DRIVER_OK) this.raise(ISR_CONFIG);
  }

  /** The machine was reset (reboot): the device starts over, as after the driver writes status 0. */
  reset(): void {
    this.driverFeatures = [0, 0];
    this.deviceFeatureSelect = this.driverFeatureSelect = this.queueSelect = this.status = 0;
    for (const queue of this.queues) queue.reset();
    this.isr = 0;
    this.cpu.devices.pci.lower_irq(this.pci_id);
    this.options.onReset();
  }

  state(): TransportState {
    return {
      status: this.status,
      deviceFeatureSelect: this.deviceFeatureSelect,
      driverFeatureSelect: this.driverFeatureSelect,
      driverFeatures: [...this.driverFeatures],
      queueSelect: this.queueSelect,
      isr: this.isr,
      queues: this.queues.map((q) => q.state()),
    };
  }

  /** Takes a saved state (after v86 restored its own); every field is checked, the interrupt line follows ISR. */
  restore(state: TransportState): void {
    const byte = (value: unknown, name: string) => {
      if (!Number.isInteger(value) || (value as number) < 0 || (value as number) > 0xff) throw new VirtqueueError(`${name} ${String(value)} is out of range`);
      return value as number;
    };
    const word = (value: unknown, name: string) => {
      if (!Number.isInteger(value) || (value as number) < 0 || (value as number) > 0xffffffff) throw new VirtqueueError(`${name} ${String(value)} is out of range`);
      return value as number;
    };
    if (!Array.isArray(state.queues) || state.queues.length !== this.queues.length) throw new VirtqueueError(`the saved device has ${String(state.queues?.length)} queues, this one ${this.queues.length}`);
    if (!Array.isArray(state.driverFeatures) || state.driverFeatures.length !== 2) throw new VirtqueueError('saved driver features are not two words');
    const features: [number, number] = [word(state.driverFeatures[0], 'driver features'), word(state.driverFeatures[1], 'driver features')];
    if ((features[0] & ~this.deviceFeatures[0]) || (features[1] & ~this.deviceFeatures[1])) throw new VirtqueueError('saved driver features include features this device does not offer');
    this.queues.forEach((queue, i) => {
      queue.restore(state.queues[i]!);
      if (queue.enabled) queue.checkLayout();
    });
    this.status = byte(state.status, 'device status');
    this.deviceFeatureSelect = word(state.deviceFeatureSelect, 'feature select');
    this.driverFeatureSelect = word(state.driverFeatureSelect, 'feature select');
    this.driverFeatures = features;
    this.queueSelect = word(state.queueSelect, 'queue select') & 0xffff;
    this.isr = byte(state.isr, 'ISR status') & (ISR_QUEUE | ISR_CONFIG);
    if (this.isr) this.cpu.devices.pci.raise_irq(this.pci_id);
    else this.cpu.devices.pci.lower_irq(this.pci_id);
  }

  // ---------------------------------------------------------------- PCI configuration space

  private configSpace(): number[] {
    const space = new Array<number>(256).fill(0);
    const put = (at: number, value: number, bytes: number) => {
      for (let i = 0; i < bytes; i++) space[at + i] = (value >>> (8 * i)) & 0xff;
    };
    put(0x00, 0x1af4, 2); // vendor: Red Hat, Inc. (virtio)
    put(0x02, 0x1040 + this.options.deviceType, 2);
    put(0x04, 0x0001, 2); // command: I/O space (the BIOS enables what it uses)
    put(0x06, 0x0010, 2); // status: capabilities list
    put(0x08, 0x01, 1); // revision 1: a non-transitional device
    put(0x09, this.options.classCode, 3);
    put(0x10, this.options.initialPort | 1, 4); // BAR0: I/O
    put(0x2c, 0x1af4, 2);
    put(0x2e, 0x40, 2); // subsystem id: 0x40 and up for non-transitional devices
    put(0x34, 0x40, 1); // first capability
    put(0x3d, 1, 1); // interrupt pin A
    // The virtio capabilities: cap_vndr 9, next, length, cfg_type, bar 0, offset, length (+ multiplier).
    const caps: Array<[type: number, offset: number, length: number, extra?: number]> = [
      [1, COMMON, 0x38],
      [3, ISR, 1],
      [4, DEVICE, DEVICE_BYTES],
      [2, NOTIFY, 2, 0],
    ];
    let at = 0x40;
    caps.forEach(([type, offset, length, extra], i) => {
      const size = extra === undefined ? 16 : 20;
      const next = i === caps.length - 1 ? 0 : at + size;
      put(at, 0x09, 1);
      put(at + 1, next, 1);
      put(at + 2, size, 1);
      put(at + 3, type, 1);
      put(at + 4, 0, 1);
      put(at + 8, offset, 4);
      put(at + 12, length, 4);
      if (extra !== undefined) put(at + 16, extra, 4);
      at = next;
    });
    return space;
  }

  // ---------------------------------------------------------------- the BAR

  /** A read of `width` bytes at `offset` in the BAR, little-endian, assembled byte by byte from the registers. */
  private read(offset: number, width: number): number {
    if (offset === ISR && width === 1) {
      const isr = this.isr;
      this.isr = 0;
      this.cpu.devices.pci.lower_irq(this.pci_id);
      return isr;
    }
    let value = 0;
    for (let i = width - 1; i >= 0; i--) value = value * 256 + this.readByte(offset + i);
    return value;
  }

  private readByte(offset: number): number {
    if (offset >= DEVICE && offset < DEVICE + DEVICE_BYTES) return this.options.config[offset - DEVICE] ?? 0;
    if (offset >= COMMON && offset < COMMON + 0x38) {
      const field = COMMON_FIELDS.find((f) => offset >= f.at && offset < f.at + f.bytes);
      if (!field) return 0;
      return (this.commonRead(field.name) >>> (8 * (offset - field.at))) & 0xff;
    }
    if (offset === ISR) return this.isr;
    return 0;
  }

  private write(offset: number, width: number, value: number): void {
    value >>>= 0;
    if (offset === NOTIFY && width >= 2) {
      const index = value & 0xffff;
      if (this.driverOk && index < this.queues.length && this.queues[index]!.enabled) this.options.onNotify(index);
      return;
    }
    if (offset < COMMON || offset + width > COMMON + 0x38) return;
    // A write may cover part of a field (the high half of a 64-bit address) or several: merge it byte by byte.
    for (const field of COMMON_FIELDS) {
      const from = Math.max(offset, field.at);
      const to = Math.min(offset + width, field.at + field.bytes);
      if (from >= to) continue;
      let merged = this.commonRead(field.name);
      for (let at = from; at < to; at++) {
        const byte = Math.floor(value / 2 ** (8 * (at - offset))) & 0xff;
        const shift = 8 * (at - field.at);
        merged = (merged & ~(0xff << shift)) | (byte << shift);
      }
      this.commonWrite(field.name, merged >>> 0);
    }
  }

  private get selected(): Virtqueue | undefined {
    return this.queues[this.queueSelect];
  }

  private commonRead(name: CommonField): number {
    const q = this.selected;
    switch (name) {
      case 'device_feature_select': return this.deviceFeatureSelect;
      case 'device_feature': return this.deviceFeatures[this.deviceFeatureSelect] ?? 0;
      case 'driver_feature_select': return this.driverFeatureSelect;
      case 'driver_feature': return this.driverFeatures[this.driverFeatureSelect] ?? 0;
      case 'msix_config': return NO_VECTOR;
      case 'num_queues': return this.queues.length;
      case 'device_status': return this.status;
      case 'config_generation': return 0;
      case 'queue_select': return this.queueSelect;
      case 'queue_size': return q?.size ?? 0;
      case 'queue_msix_vector': return NO_VECTOR;
      case 'queue_enable': return q?.enabled ? 1 : 0;
      case 'queue_notify_off': return 0;
      case 'queue_desc_lo': return q ? q.desc % 2 ** 32 : 0;
      case 'queue_desc_hi': return q ? Math.floor(q.desc / 2 ** 32) : 0;
      case 'queue_avail_lo': return q ? q.avail % 2 ** 32 : 0;
      case 'queue_avail_hi': return q ? Math.floor(q.avail / 2 ** 32) : 0;
      case 'queue_used_lo': return q ? q.used % 2 ** 32 : 0;
      case 'queue_used_hi': return q ? Math.floor(q.used / 2 ** 32) : 0;
    }
  }

  private commonWrite(name: CommonField, value: number): void {
    const q = this.selected;
    // Queue fields may change only while the queue is off and the driver has not finished (spec 4.1.4.3).
    const queueWritable = q !== undefined && !q.enabled && !(this.status & STATUS_DRIVER_OK);
    const half = (old: number, high: boolean) => (high ? (old % 2 ** 32) + value * 2 ** 32 : Math.floor(old / 2 ** 32) * 2 ** 32 + value);
    switch (name) {
      case 'device_feature_select': this.deviceFeatureSelect = value; return;
      case 'driver_feature_select': this.driverFeatureSelect = value; return;
      case 'driver_feature':
        // Features are settable only before FEATURES_OK; bits the device does not offer are dropped (and refuse FEATURES_OK below).
        if (this.driverFeatureSelect < 2 && !(this.status & STATUS_FEATURES_OK)) this.driverFeatures[this.driverFeatureSelect] = value;
        return;
      case 'device_status': this.writeStatus(value & 0xff); return;
      case 'queue_select': this.queueSelect = value; return;
      case 'queue_size':
        // A power of 2 up to the maximum; anything else is ignored (the size stays as it was).
        if (queueWritable && value > 0 && value <= q.maxSize && (value & (value - 1)) === 0) q.size = value;
        return;
      case 'queue_enable':
        if (!queueWritable || value !== 1) return;
        try {
          q.checkLayout();
          q.enabled = true;
        } catch (error) {
          this.needsReset(error as Error);
        }
        return;
      case 'queue_desc_lo': case 'queue_desc_hi':
        if (queueWritable) q.desc = half(q.desc, name.endsWith('hi'));
        return;
      case 'queue_avail_lo': case 'queue_avail_hi':
        if (queueWritable) q.avail = half(q.avail, name.endsWith('hi'));
        return;
      case 'queue_used_lo': case 'queue_used_hi':
        if (queueWritable) q.used = half(q.used, name.endsWith('hi'));
        return;
      default:
        return; // read-only fields; MSI-X vectors do not exist here
    }
  }

  private writeStatus(value: number): void {
    if (value === 0) {
      this.reset();
      return;
    }
    // FEATURES_OK only for a feature set this device offered that includes VERSION_1 (a modern driver).
    if (value & STATUS_FEATURES_OK & ~this.status) {
      const offered = (this.driverFeatures[0] & ~this.deviceFeatures[0]) === 0 && (this.driverFeatures[1] & ~this.deviceFeatures[1]) === 0;
      if (!offered || !this.negotiated(VIRTIO_F_VERSION_1)) value &= ~STATUS_FEATURES_OK;
    }
    // DRIVER_OK without FEATURES_OK is a driver error: keep the device unusable rather than guess.
    if (value & STATUS_DRIVER_OK && !(value & STATUS_FEATURES_OK)) value &= ~STATUS_DRIVER_OK;
    // The device's own NEEDS_RESET stays until a reset; ACKNOWLEDGE, DRIVER, FAILED are the driver's to set.
    this.status = (value & (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED)) | (this.status & STATUS_NEEDS_RESET);
  }

  private raise(reason: number): void {
    this.isr |= reason;
    this.cpu.devices.pci.raise_irq(this.pci_id);
  }
}

type CommonField = (typeof COMMON_FIELDS)[number]['name'];

/** struct virtio_pci_common_cfg (virtio 1.0, 4.1.4.3): offsets and widths. */
const COMMON_FIELDS = [
  { name: 'device_feature_select', at: 0x00, bytes: 4 },
  { name: 'device_feature', at: 0x04, bytes: 4 },
  { name: 'driver_feature_select', at: 0x08, bytes: 4 },
  { name: 'driver_feature', at: 0x0c, bytes: 4 },
  { name: 'msix_config', at: 0x10, bytes: 2 },
  { name: 'num_queues', at: 0x12, bytes: 2 },
  { name: 'device_status', at: 0x14, bytes: 1 },
  { name: 'config_generation', at: 0x15, bytes: 1 },
  { name: 'queue_select', at: 0x16, bytes: 2 },
  { name: 'queue_size', at: 0x18, bytes: 2 },
  { name: 'queue_msix_vector', at: 0x1a, bytes: 2 },
  { name: 'queue_enable', at: 0x1c, bytes: 2 },
  { name: 'queue_notify_off', at: 0x1e, bytes: 2 },
  { name: 'queue_desc_lo', at: 0x20, bytes: 4 },
  { name: 'queue_desc_hi', at: 0x24, bytes: 4 },
  { name: 'queue_avail_lo', at: 0x28, bytes: 4 },
  { name: 'queue_avail_hi', at: 0x2c, bytes: 4 },
  { name: 'queue_used_lo', at: 0x30, bytes: 4 },
  { name: 'queue_used_hi', at: 0x34, bytes: 4 },
] as const;

/**
 * A virtio-blk disk (virtio 1.0, section 5.2) for v86, on the same disk adapter (and so the same write cache,
 * flush and engine) as the IDE disk. Requests run concurrently (many in flight, answered as they finish);
 * writes go to the adapter's cache and FLUSH makes them durable, so the guest sees a write-back cache
 * (`/sys/block/vda/queue/write_cache` reads 'write back'); DISCARD and WRITE_ZEROES reach the engine's discard
 * and zero writes, so trimmed clusters leave the overlay.
 *
 * Features offered: FLUSH, BLK_SIZE (512), SEG_MAX, SIZE_MAX, DISCARD, WRITE_ZEROES, RO (when the disk is
 * read-only), and the ring features INDIRECT_DESC and EVENT_IDX. Without FLUSH negotiated (SeaBIOS, old
 * drivers) a write completes only once durable, as the spec asks of a device whose driver cannot flush.
 *
 * The device state (transport registers, queues, the heads of requests in flight) goes into sessions beside
 * v86's own state (v86 saves only its devices); requests in flight at the save are read again from guest memory
 * and run again after a restore, which is safe because they have not completed in the restored guest.
 */
import type { V86 } from 'v86';
import type { V86DiskAdapter } from './disk.js';
import { VirtioPciTransport, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, type TransportState, type V86Cpu } from './virtio-pci.js';
import { VirtqueueError, type Buffer, type Chain } from './virtqueue.js';

const F_SIZE_MAX = 1;
const F_SEG_MAX = 2;
const F_RO = 5;
const F_BLK_SIZE = 6;
const F_FLUSH = 9;
const F_DISCARD = 13;
const F_WRITE_ZEROES = 14;

const T_IN = 0;
const T_OUT = 1;
const T_FLUSH = 4;
const T_GET_ID = 8;
const T_DISCARD = 11;
const T_WRITE_ZEROES = 13;

const S_OK = 0;
const S_IOERR = 1;
const S_UNSUPP = 2;

const SECTOR = 512;
const HEADER = 16;
const SEGMENT = 16;
/** Data segments per request and bytes per segment: requests are at most 4 MiB, so never a large allocation. */
const SEG_MAX = 64;
const SIZE_MAX = 64 * 1024;
/** Sectors one DISCARD or WRITE_ZEROES segment may cover (32 MiB), and segments per request. */
const MAX_RANGE_SECTORS = 65536;
const MAX_RANGE_SEGMENTS = 32;
const ID_BYTES = 20;

export interface VirtioBlkOptions {
  /** v86 PCI id (slot << 3). Slot 0x0d is free in v86 0.5.462 (see ../shared/v86-disk-facts.md). */
  pciId?: number;
  /** I/O port where the BAR starts before the BIOS moves it. */
  initialPort?: number;
  /** Entries in the request queue (default 128). */
  queueSize?: number;
  /** Discard granularity in bytes (default 64 KiB: qcow2's default cluster, below which nothing is freed). */
  discardGranularity?: number;
  /** The 20-byte serial number GET_ID answers (/sys/block/vda/serial). */
  serial?: string;
  /** The driver broke the rules (a malformed ring or request). */
  onDriverError?: (error: Error) => void;
}

/** A virtio-blk device's part of a session. */
export interface VirtioBlkState {
  version: 1;
  transport: TransportState;
  /** Heads of requests taken from the queue but not answered yet. */
  inFlight: number[];
}

/** Bytes read ahead for a polling driver (twice its last read, within these bounds). */
const AHEAD_MIN = 64 * 1024;
const AHEAD_MAX = 512 * 1024;

/** A stretch read ahead of a polling driver; `bytes` once the read has answered. */
interface ReadAhead {
  start: number;
  length: number;
  read: Promise<Uint8Array>;
  bytes?: Uint8Array;
}

export class VirtioBlk {
  readonly transport: VirtioPciTransport;
  private readonly capacity: number;
  private readonly readOnly: boolean;
  private readonly serial: Uint8Array;
  private readonly inFlight = new Set<number>();
  /** Bumped by a reset or restore: answers to requests started before it are dropped. */
  private generation = 0;
  /**
   * Read-ahead for drivers that poll for each request (firmware loading a kernel): a request answered from it
   * completes inside the notify, instead of after a device read and the emulator's next time slice (the
   * polling CPU never idles, so each asynchronous step of a read costs a slice). Dropped on any write.
   */
  private ahead: ReadAhead[] = [];
  private lastReadEnd = -1;

  constructor(cpu: V86Cpu, private readonly disk: V86DiskAdapter, options: VirtioBlkOptions = {}) {
    this.capacity = Math.floor(disk.byteLength / SECTOR);
    this.readOnly = disk.readOnly;
    this.serial = new TextEncoder().encode((options.serial ?? 'qcow86').slice(0, ID_BYTES));
    const features = [F_SIZE_MAX, F_SEG_MAX, F_BLK_SIZE, F_FLUSH, F_DISCARD, F_WRITE_ZEROES, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX];
    if (this.readOnly) features.push(F_RO);
    this.transport = new VirtioPciTransport(cpu, {
      pciId: options.pciId ?? 0x0d << 3,
      deviceType: 2,
      classCode: 0x010000,
      name: 'virtio-blk (qcow86)',
      initialPort: options.initialPort ?? 0xe800,
      features,
      queueSizes: [options.queueSize ?? 128],
      config: this.config(Math.max(SECTOR, options.discardGranularity ?? 64 * 1024)),
      onNotify: () => this.process(),
      onReset: () => this.dropRequests(),
      ...(options.onDriverError ? { onDriverError: options.onDriverError } : {}),
    });
  }

  /** Registers the device on v86's PCI bus. */
  attach(): void {
    this.transport.attach();
  }

  /** Requests taken and not answered yet (a session carries their heads). */
  get requestsInFlight(): number {
    return this.inFlight.size;
  }

  state(): VirtioBlkState {
    return { version: 1, transport: this.transport.state(), inFlight: [...this.inFlight] };
  }

  /**
   * Takes a saved state, after v86 restored its own (guest memory holds the rings): requests in flight at the
   * save run again. Throws on a state that does not fit this device (checked field by field).
   */
  restore(state: VirtioBlkState): void {
    if (state?.version !== 1) throw new VirtqueueError(`virtio-blk state version ${String(state?.version)} is not supported`);
    this.dropRequests();
    this.transport.restore(state.transport);
    const queue = this.transport.queues[0]!;
    if (!Array.isArray(state.inFlight) || state.inFlight.length > queue.size || new Set(state.inFlight).size !== state.inFlight.length) {
      throw new VirtqueueError('virtio-blk state lists requests in flight that cannot be');
    }
    const chains = state.inFlight.map((head) => queue.chain(head));
    for (const chain of chains) this.start(chain);
  }

  /** The machine was reset: the device starts over. */
  reset(): void {
    this.transport.reset();
  }

  // ---------------------------------------------------------------- requests

  private process(): void {
    const queue = this.transport.queues[0]!;
    try {
      for (let chain = queue.pop(); chain; chain = queue.pop()) this.start(chain);
      queue.wantNotification();
    } catch (error) {
      if (!(error instanceof VirtqueueError)) throw error;
      this.transport.needsReset(error);
    }
  }

  private start(chain: Chain): void {
    const generation = this.generation;
    this.inFlight.add(chain.head);
    const status = statusByte(chain);
    if (!status) {
      // No byte to put the answer in: the request cannot be answered, the driver broke the rules.
      this.inFlight.delete(chain.head);
      this.transport.needsReset(new VirtqueueError(`request ${chain.head} has no device-writable status byte`));
      return;
    }
    if (this.answerFromReadAhead(chain, status)) return;
    this.execute(chain, status)
      .catch(() => ({ status: S_IOERR, written: 0 }))
      .then((result) => this.complete(chain, status, result, generation));
  }

  private complete(chain: Chain, status: Buffer, result: { status: number; written: number }, generation: number): void {
    if (generation !== this.generation) return;
    this.inFlight.delete(chain.head);
    const memory = this.transport.memory;
    memory.write(status.addr + status.length - 1, Uint8Array.of(result.status));
    if (this.transport.queues[0]!.push(chain.head, result.written + 1)) this.transport.interruptQueue();
  }

  private dropRequests(): void {
    this.generation++;
    this.inFlight.clear();
    this.ahead = [];
    this.lastReadEnd = -1;
  }

  /**
   * Answers a read the read-ahead holds: at once when its bytes are in, else when they come (no second device
   * read). False when no read-ahead covers it: the request runs as usual.
   */
  private answerFromReadAhead(chain: Chain, status: Buffer): boolean {
    if (this.ahead.length === 0) return false;
    const memory = this.transport.memory;
    const header = gather(memory, chain.readable, 0, HEADER);
    if (!header) return false;
    const view = new DataView(header.buffer);
    if (view.getUint32(0, true) !== T_IN) return false;
    const start = Number(view.getBigUint64(8, true)) * SECTOR;
    const dataIn = withoutLastByte(chain.writable, status);
    const length = total(dataIn);
    const ahead = this.ahead.find((a) => start >= a.start && start + length <= a.start + a.length);
    if (!ahead || length === 0 || length % SECTOR) return false;
    this.disk.stats.cacheHits++;
    const answer = (bytes: Uint8Array) => {
      scatter(memory, dataIn, bytes.subarray(start - ahead.start, start - ahead.start + length));
      this.readDone(start, length);
      return { status: S_OK, written: length };
    };
    const generation = this.generation;
    if (ahead.bytes) this.complete(chain, status, answer(ahead.bytes), generation);
    else void ahead.read.then((bytes) => this.complete(chain, status, answer(bytes), generation));
    return true;
  }

  /**
   * A read finished: a polling driver reading on from where it stopped keeps two reads' worth ahead of it (the
   * next stretch is read while it works on this one).
   */
  private readDone(start: number, length: number): void {
    const sequential = start === this.lastReadEnd;
    const from = start + length;
    this.lastReadEnd = from;
    // Stretches wholly behind the driver are done with.
    this.ahead = this.ahead.filter((a) => a.start + a.length > from);
    if (!sequential || !this.transport.queues[0]!.driverPolls()) return;
    const reach = this.ahead.reduce((end, a) => (a.start <= end ? Math.max(end, a.start + a.length) : end), from);
    if (reach - from >= 2 * length) return;
    const size = Math.min(Math.max(2 * length, AHEAD_MIN), AHEAD_MAX, this.capacity * SECTOR - reach);
    if (size <= 0) return;
    const read = this.disk.guestRead(reach, size);
    const ahead: ReadAhead = { start: reach, length: size, read };
    this.ahead.push(ahead);
    void read.then((bytes) => (ahead.bytes = bytes));
  }

  /** Runs one request; resolves with its status and the data bytes written into the guest's buffers. */
  private async execute(chain: Chain, status: Buffer): Promise<{ status: number; written: number }> {
    const memory = this.transport.memory;
    const header = gather(memory, chain.readable, 0, HEADER);
    if (!header) return { status: S_IOERR, written: 0 };
    const view = new DataView(header.buffer);
    const type = view.getUint32(0, true);
    const sector = Number(view.getBigUint64(8, true));
    // The writable buffers without the status byte, and the readable ones after the header.
    const dataIn = withoutLastByte(chain.writable, status);
    const readableBytes = total(chain.readable) - HEADER;
    const writableBytes = total(dataIn);
    const inRange = (bytes: number) => bytes % SECTOR === 0 && bytes <= SEG_MAX * SIZE_MAX && sector <= this.capacity && sector * SECTOR + bytes <= this.capacity * SECTOR;
    switch (type) {
      case T_IN: {
        if (!inRange(writableBytes)) return { status: S_IOERR, written: 0 };
        const bytes = await this.disk.guestRead(sector * SECTOR, writableBytes);
        scatter(memory, dataIn, bytes);
        this.readDone(sector * SECTOR, bytes.length);
        return { status: S_OK, written: bytes.length };
      }
      case T_OUT: {
        if (this.readOnly || !inRange(readableBytes)) return { status: S_IOERR, written: 0 };
        this.ahead = [];
        await this.disk.guestWrite(sector * SECTOR, gather(memory, chain.readable, HEADER, readableBytes)!);
        await this.durableWithoutFlush();
        return { status: S_OK, written: 0 };
      }
      case T_FLUSH:
        await this.disk.flushForGuest();
        return { status: S_OK, written: 0 };
      case T_GET_ID: {
        const id = new Uint8Array(Math.min(ID_BYTES, writableBytes));
        id.set(this.serial.subarray(0, id.length));
        scatter(memory, dataIn, id);
        return { status: S_OK, written: id.length };
      }
      case T_DISCARD:
      case T_WRITE_ZEROES:
        return this.ranges(type, gather(memory, chain.readable, HEADER, readableBytes) ?? new Uint8Array(0));
      default:
        return { status: S_UNSUPP, written: 0 };
    }
  }

  /** DISCARD and WRITE_ZEROES: a list of (sector, count, flags) segments, each checked before any runs. */
  private async ranges(type: number, payload: Uint8Array): Promise<{ status: number; written: number }> {
    const count = payload.length / SEGMENT;
    if (!Number.isInteger(count) || count < 1 || count > MAX_RANGE_SEGMENTS) return { status: S_IOERR, written: 0 };
    if (this.readOnly) return { status: S_IOERR, written: 0 };
    this.ahead = [];
    const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
    const segments = [];
    for (let i = 0; i < count; i++) {
      const sector = Number(view.getBigUint64(i * SEGMENT, true));
      const sectors = view.getUint32(i * SEGMENT + 8, true);
      const flags = view.getUint32(i * SEGMENT + 12, true);
      // Only WRITE_ZEROES has a flag (bit 0, unmap); a reserved bit, or unmap on a discard, is unsupported.
      if (flags & ~(type === T_WRITE_ZEROES ? 1 : 0)) return { status: S_UNSUPP, written: 0 };
      if (sectors > MAX_RANGE_SECTORS || sector > this.capacity || sector + sectors > this.capacity) return { status: S_IOERR, written: 0 };
      segments.push({ start: sector * SECTOR, length: sectors * SECTOR, unmap: (flags & 1) === 1 });
    }
    for (const s of segments) {
      if (s.length === 0) continue;
      if (type === T_DISCARD) await this.disk.guestDiscard(s.start, s.length);
      else await this.disk.guestWriteZeroes(s.start, s.length, s.unmap);
    }
    await this.durableWithoutFlush();
    return { status: S_OK, written: 0 };
  }

  /** A driver that did not negotiate FLUSH cannot ask for durability: every write is made durable before it completes. */
  private async durableWithoutFlush(): Promise<void> {
    if (!this.transport.negotiated(F_FLUSH)) await this.disk.flushForGuest();
  }

  /** struct virtio_blk_config (virtio 1.0, 5.2.4; write-zeroes fields from 1.1), little-endian. */
  private config(discardGranularity: number): Uint8Array {
    const bytes = new Uint8Array(64);
    const view = new DataView(bytes.buffer);
    view.setBigUint64(0, BigInt(this.capacity), true);
    view.setUint32(8, SIZE_MAX, true);
    view.setUint32(12, SEG_MAX, true);
    view.setUint32(20, SECTOR, true); // blk_size
    view.setUint32(36, MAX_RANGE_SECTORS, true); // max_discard_sectors
    view.setUint32(40, MAX_RANGE_SEGMENTS, true); // max_discard_seg
    view.setUint32(44, Math.floor(discardGranularity / SECTOR), true); // discard_sector_alignment
    view.setUint32(48, MAX_RANGE_SECTORS, true); // max_write_zeroes_sectors
    view.setUint32(52, MAX_RANGE_SEGMENTS, true); // max_write_zeroes_seg
    bytes[56] = 1; // write_zeroes_may_unmap
    return bytes;
  }
}

/**
 * Creates the device on a v86 emulator and attaches it to the PCI bus; call on 'emulator-ready' (before the BIOS
 * enumerates PCI). A machine reset (reboot) resets the device too.
 */
export function attachVirtioBlk(emulator: V86, disk: V86DiskAdapter, options: VirtioBlkOptions = {}): VirtioBlk {
  const cpu = (emulator as unknown as { v86?: { cpu?: V86Cpu & { reboot_internal?: () => void } } }).v86?.cpu;
  if (!cpu?.devices?.pci || typeof cpu.devices.pci.register_device !== 'function' || !cpu.io || typeof cpu.mem8?.length !== 'number' || typeof cpu.reboot_internal !== 'function') {
    throw new Error("this v86 build does not expose what qcow86's virtio-blk disk needs (cpu.devices.pci, cpu.io, cpu.mem8, reboot_internal)");
  }
  const device = new VirtioBlk(cpu, disk, options);
  device.attach();
  const reboot = cpu.reboot_internal;
  cpu.reboot_internal = function (this: unknown) {
    reboot.call(this);
    device.reset();
  };
  return device;
}

// ---------------------------------------------------------------- buffers

function total(buffers: Buffer[]): number {
  return buffers.reduce((sum, b) => sum + b.length, 0);
}

/** The last byte of the device-writable buffers (where the status goes), or undefined when there is none. */
function statusByte(chain: Chain): Buffer | undefined {
  for (let i = chain.writable.length - 1; i >= 0; i--) if (chain.writable[i]!.length > 0) return chain.writable[i];
  return undefined;
}

/** The writable buffers with the status byte taken off the end. */
function withoutLastByte(buffers: Buffer[], status: Buffer): Buffer[] {
  const index = buffers.lastIndexOf(status);
  const out = buffers.slice(0, index);
  if (status.length > 1) out.push({ ...status, length: status.length - 1 });
  return out;
}

/** `length` bytes of the buffers' contents from `skip` on, or undefined when they hold fewer. */
function gather(memory: VirtioPciTransport['memory'], buffers: Buffer[], skip: number, length: number): Uint8Array | undefined {
  if (total(buffers) < skip + length) return undefined;
  const out = new Uint8Array(length);
  let filled = 0;
  for (const b of buffers) {
    if (filled === length) break;
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    const take = Math.min(b.length - skip, length - filled);
    out.set(memory.read(b.addr + skip, take), filled);
    filled += take;
    skip = 0;
  }
  return out;
}

/** Writes bytes into the buffers in order. */
function scatter(memory: VirtioPciTransport['memory'], buffers: Buffer[], bytes: Uint8Array): void {
  let at = 0;
  for (const b of buffers) {
    if (at >= bytes.length) return;
    const take = Math.min(b.length, bytes.length - at);
    memory.write(b.addr, bytes.subarray(at, at + take));
    at += take;
  }
}

/**
 * A split virtqueue (virtio 1.0, section 2.4) read from and written to guest memory: descriptor chains (direct
 * and indirect), the available ring the driver fills and the used ring the device fills, with the EVENT_IDX
 * notification rules. Everything in guest memory is the guest's to scribble on: every address, length, index and
 * chain is checked, and a malformed one is a VirtqueueError (the device then asks for a reset) - never a read or
 * write outside guest RAM, an endless loop or an allocation the guest sized.
 */

/** Guest physical memory as the device sees it. */
export interface GuestMemory {
  /** Bytes of RAM; addresses at or past it are not memory. */
  readonly size: number;
  /** A copy of [addr, addr+length). The caller has checked the range. */
  read(addr: number, length: number): Uint8Array;
  /** Writes bytes at addr (the caller has checked the range). */
  write(addr: number, bytes: Uint8Array): void;
}

/** A driver error in a queue: the device stops using the queue and sets DEVICE_NEEDS_RESET. */
export class VirtqueueError extends Error {}

export const DESC_F_NEXT = 1;
export const DESC_F_WRITE = 2;
export const DESC_F_INDIRECT = 4;
const AVAIL_F_NO_INTERRUPT = 1;

/** One buffer of a chain: guest address and length, and whether the device may write it. */
export interface Buffer {
  addr: number;
  length: number;
  writable: boolean;
}

/** A request as the driver made it: its head index (what the used ring reports) and its buffers in order. */
export interface Chain {
  head: number;
  readable: Buffer[];
  writable: Buffer[];
}

/** The queue fields a driver sets and a session carries. */
export interface QueueState {
  size: number;
  enabled: boolean;
  desc: number;
  avail: number;
  used: number;
  /** The next available-ring entry the device will take (a free-running 16-bit counter). */
  nextAvail: number;
  /** The device's used index (free-running 16-bit). */
  usedIdx: number;
}

export function checkRange(memory: GuestMemory, addr: number, length: number, what: string): void {
  if (!Number.isSafeInteger(addr) || !Number.isSafeInteger(length) || addr < 0 || length < 0 || addr + length > memory.size) {
    throw new VirtqueueError(`${what} at 0x${addr.toString(16)}+${length} is outside guest memory (${memory.size} bytes)`);
  }
}

const u16 = (bytes: Uint8Array, at: number): number => bytes[at]! | (bytes[at + 1]! << 8);
const u32 = (bytes: Uint8Array, at: number): number => (bytes[at]! | (bytes[at + 1]! << 8) | (bytes[at + 2]! << 16) | (bytes[at + 3]! << 24)) >>> 0;

export class Virtqueue implements QueueState {
  size: number;
  enabled = false;
  desc = 0;
  avail = 0;
  used = 0;
  nextAvail = 0;
  usedIdx = 0;

  constructor(
    readonly maxSize: number,
    private readonly memory: GuestMemory,
    /** Whether VIRTIO_F_EVENT_IDX and VIRTIO_F_INDIRECT_DESC were negotiated (read at each use). */
    private readonly features: { eventIdx(): boolean; indirect(): boolean },
  ) {
    this.size = maxSize;
  }

  reset(): void {
    Object.assign(this, { size: this.maxSize, enabled: false, desc: 0, avail: 0, used: 0, nextAvail: 0, usedIdx: 0 });
  }

  state(): QueueState {
    const { size, enabled, desc, avail, used, nextAvail, usedIdx } = this;
    return { size, enabled, desc, avail, used, nextAvail, usedIdx };
  }

  /** Takes a saved state; every field is checked (a session file is untrusted). */
  restore(state: QueueState): void {
    const int = (value: unknown, max: number, name: string): number => {
      if (!Number.isSafeInteger(value) || (value as number) < 0 || (value as number) > max) throw new VirtqueueError(`queue ${name} ${String(value)} is out of range`);
      return value as number;
    };
    const size = int(state.size, this.maxSize, 'size');
    if (size !== 0 && (size & (size - 1)) !== 0) throw new VirtqueueError(`queue size ${size} is not a power of 2`);
    this.size = size;
    this.enabled = state.enabled === true;
    this.desc = int(state.desc, 2 ** 53, 'descriptor table address');
    this.avail = int(state.avail, 2 ** 53, 'available ring address');
    this.used = int(state.used, 2 ** 53, 'used ring address');
    this.nextAvail = int(state.nextAvail, 0xffff, 'next available index');
    this.usedIdx = int(state.usedIdx, 0xffff, 'used index');
  }

  /** Checks that the rings a driver set up lie in guest memory, before the queue is enabled. */
  checkLayout(): void {
    if (this.size === 0) throw new VirtqueueError('queue size 0');
    checkRange(this.memory, this.desc, 16 * this.size, 'descriptor table');
    checkRange(this.memory, this.avail, 6 + 2 * this.size, 'available ring');
    checkRange(this.memory, this.used, 6 + 8 * this.size, 'used ring');
    if (this.desc % 16 || this.avail % 2 || this.used % 4) throw new VirtqueueError('a ring address is not aligned');
  }

  /** The next request the driver made available, or undefined when there is none. */
  pop(): Chain | undefined {
    const availIdx = u16(this.memory.read(this.avail + 2, 2), 0);
    const waiting = (availIdx - this.nextAvail) & 0xffff;
    if (waiting === 0) return undefined;
    if (waiting > this.size) throw new VirtqueueError(`available index ${availIdx} is ${waiting} entries ahead of the device (queue size ${this.size})`);
    const head = u16(this.memory.read(this.avail + 4 + 2 * (this.nextAvail % this.size), 2), 0);
    this.nextAvail = (this.nextAvail + 1) & 0xffff;
    return this.chain(head);
  }

  /** Re-reads a chain the device took before (a request in flight when a session was saved). */
  chain(head: number): Chain {
    if (!Number.isInteger(head) || head < 0 || head >= this.size) throw new VirtqueueError(`descriptor index ${head} is past the queue size ${this.size}`);
    const chain: Chain = { head, readable: [], writable: [] };
    let table = this.desc;
    let limit = this.size;
    let index = head;
    let indirect = false;
    for (let seen = 0; ; seen++) {
      if (seen >= limit) throw new VirtqueueError(`descriptor chain from ${head} is longer than its table (${limit}): a loop`);
      if (index >= limit) throw new VirtqueueError(`descriptor index ${index} is past its table (${limit} entries)`);
      const d = this.memory.read(table + 16 * index, 16);
      const addr = u32(d, 0) + u32(d, 4) * 2 ** 32;
      const length = u32(d, 8);
      const flags = u16(d, 12);
      const next = u16(d, 14);
      if (flags & DESC_F_INDIRECT) {
        if (!this.features.indirect()) throw new VirtqueueError('indirect descriptor without VIRTIO_F_INDIRECT_DESC');
        if (indirect) throw new VirtqueueError('indirect descriptor inside an indirect table');
        if (flags & DESC_F_NEXT) throw new VirtqueueError('indirect descriptor with NEXT set');
        if (length === 0 || length % 16) throw new VirtqueueError(`indirect table of ${length} bytes is not a whole number of descriptors`);
        checkRange(this.memory, addr, length, 'indirect descriptor table');
        indirect = true;
        table = addr;
        limit = length / 16;
        index = 0;
        seen = -1;
        continue;
      }
      checkRange(this.memory, addr, length, 'buffer');
      if (flags & DESC_F_WRITE) chain.writable.push({ addr, length, writable: true });
      else if (chain.writable.length > 0) throw new VirtqueueError('a device-readable buffer follows a device-writable one');
      else chain.readable.push({ addr, length, writable: false });
      if (!(flags & DESC_F_NEXT)) return chain;
      index = next;
    }
  }

  /**
   * Returns a finished request to the driver (`written` bytes were written into its buffers). True when the
   * driver wants an interrupt for it (used_event with EVENT_IDX, else the available ring's NO_INTERRUPT flag).
   */
  push(head: number, written: number): boolean {
    const old = this.usedIdx;
    const entry = new Uint8Array(8);
    const view = new DataView(entry.buffer);
    view.setUint32(0, head, true);
    view.setUint32(4, written, true);
    this.memory.write(this.used + 4 + 8 * (old % this.size), entry);
    this.usedIdx = (old + 1) & 0xffff;
    this.memory.write(this.used + 2, Uint8Array.of(this.usedIdx & 0xff, this.usedIdx >> 8));
    if (this.features.eventIdx()) {
      const usedEvent = u16(this.memory.read(this.avail + 4 + 2 * this.size, 2), 0);
      // vring_need_event: the driver asked to hear once the used index passes usedEvent.
      return ((this.usedIdx - usedEvent - 1) & 0xffff) < ((this.usedIdx - old) & 0xffff);
    }
    return (u16(this.memory.read(this.avail, 2), 0) & AVAIL_F_NO_INTERRUPT) === 0;
  }

  /**
   * The driver asked for no interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT without EVENT_IDX): it polls the used ring for
   * each request, as firmware does (SeaBIOS).
   */
  driverPolls(): boolean {
    return !this.features.eventIdx() && (u16(this.memory.read(this.avail, 2), 0) & AVAIL_F_NO_INTERRUPT) !== 0;
  }

  /** With EVENT_IDX: asks the driver to notify once it makes the next request available (avail_event). */
  wantNotification(): void {
    if (!this.features.eventIdx()) return;
    this.memory.write(this.used + 4 + 8 * this.size, Uint8Array.of(this.nextAvail & 0xff, this.nextAvail >> 8));
  }
}

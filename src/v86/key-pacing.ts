/**
 * Typing at the pace the guest reads: one queue of key strokes per machine, used by the Node harness (sendKeys,
 * `qcow86 boot --send-keys`) and by the tab's machine Worker (keys pressed on the Screen view arrive there in
 * bursts, between the emulator's slices, as fast as the page and the host's scheduler deliver them). A key typed
 * faster than the guest takes it waits in the queue; it is never dropped for being early.
 *
 * Two places on the way lose keys that come too fast:
 * - v86's keyboard controller drops scancodes while the guest has scanning disabled (before its BIOS or kernel
 *   enabled the keyboard), and a guest's command to the keyboard clears the bytes the controller holds.
 * - A guest that reads keys through the BIOS (boot loaders, menus, DOS) gets them from a ring of 16 words in the
 *   BIOS data area (15 keys) that the BIOS's keyboard interrupt fills whenever the guest runs with interrupts on,
 *   also while it is busy elsewhere (GRUB waiting for its disk); the BIOS discards keys that find the ring full.
 *   GRUB handed 16 keys at once, or typed ahead while it reads a file, loses keys.
 *
 * So a stroke goes to the controller once the guest has scanning enabled and has read every byte before it; and
 * while the strokes land in the BIOS's ring (its tail moves as the guest reads them), only while the ring holds
 * fewer than BIOS_BACKLOG_LIMIT keys. A guest that reads the controller itself (Linux) never moves the ring, so a
 * ring an earlier boot stage left unread does not hold it up: when the ring has not moved for STALL_MS, one stroke
 * goes ahead as a probe, which fits in the ring whichever way it goes (it is never sent into a full one), and
 * whether it landed there tells who reads the keys now.
 *
 * The machine is read through KeyboardTarget, so the rules run the same against v86 and against a simulated
 * guest in tests (test/v86/key-pacing.test.ts).
 */

/** What pacing reads and drives; each call reads the machine as it is now (a restored state replaces memory). */
export interface KeyboardTarget {
  /** Hands scancodes to the keyboard controller. */
  send(codes: number[]): void;
  /** Whether the guest has keyboard scanning enabled (v86 drops scancodes while it has not). */
  scanning(): boolean;
  /** Scancode bytes the controller holds that the guest has not read yet. */
  unread(): number;
  /** Guest physical memory from address 0 (for the BIOS data area), when it can be reached. */
  memory(): Uint8Array | undefined;
}

/** Keys waiting in the BIOS's ring beyond which typing waits for the guest to take some (the ring holds 15). */
export const BIOS_BACKLOG_LIMIT = 8;
/** How long the BIOS's ring may stay unchanged before a stroke goes ahead as a probe. */
export const STALL_MS = 2000;
/** How often the pacer looks at the machine while strokes wait. */
const POLL_MS = 5;

/** The BIOS's keyboard ring (BIOS data area: head 0x41a, tail 0x41c, ring bounds 0x480/0x482, offsets in 0x40:). */
export interface BiosKeyRing {
  head: number;
  tail: number;
  /** Keys in it, not yet taken by the guest. */
  keys: number;
  /** Keys it can hold (one slot stays empty to tell full from empty). */
  capacity: number;
}

/** The BIOS's keyboard ring, or undefined where the BIOS data area does not hold a sane one (no BIOS yet, a guest that reused the memory). */
export function biosKeyRing(memory: Uint8Array | undefined): BiosKeyRing | undefined {
  if (!memory || memory.length < 0x484) return undefined;
  const word = (at: number) => memory[at]! | (memory[at + 1]! << 8);
  const head = word(0x41a);
  const tail = word(0x41c);
  const start = word(0x480);
  const end = word(0x482);
  const inside = (at: number) => at >= start && at < end && (at - start) % 2 === 0;
  if (!(start < end && end - start <= 64 && inside(head) && inside(tail))) return undefined;
  const size = end - start;
  return { head, tail, keys: ((tail - head + size) % size) / 2, capacity: size / 2 - 1 };
}

interface Batch {
  resolve(): void;
  reject(error: unknown): void;
}

interface Stroke {
  codes: number[];
  /** Set on a type() call's last stroke: settled once the guest has read it. */
  batch?: Batch;
}

export interface KeyPacerOptions {
  /** Waits before the machine is looked at again (default: POLL_MS on a timer; tests step a simulated guest). */
  pause?: () => Promise<void>;
  /** Milliseconds since some fixed time (default Date.now). */
  now?: () => number;
}

export class KeyPacer {
  private queue: Stroke[] = [];
  /** The stroke sent to the controller and not yet read by the guest, with the BIOS ring's tail before it. */
  private inFlight: { stroke: Stroke; ringBefore: BiosKeyRing | undefined } | undefined;
  /** The last stroke read landed in the BIOS's ring: the guest reads keys through the BIOS. */
  private biosReads = false;
  /** The ring as last seen and since when it looks so (for STALL_MS). */
  private ringSeen = { at: '', since: 0 };
  private running = false;
  /** Bumped by clear(): a running loop that sees it changed stops touching the machine. */
  private generation = 0;
  private readonly pause: () => Promise<void>;
  private readonly now: () => number;
  /** What the queue waits for now (for messages), or undefined while it is empty. */
  waitingFor: string | undefined;

  constructor(private readonly target: KeyboardTarget, options: KeyPacerOptions = {}) {
    this.pause = options.pause ?? (() => new Promise((done) => setTimeout(done, POLL_MS)));
    this.now = options.now ?? Date.now;
  }

  /** Strokes (each one key press's scancodes) waiting or not yet read by the guest. */
  get pending(): number {
    return this.queue.length;
  }

  /**
   * Queues strokes behind those already queued; resolves once the guest has read the last of them, rejects if
   * clear() drops them first.
   */
  type(strokes: number[][]): Promise<void> {
    const codes = strokes.filter((stroke) => stroke.length > 0);
    if (codes.length === 0) return Promise.resolve();
    const done = new Promise<void>((resolve, reject) => {
      codes.forEach((stroke, i) => this.queue.push({ codes: stroke, ...(i === codes.length - 1 ? { batch: { resolve, reject } } : {}) }));
    });
    void this.run();
    return done;
  }

  /** Drops every queued stroke (their type() calls reject with `reason`) and forgets what it knew of the guest. */
  clear(reason: unknown): void {
    this.generation++;
    const dropped = this.queue;
    this.queue = [];
    this.inFlight = undefined;
    this.biosReads = false;
    this.waitingFor = undefined;
    for (const stroke of dropped) stroke.batch?.reject(reason);
  }

  private async run(): Promise<void> {
    if (this.running) return;
    this.running = true;
    const generation = this.generation;
    try {
      while (this.queue.length > 0 && generation === this.generation) {
        if (this.step()) continue;
        await this.pause();
      }
    } finally {
      if (generation === this.generation) {
        this.running = false;
        this.waitingFor = undefined;
      } else {
        // clear() ran while this loop waited: keys queued since then need a loop of their own.
        this.running = false;
        if (this.queue.length > 0) void this.run();
      }
    }
  }

  /** Moves the queue on if the machine lets it; false when it must wait (waitingFor says for what). */
  private step(): boolean {
    const ring = biosKeyRing(this.target.memory());
    const ringAt = ring ? `${ring.head},${ring.tail}` : '';
    if (ringAt !== this.ringSeen.at) this.ringSeen = { at: ringAt, since: this.now() };

    if (this.inFlight) {
      if (this.target.unread() > 0) {
        this.waitingFor = 'the guest to read its keyboard';
        return false;
      }
      this.noteLanding(this.inFlight.ringBefore, ring);
      const { stroke } = this.inFlight;
      this.inFlight = undefined;
      this.queue.shift();
      stroke.batch?.resolve();
      return true;
    }

    if (!this.target.scanning() || this.target.unread() > 0) {
      this.waitingFor = 'the guest to enable and read its keyboard';
      return false;
    }
    if (this.biosReads && ring && ring.keys >= BIOS_BACKLOG_LIMIT) {
      const stalled = this.now() - this.ringSeen.since >= STALL_MS;
      // A probe must fit in the ring even if the BIOS still takes keys: never into a full one.
      if (!stalled || ring.keys >= ring.capacity) {
        this.waitingFor = "the guest to take keys from the BIOS's buffer";
        return false;
      }
      // Probing: restart the stall clock so that a ring the BIOS still fills gets one probe per STALL_MS.
      this.ringSeen.since = this.now();
    }
    const stroke = this.queue[0]!;
    this.inFlight = { stroke, ringBefore: ring };
    this.target.send(stroke.codes);
    this.waitingFor = 'the guest to read its keyboard';
    return false;
  }

  /** Whether the stroke just read went into the BIOS's ring tells whether the guest reads keys through the BIOS. */
  private noteLanding(before: BiosKeyRing | undefined, after: BiosKeyRing | undefined): void {
    if (!before || !after) {
      this.biosReads = false;
      return;
    }
    if (after.tail !== before.tail) this.biosReads = true;
    // A key that found the ring full was discarded by the BIOS, not read elsewhere: that tells nothing new.
    else if (before.keys < before.capacity) this.biosReads = false;
  }
}

/** The parts of v86's internals pacing reads (v86 0.5: its PS/2 controller and the CPU's memory view). */
interface V86Internals {
  v86?: { cpu?: { devices?: { ps2?: { enable_keyboard_stream: boolean; kbd_buffer: { length: number } } }; mem8?: Uint8Array } };
  keyboard_send_scancodes(codes: number[]): unknown;
}

/**
 * A v86 machine's keyboard. Until v86 has made its PS/2 controller (it loads the firmware first) the guest is
 * taken as not scanning, so keys wait; a v86 whose internals moved would leave them waiting, which the boot tests'
 * typing steps report as a timeout instead of keys silently lost.
 */
export function v86KeyboardTarget(emulator: object): KeyboardTarget {
  const machine = emulator as V86Internals;
  const ps2 = () => machine.v86?.cpu?.devices?.ps2;
  return {
    send: (codes) => void machine.keyboard_send_scancodes(codes),
    scanning: () => ps2()?.enable_keyboard_stream ?? false,
    unread: () => ps2()?.kbd_buffer.length ?? 0,
    memory: () => machine.v86?.cpu?.mem8,
  };
}

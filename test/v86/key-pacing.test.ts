/**
 * Key pacing (src/v86/key-pacing.ts) against a simulated PC: a keyboard controller that drops scancodes while
 * scanning is off, and either a BIOS whose keyboard interrupt moves every waiting key into the 15-key ring of the
 * BIOS data area (discarding keys that find it full, as SeaBIOS does) for a slow program reading that ring - a
 * boot loader - or a kernel reading the controller itself. The guest runs one slice per pause of the pacer, and
 * the clock advances 1 ms per slice, so the runs are deterministic.
 *
 * The truth is what the simulated program received, in order, against what was typed; the first test shows the
 * same burst sent without pacing (what the tab's Worker did) loses keys in this simulation.
 */
import { describe, expect, test } from 'vitest';
import { BIOS_BACKLOG_LIMIT, KeyPacer, STALL_MS, biosKeyRing, type KeyboardTarget } from '../../src/v86/key-pacing.js';
import { keysToScancodes } from '../../src/v86/keyboard.js';

const RING_START = 0x41e;
const RING_END = 0x43e;
const MODIFIER_MAKES = new Set([0x2a, 0x36, 0x1d, 0x38]);

class SimulatedPc implements KeyboardTarget {
  readonly ram = new Uint8Array(0x1000);
  controller: number[] = [];
  keyboardEnabled = true;
  /** The guest enables its keyboard at this slice. */
  enableKeyboardAt = 0;
  /** 'bios': the BIOS's interrupt fills its ring, the program reads the ring; 'kernel': the program reads the controller. */
  reader: 'bios' | 'kernel' = 'bios';
  /** The program takes one key every this many slices... */
  readEvery = 3;
  /** ...except for this many slices, while it is busy elsewhere (the BIOS's interrupt still runs). */
  busyFor = 0;
  /** Make codes the program got, in order. */
  readonly received: number[] = [];
  /** Keys the BIOS discarded because its ring was full. */
  discarded = 0;
  mostInRing = 0;
  slices = 0;

  constructor() {
    this.setWord(0x480, RING_START);
    this.setWord(0x482, RING_END);
    this.setWord(0x41a, RING_START);
    this.setWord(0x41c, RING_START);
  }

  // KeyboardTarget: what v86 offers.
  send(codes: number[]): void {
    if (this.keyboardEnabled) this.controller.push(...codes);
  }
  scanning(): boolean {
    return this.keyboardEnabled;
  }
  unread(): number {
    return this.controller.length;
  }
  memory(): Uint8Array {
    return this.ram;
  }

  word(at: number): number {
    return this.ram[at]! | (this.ram[at + 1]! << 8);
  }
  setWord(at: number, value: number): void {
    this.ram[at] = value & 0xff;
    this.ram[at + 1] = value >> 8;
  }
  private next(at: number): number {
    return at + 2 >= RING_END ? RING_START : at + 2;
  }

  /** Puts keys in the BIOS's ring as if typed before this program ran (nobody took them). */
  leaveInRing(count: number): void {
    for (let i = 0; i < count; i++) this.ringPut(0x39);
  }

  private ringPut(make: number): void {
    const tail = this.word(0x41c);
    if (this.next(tail) === this.word(0x41a)) {
      this.discarded++;
      return;
    }
    this.setWord(tail, make << 8);
    this.setWord(0x41c, this.next(tail));
    this.mostInRing = Math.max(this.mostInRing, biosKeyRing(this.ram)!.keys);
  }

  private ringTake(): number | undefined {
    const head = this.word(0x41a);
    if (head === this.word(0x41c)) return undefined;
    this.setWord(0x41a, this.next(head));
    return this.word(head) >> 8;
  }

  /** One slice of guest time. */
  slice(): void {
    this.slices++;
    if (this.enableKeyboardAt && this.slices >= this.enableKeyboardAt) this.keyboardEnabled = true;
    const makes: number[] = [];
    // The interrupt handler runs as long as the controller has bytes (each read raises the next interrupt).
    const readNow = this.reader === 'bios' || this.slices % this.readEvery === 0;
    while (this.controller.length > 0 && readNow) {
      const byte = this.controller.shift()!;
      if (byte === 0xe0 || byte & 0x80 || MODIFIER_MAKES.has(byte)) continue;
      makes.push(byte);
      if (this.reader === 'kernel') break;
    }
    if (this.reader === 'kernel') {
      this.received.push(...makes);
      return;
    }
    for (const make of makes) this.ringPut(make);
    if (this.busyFor > 0) {
      this.busyFor--;
      return;
    }
    if (this.slices % this.readEvery === 0) {
      const key = this.ringTake();
      if (key !== undefined) this.received.push(key);
    }
  }
}

/** A pacer on `pc` whose pauses run one guest slice and advance the clock 1 ms. */
function pacerFor(pc: SimulatedPc, maxSlices = 100_000): KeyPacer {
  return new KeyPacer(pc, {
    now: () => pc.slices,
    pause: async () => {
      if (pc.slices >= maxSlices) throw new Error(`still typing after ${maxSlices} slices`);
      // Lets the test's own code run between slices.
      await new Promise((done) => setImmediate(done));
      pc.slice();
    },
  });
}

function strokesOf(text: string): number[][] {
  return [...text].map((char) => keysToScancodes(char === '<' ? '<<' : char));
}

/** Each character's make code, as the program should receive them. */
function makesOf(text: string): number[] {
  return strokesOf(text).map((codes) => codes.find((code) => !(code & 0x80) && !MODIFIER_MAKES.has(code))!);
}

/** Types `text` the way the tab's Worker receives it: one type() per key press, all at once. */
function burst(pacer: KeyPacer, text: string): Promise<void> {
  return Promise.all(strokesOf(text).map((stroke) => pacer.type([stroke]))).then(() => {});
}

const LINE = "echo 'The quick brown fox jumps over the lazy dog: 0123456789 ~!@#$%^&*()_+{}|<>?'\n";

describe('typing as fast as the guest reads', () => {
  test('the simulation loses keys sent in one burst without pacing (the tab before pacing)', () => {
    const pc = new SimulatedPc();
    for (const stroke of strokesOf(LINE)) pc.send(stroke);
    for (let i = 0; i < 2000; i++) pc.slice();
    expect(pc.discarded).toBeGreaterThan(0);
    expect(pc.received.length).toBeLessThan(LINE.length);
  });

  test('a burst of key presses reaches a boot loader reading through the BIOS: every key, in order', async () => {
    const pc = new SimulatedPc();
    await burst(pacerFor(pc), LINE);
    while (pc.received.length < LINE.length && pc.slices < 10_000) pc.slice();
    expect(pc.discarded).toBe(0);
    expect(pc.received).toEqual(makesOf(LINE));
    expect(pc.mostInRing).toBeLessThanOrEqual(BIOS_BACKLOG_LIMIT);
  });

  test('keys typed ahead while the boot loader is busy for 20 s wait instead of overflowing the BIOS ring', async () => {
    const pc = new SimulatedPc();
    const pacer = pacerFor(pc);
    await pacer.type([keysToScancodes('x')]);
    // GRUB reading a large file: its keyboard interrupt keeps filling the ring, nothing takes from it for 20 s.
    pc.busyFor = 10 * STALL_MS;
    await pacer.type(strokesOf(LINE));
    while (pc.received.length < LINE.length + 1 && pc.slices < 50_000) pc.slice();
    expect(pc.discarded).toBe(0);
    expect(pc.received).toEqual(makesOf(`x${LINE}`));
    // Probes went ahead while the ring stood still, but never into a full ring.
    expect(pc.mostInRing).toBeGreaterThan(BIOS_BACKLOG_LIMIT);
    expect(pc.mostInRing).toBeLessThanOrEqual(15);
  });

  test('keys pressed before the guest enables its keyboard wait for it', async () => {
    const pc = new SimulatedPc();
    pc.keyboardEnabled = false;
    pc.enableKeyboardAt = 300;
    const pacer = pacerFor(pc);
    const typed = burst(pacer, 'boot\n');
    while (pc.slices < 100) await new Promise((done) => setImmediate(done));
    expect(pacer.waitingFor).toBe('the guest to enable and read its keyboard');
    expect(pc.controller).toEqual([]);
    await typed;
    while (pc.received.length < 5 && pc.slices < 10_000) pc.slice();
    expect(pc.received).toEqual(makesOf('boot\n'));
  });

  test('a kernel reading the controller itself is not held up by keys an earlier stage left in the BIOS ring', async () => {
    const pc = new SimulatedPc();
    const pacer = pacerFor(pc);
    // The boot loader took keys through the BIOS, then booted a kernel with BIOS_BACKLOG_LIMIT+2 keys unread.
    await burst(pacer, 'ab');
    pc.busyFor = Infinity;
    const ahead = 'c'.repeat(BIOS_BACKLOG_LIMIT + 2);
    const typedAhead = burst(pacer, ahead);
    while (biosKeyRing(pc.ram)!.keys < BIOS_BACKLOG_LIMIT) await new Promise((done) => setImmediate(done));
    expect(pacer.waitingFor).toBe("the guest to take keys from the BIOS's buffer");
    pc.reader = 'kernel';
    pc.readEvery = 1;
    const start = pc.slices;
    await Promise.all([typedAhead, burst(pacer, 'ls -l\n')]);
    // One probe after the ring stood still for STALL_MS tells that the kernel reads the keys; then no waiting.
    expect(pc.slices - start).toBeLessThan(STALL_MS + 200);
    expect(pc.received.slice(-6)).toEqual(makesOf('ls -l\n'));
    expect(pc.discarded).toBe(0);
  });

  test('clear() drops what is queued and rejects its type() calls; keys typed later still arrive', async () => {
    const pc = new SimulatedPc();
    pc.keyboardEnabled = false;
    const pacer = pacerFor(pc);
    const typed = pacer.type([keysToScancodes('a'), keysToScancodes('b')]);
    await Promise.resolve();
    pacer.clear(new Error('the machine was reset'));
    await expect(typed).rejects.toThrow('the machine was reset');
    expect(pacer.pending).toBe(0);
    pc.keyboardEnabled = true;
    await pacer.type([keysToScancodes('z')]);
    while (pc.received.length < 1 && pc.slices < 10_000) pc.slice();
    expect(pc.received).toEqual(makesOf('z'));
  });
});

describe('the BIOS keyboard ring', () => {
  test('read from the BIOS data area; nonsense pointers are no ring', () => {
    const pc = new SimulatedPc();
    pc.leaveInRing(3);
    expect(biosKeyRing(pc.ram)).toEqual({ head: RING_START, tail: RING_START + 6, keys: 3, capacity: 15 });
    pc.setWord(0x41c, RING_END + 2);
    expect(biosKeyRing(pc.ram)).toBeUndefined();
    pc.setWord(0x41c, RING_START + 1);
    expect(biosKeyRing(pc.ram)).toBeUndefined();
    expect(biosKeyRing(new Uint8Array(0x1000))).toBeUndefined();
    expect(biosKeyRing(undefined)).toBeUndefined();
  });
});

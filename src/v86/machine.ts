/**
 * A v86 PC with our disk, a scriptable serial console, and its VGA screen and PS/2 keyboard. Platform specifics
 * come in as values: BIOS bytes and the wasm location (a file path in Node). Node's `bootMachine` (src/node/
 * machine.ts, the `qcow86/machine` export) opens the disk and firmware and makes one of these.
 *
 *   await m.expect('# ');
 *   const { match } = await m.send('sha256sum f\n').expect(/([0-9a-f]{64})/);
 *   await m.sendKeys('c').expect('grub>', { on: 'screen' });
 *   await m.close();          // stops the CPU, flushes the disk and closes it
 *
 * Steps (expect, send, sendKeys) run one after another in the order they were chained, whoever awaits them. A
 * step that times out rejects with a StepError naming the step and carrying the console's and the screen's last
 * lines; later steps then fail too.
 */
import { V86, type V86Options } from 'v86';
import type { Codecs } from '../qcow2/compression.js';
import type { BlockDevice } from '../qcow2/device.js';
import { Qcow2Image } from '../qcow2/image.js';
import { ConsoleText } from './console.js';
import { V86DiskAdapter, type DiskAdapterOptions } from './disk.js';
import { parseKeys, strokeScancodes, type KeyStroke } from './keyboard.js';
import { KeyPacer, v86KeyboardTarget } from './key-pacing.js';
import { encodePng } from './png.js';
import { ScreenCapture, provideImageData } from './screen.js';
import { SessionError, saveSession, trackGuestClock, type SaveResult } from './session.js';
import { attachDisk, diskBusOptions, DEFAULT_DISK_BUS, type AttachedDisk, type DiskBus } from './disk-bus.js';
import type { VirtioBlk } from './virtio-blk.js';

export interface MachineOptions {
  /** The hard disk: a BlockDevice (wrapped in a V86DiskAdapter) or an adapter the caller made. */
  disk: BlockDevice | V86DiskAdapter;
  /**
   * Benchmarks only: hand v86 this whole raw image in memory instead of our adapter (v86's own buffer disk, the
   * reference our adapter is measured against). `disk` is then left idle.
   */
  referenceDisk?: { buffer: ArrayBuffer };
  diskOptions?: DiskAdapterOptions;
  /** The bus the disk sits on (default virtio). */
  diskBus?: DiskBus;
  bios: ArrayBuffer;
  vgaBios: ArrayBuffer;
  /** Where v86.wasm is: a filesystem path in Node, a URL in a browser. */
  wasmPath: string;
  /** Guest RAM in bytes (default 128 MiB). */
  memoryBytes?: number;
  /** Direct kernel boot (v86 loads the initrd at 64 MiB: memory must exceed 64 MiB + its size). */
  bzimage?: ArrayBuffer;
  initrd?: ArrayBuffer;
  cmdline?: string;
  /** Default time an expect step may wait, in milliseconds (default 300000). */
  timeout?: number;
  /** Every chunk of serial output as it arrives, undecoded escapes included (for stdout or a terminal). */
  onSerial?: (text: string) => void;
  /** Compression codecs for saveSession (sessions are stored compressed inside the qcow2 overlay). */
  codecs?: Codecs;
}

export interface ExpectOptions {
  /** Milliseconds this step may wait (default: the machine's, 300000 unless set otherwise). */
  timeout?: number;
  /**
   * Where to look: 'serial' (default) matches console output printed after the previous serial match; 'screen'
   * matches anywhere on the VGA text screen as it is (rows joined by newlines), text drawn earlier included.
   */
  on?: 'serial' | 'screen';
}

export interface ExpectResult {
  /**
   * On the serial console: the text (escapes removed) from the end of the previous match to the end of this
   * one. On the screen: the whole screen text when it matched.
   */
  text: string;
  match: RegExpExecArray | [string];
}

/** What the kernel prints last on `poweroff`: with ACPI "Power down", without it (v86 here) "System halted". */
export const POWERED_OFF = /reboot: (Power down|System halted)/;

export const DEFAULT_TIMEOUT_MS = 300_000;

/** The disk failed under the guest (a full or failing overlay, a base gone from the network): the machine stops. */
export class DiskFailure extends Error {
  constructor(readonly failure: unknown) {
    super(`the disk failed: ${failure instanceof Error ? failure.message : String(failure)}`);
    this.name = 'DiskFailure';
  }
}

export class StepError extends Error {
  constructor(readonly step: string, readonly lastLines: string, reason: string, readonly screenLines = '') {
    super(`${step}: ${reason}\n--- last console lines ---\n${lastLines}\n--- last screen lines ---\n${screenLines}\n---`);
    this.name = 'StepError';
  }
}

/** A chained sequence of steps; awaiting it waits for its last step. */
export class Steps<T> implements PromiseLike<T> {
  constructor(private readonly machine: Machine, private readonly done: Promise<T>) {}

  expect(pattern: string | RegExp, options?: ExpectOptions): Steps<ExpectResult> {
    return this.machine.expect(pattern, options);
  }

  send(text: string): Steps<void> {
    return this.machine.send(text);
  }

  sendKeys(keys: string): Steps<void> {
    return this.machine.sendKeys(keys);
  }

  then<A = T, B = never>(onFulfilled?: ((value: T) => A | PromiseLike<A>) | null, onRejected?: ((reason: unknown) => B | PromiseLike<B>) | null): Promise<A | B> {
    return this.done.then(onFulfilled, onRejected);
  }
}

/** How often a screen expect looks again while the screen keeps changing (it looks at once when idle). */
const SCREEN_CHECK_MS = 50;

export class Machine {
  readonly console = new ConsoleText();
  readonly screen: ScreenCapture;
  readonly disk: V86DiskAdapter;
  readonly emulator: V86;
  readonly diskBus: DiskBus;
  /** Resolves when v86 has started running the guest. */
  readonly started: Promise<void>;
  /** Resolves once the disk is connected to the guest (before the BIOS runs). */
  readonly attached: Promise<AttachedDisk>;
  /** The virtio-blk device, once attached (virtio bus only). */
  virtio: VirtioBlk | undefined;
  /** Rejects when the disk could not be attached; never resolves otherwise. */
  private readonly attachFailed: Promise<never>;
  private queue: Promise<unknown> = Promise.resolve();
  private stepCount = 0;
  /** sendKeys' strokes, fed to the guest as fast as it reads them (the tab's Worker types through the same). */
  private readonly keys: KeyPacer;
  private readonly timeout: number;
  private readonly codecs: Codecs | undefined;
  private stopped: Promise<void> | undefined;
  private closed: Promise<void> | undefined;
  private failure: unknown;
  /** Set when v86 itself failed (a guest that trips an emulator bug): every waiting and later step fails with it. */
  private crash: Error | undefined;
  private readonly crashListeners = new Set<(error: Error) => void>();

  constructor(options: MachineOptions) {
    this.timeout = options.timeout ?? DEFAULT_TIMEOUT_MS;
    this.codecs = options.codecs;
    // A device error stops the machine and fails its steps (the guest's command would stay busy for ever).
    this.disk = options.disk instanceof V86DiskAdapter
      ? options.disk
      : new V86DiskAdapter(options.disk, {
        ...options.diskOptions,
        onError: (error) => {
          options.diskOptions?.onError?.(error);
          this.halt(new DiskFailure(error));
        },
      });
    provideImageData();
    this.diskBus = options.diskBus ?? DEFAULT_DISK_BUS;
    const config: V86Options = {
      wasm_path: options.wasmPath,
      memory_size: options.memoryBytes ?? 128 * 1024 * 1024,
      vga_memory_size: 8 * 1024 * 1024,
      bios: { buffer: options.bios },
      vga_bios: { buffer: options.vgaBios },
      ...diskBusOptions(this.diskBus, options.referenceDisk ?? this.disk),
      autostart: true,
      // Keys go in as scancodes (sendKeys); v86's keyboard adapter reads a page's DOM events.
      disable_keyboard: true,
      disable_mouse: true,
      disable_speaker: true,
      ...(options.bzimage ? { bzimage: { buffer: options.bzimage } } : {}),
      ...(options.initrd ? { initrd: { buffer: options.initrd } } : {}),
      ...(options.cmdline !== undefined ? { cmdline: options.cmdline } : {}),
    } as V86Options;
    this.emulator = new V86(config);
    this.screen = new ScreenCapture(this.emulator as unknown as ConstructorParameters<typeof ScreenCapture>[0]);
    this.keys = new KeyPacer(v86KeyboardTarget(this.emulator));
    // v86's own buffer disk (benchmarks) keeps v86's IDE as it is; a write-through adapter has no cache to report.
    const ideWriteCache = !options.referenceDisk && !options.diskOptions?.writeThrough;
    // Discards smaller than a qcow2 cluster free nothing: the guest need not send them.
    const clusterSize = (this.disk.device as { clusterSize?: unknown }).clusterSize;
    const virtio = typeof clusterSize === 'number' ? { discardGranularity: clusterSize } : {};
    this.attached = attachDisk(this.emulator, this.diskBus, this.disk, { ideWriteCache, virtio });
    // A disk that cannot be connected as promised (a changed v86): the guest must not run without it, and the
    // step waiting at that moment fails with the reason instead of timing out.
    this.attachFailed = this.attached.then(
      (attached) => {
        this.virtio = attached.virtio;
        return new Promise<never>(() => {});
      },
      (error: unknown) => {
        this.failure ??= error;
        void this.emulator.stop();
        throw error;
      },
    );
    this.attachFailed.catch(() => {});
    this.started = new Promise((resolve) => this.emulator.add_listener('emulator-started', () => resolve()));
    this.emulator.add_listener('serial0-output-byte', (byte: number) => {
      const text = this.console.push(Uint8Array.of(byte));
      if (text) options.onSerial?.(text);
    });
    // A session saved from this machine records how long its guest has run.
    trackGuestClock(this);
    this.emulator.add_listener('emulator-loaded', () => this.catchEmulatorErrors());
  }

  /** Waits until pattern appears on the serial console after the previous match, or on the screen. */
  expect(pattern: string | RegExp, options: ExpectOptions = {}): Steps<ExpectResult> {
    const on = options.on ?? 'serial';
    if (on !== 'serial' && on !== 'screen') throw new TypeError(`expect: 'on' must be 'serial' or 'screen', not ${JSON.stringify(on)}`);
    const label = `step ${++this.stepCount} (${on === 'screen' ? 'expect-screen' : 'expect'} ${describe(pattern)})`;
    const timeout = options.timeout ?? this.timeout;
    return this.enqueue(() => (on === 'screen' ? this.waitForScreen(pattern, label, timeout) : this.waitFor(pattern, label, timeout)));
  }

  /** Types text on the serial console exactly as given (the caller adds '\n'). */
  send(text: string): Steps<void> {
    ++this.stepCount;
    return this.enqueue(async () => {
      this.emulator.serial0_send(text);
    });
  }

  /**
   * Types keys on the PS/2 keyboard (see src/v86/keyboard.ts: `\n` is Enter, `<Esc>`, `<F1>`, `<Ctrl-X>`...,
   * `<<` a literal '<'). Throws a KeysError at once for text that cannot be typed.
   */
  sendKeys(keys: string): Steps<void> {
    const strokes = parseKeys(keys);
    const label = `step ${++this.stepCount} (send-keys ${JSON.stringify(keys)})`;
    return this.enqueue(() => this.type(strokes, label));
  }

  /** The VGA text screen now: its rows (full width) joined by newlines; '' in a graphics mode. */
  screenText(): string {
    return this.screen.text();
  }

  /** The screen now as a PNG: text modes drawn with the VGA's font, graphics modes from the frame buffer. */
  screenshot(): Uint8Array {
    return encodePng(this.screen.frame());
  }

  /**
   * Saves the running machine and its disk as session NAME inside the qcow2 overlay (replacing one of that
   * name); `qcow86 boot --resume NAME` and the tab continue from it.
   */
  async saveSession(name: string): Promise<SaveResult> {
    const device = this.disk.device;
    if (!(device instanceof Qcow2Image)) throw new SessionError(device.name, name, 'needs a qcow2 overlay');
    if (!this.codecs) throw new SessionError(device.name, name, 'cannot be saved: this machine was made without codecs');
    await this.queue;
    if (this.failure) throw this.failure;
    return saveSession(this, device, name, this.codecs, { replace: true });
  }

  /**
   * Types `poweroff` and waits for the kernel's last words. v86 offers no ACPI tables to this guest, so the
   * kernel halts ("reboot: System halted") after busybox init has synced and remounted everything read-only.
   */
  powerOff(options: { timeout?: number } = {}): Steps<ExpectResult> {
    return this.send('poweroff\n').expect(POWERED_OFF, options);
  }

  /** Stops the CPU and flushes every acknowledged disk write to the device. Safe to call twice. */
  stop(): Promise<void> {
    this.stopped ??= (async () => {
      this.keys.clear(new Error('the machine was stopped'));
      await this.emulator.stop();
      await this.disk.flush();
      await this.emulator.destroy();
    })();
    return this.stopped;
  }

  /** stop(), then closes the disk's device and its backing chain (the overlay is flushed first). Safe to call twice. */
  close(): Promise<void> {
    this.closed ??= (async () => {
      await this.stop();
      await this.disk.close();
    })();
    return this.closed;
  }

  /**
   * v86 runs the guest in slices from timers; an exception there (a guest tripping an emulator bug: "memory access
   * out of bounds") would end the whole process. It stops the machine instead, and the steps say why.
   */
  private catchEmulatorErrors(): void {
    const main = (this.emulator as unknown as { v86?: { do_tick?: () => void; stopping: boolean } }).v86;
    const tick = main?.do_tick;
    if (!main || typeof tick !== 'function') return;
    // One more tick with `stopping` set only marks the machine stopped (v86's stop() and destroy() wait for it).
    this.markStopped = () => {
      main.stopping = true;
      tick.call(main);
    };
    main.do_tick = () => {
      if (this.crash) return;
      try {
        tick.call(main);
      } catch (error) {
        this.halt(error instanceof Error ? error : new Error(String(error)));
      }
    };
    // The disk may have failed before the emulator was loaded (its first reads): stop it now.
    if (this.crash) this.markStopped();
  }

  /** Stops running the guest for good and fails every waiting and later step with `reason`. */
  private halt(reason: Error): void {
    if (this.crash) return;
    this.crash = reason;
    this.markStopped?.();
    for (const listener of this.crashListeners) listener(reason);
  }

  private markStopped: (() => void) | undefined;

  /** The disk failure that stopped the machine, if one did. */
  get diskFailure(): DiskFailure | undefined {
    return this.crash instanceof DiskFailure ? this.crash : undefined;
  }

  /** Calls listener if (or once) the emulator failed; returns an unsubscribe function. */
  private onCrash(listener: (error: Error) => void): () => void {
    if (this.crash) {
      listener(this.crash);
      return () => {};
    }
    this.crashListeners.add(listener);
    return () => this.crashListeners.delete(listener);
  }

  /** Why the emulator stopped, when it failed (see catchEmulatorErrors). */
  get emulatorError(): Error | undefined {
    return this.crash;
  }

  private enqueue<T>(step: () => Promise<T>): Steps<T> {
    const done = this.queue.then(() => {
      // After a failure the script is over: later steps report the failure that ended it instead of running.
      if (this.failure) throw this.failure;
      return Promise.race([step(), this.attachFailed]);
    });
    this.queue = done.catch((error: unknown) => {
      this.failure ??= error;
    });
    // Marks the rejection handled for chains whose middle steps nobody awaits; awaiting `done` still rejects.
    done.catch(() => {});
    return new Steps(this, done);
  }

  /** Rejects with a StepError if the emulator fails while a step waits; returns cleanup extended to unsubscribe. */
  private failOnCrash(label: string, reject: (error: StepError) => void, cleanup: () => void): () => void {
    let off = () => {};
    const all = () => {
      cleanup();
      off();
    };
    off = this.onCrash((error) => {
      all();
      reject(this.fail(label, stoppedBecause(error)));
    });
    return all;
  }

  private fail(label: string, reason: string): StepError {
    return new StepError(label, this.console.lastLines(), reason, this.screen.lastLines());
  }

  private waitFor(pattern: string | RegExp, label: string, timeout: number): Promise<ExpectResult> {
    return new Promise((resolve, reject) => {
      const attempt = (): boolean => {
        const found = this.console.take(pattern);
        if (!found) return false;
        cleanup();
        resolve(found);
        return true;
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(this.fail(label, `timed out after ${(timeout / 1000).toFixed(1)} s`));
      }, timeout);
      const unsubscribe = this.console.onChange(attempt);
      let cleanup = () => {
        clearTimeout(timer);
        unsubscribe();
      };
      if (attempt()) return;
      cleanup = this.failOnCrash(label, reject, cleanup);
    });
  }

  private waitForScreen(pattern: string | RegExp, label: string, timeout: number): Promise<ExpectResult> {
    return new Promise((resolve, reject) => {
      let checkedVersion = -1;
      let scheduled: ReturnType<typeof setTimeout> | undefined;
      const attempt = (): void => {
        scheduled = undefined;
        if (checkedVersion === this.screen.version) return;
        checkedVersion = this.screen.version;
        const text = this.screen.text();
        const match = matchIn(text, pattern);
        if (!match) return;
        cleanup();
        resolve({ text, match });
      };
      // The screen changes a character at a time: look again shortly after changes instead of after each one.
      const unsubscribe = this.screen.onChange(() => {
        scheduled ??= setTimeout(attempt, SCREEN_CHECK_MS);
      });
      const timer = setTimeout(() => {
        cleanup();
        reject(this.fail(label, `timed out after ${(timeout / 1000).toFixed(1)} s`));
      }, timeout);
      let cleanup = () => {
        clearTimeout(timer);
        if (scheduled) clearTimeout(scheduled);
        unsubscribe();
      };
      cleanup = this.failOnCrash(label, reject, cleanup);
      attempt();
    });
  }

  /**
   * Presses keys at the pace the guest reads them (src/v86/key-pacing.ts): none is lost to a keyboard the guest
   * has not enabled yet or to a full BIOS buffer while a boot loader is busy; the step ends once the guest has
   * read the last one.
   */
  private async type(strokes: KeyStroke[], label: string): Promise<void> {
    const typed = this.keys.type(strokes.map(strokeScancodes));
    let cleanup = () => {};
    const failed = new Promise<never>((_, reject) => {
      const timer = setTimeout(() => {
        cleanup();
        reject(this.fail(label, `timed out after ${(this.timeout / 1000).toFixed(1)} s waiting for ${this.keys.waitingFor ?? 'the guest to read its keyboard'}`));
      }, this.timeout);
      cleanup = this.failOnCrash(label, reject, () => clearTimeout(timer));
    });
    try {
      await Promise.race([typed, failed]);
    } catch (error) {
      // Keys left over from a failed step must not reach the guest behind later steps' backs.
      this.keys.clear(error);
      throw error;
    } finally {
      cleanup();
    }
  }
}

function stoppedBecause(error: Error): string {
  return error instanceof DiskFailure ? error.message : `the emulator stopped: ${error.message}`;
}

function matchIn(text: string, pattern: string | RegExp): RegExpExecArray | [string] | undefined {
  if (typeof pattern === 'string') return text.includes(pattern) ? [pattern] : undefined;
  const re = new RegExp(pattern.source, pattern.flags.replace('g', '').replace('y', ''));
  return re.exec(text) ?? undefined;
}

function describe(pattern: string | RegExp): string {
  return typeof pattern === 'string' ? JSON.stringify(pattern) : String(pattern);
}

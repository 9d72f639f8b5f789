/**
 * A v86 PC with our disk and a scriptable serial console, shared by Node (CLI, tests, benchmarks) and the browser.
 * Platform specifics come in as values: BIOS bytes, the wasm location (a file path in Node, a URL in a page) and
 * an optional screen container.
 *
 *   const m = bootMachine({ ... });
 *   await m.expect('# ');
 *   const { match } = await m.send('sha256sum f\n').expect(/([0-9a-f]{64})/);
 *   await m.stop();           // stops the CPU and flushes the disk
 *
 * Steps run one after another in the order they were chained, whoever awaits them. A step that times out rejects
 * with a StepError naming the step and carrying the console's last lines; later steps then fail too.
 */
import { V86, type V86Image, type V86Options } from 'v86';
import type { BlockDevice } from '../qcow2/device.js';
import { ConsoleText } from './console.js';
import { V86DiskAdapter, type DiskAdapterOptions } from './disk.js';

export interface MachineOptions {
  /** The hard disk: a BlockDevice (wrapped in a V86DiskAdapter) or an adapter the caller made. */
  disk: BlockDevice | V86DiskAdapter;
  /**
   * Benchmarks only: hand v86 this whole raw image in memory instead of our adapter (v86's own buffer disk, the
   * reference our adapter is measured against). `disk` is then left idle.
   */
  referenceDisk?: { buffer: ArrayBuffer };
  diskOptions?: DiskAdapterOptions;
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
  /** Default timeout of an expect step, in milliseconds (default 60 s). */
  timeoutMs?: number;
  /** Every chunk of serial output as it arrives, undecoded escapes included (for stdout or a terminal). */
  onSerial?: (text: string) => void;
  /** A page element for the VGA screen (browser only). */
  screenContainer?: unknown;
}

export interface ExpectResult {
  /** Console text (escapes removed) from the end of the previous match to the end of this one. */
  text: string;
  match: RegExpExecArray | [string];
}

/** What the kernel prints last on `poweroff`: with ACPI "Power down", without it (v86 here) "System halted". */
export const POWERED_OFF = /reboot: (Power down|System halted)/;

export class StepError extends Error {
  constructor(readonly step: string, readonly lastLines: string, reason: string) {
    super(`${step}: ${reason}\n--- last console lines ---\n${lastLines}\n---`);
    this.name = 'StepError';
  }
}

/** A chained sequence of steps; awaiting it waits for its last step. */
export class Steps<T> implements PromiseLike<T> {
  constructor(private readonly machine: Machine, private readonly done: Promise<T>) {}

  expect(pattern: string | RegExp, options?: { timeoutMs?: number }): Steps<ExpectResult> {
    return this.machine.expect(pattern, options);
  }

  send(text: string): Steps<void> {
    return this.machine.send(text);
  }

  then<A = T, B = never>(onFulfilled?: ((value: T) => A | PromiseLike<A>) | null, onRejected?: ((reason: unknown) => B | PromiseLike<B>) | null): Promise<A | B> {
    return this.done.then(onFulfilled, onRejected);
  }
}

export class Machine {
  readonly console = new ConsoleText();
  readonly disk: V86DiskAdapter;
  readonly emulator: V86;
  /** Resolves when v86 has started running the guest. */
  readonly started: Promise<void>;
  private queue: Promise<unknown> = Promise.resolve();
  private stepCount = 0;
  private readonly timeoutMs: number;
  private stopped: Promise<void> | undefined;
  private failure: unknown;

  constructor(options: MachineOptions) {
    this.timeoutMs = options.timeoutMs ?? 60_000;
    this.disk = options.disk instanceof V86DiskAdapter ? options.disk : new V86DiskAdapter(options.disk, options.diskOptions);
    const config: V86Options = {
      wasm_path: options.wasmPath,
      memory_size: options.memoryBytes ?? 128 * 1024 * 1024,
      vga_memory_size: 8 * 1024 * 1024,
      bios: { buffer: options.bios },
      vga_bios: { buffer: options.vgaBios },
      // v86 duck-types its disk: any object with get/set/load is used as is (see disk.ts for the contract).
      hda: (options.referenceDisk ?? this.disk) as unknown as V86Image,
      autostart: true,
      disable_keyboard: true,
      disable_mouse: true,
      disable_speaker: true,
      ...(options.bzimage ? { bzimage: { buffer: options.bzimage } } : {}),
      ...(options.initrd ? { initrd: { buffer: options.initrd } } : {}),
      ...(options.cmdline !== undefined ? { cmdline: options.cmdline } : {}),
      ...(options.screenContainer ? { screen: { container: options.screenContainer } } : {}),
    } as V86Options;
    this.emulator = new V86(config);
    this.started = new Promise((resolve) => this.emulator.add_listener('emulator-started', () => resolve()));
    this.emulator.add_listener('serial0-output-byte', (byte: number) => {
      const text = this.console.push(Uint8Array.of(byte));
      if (text) options.onSerial?.(text);
    });
  }

  /** Waits until pattern appears on the serial console after the previous match. */
  expect(pattern: string | RegExp, options: { timeoutMs?: number } = {}): Steps<ExpectResult> {
    const label = `step ${++this.stepCount} (expect ${describe(pattern)})`;
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    return this.enqueue(() => this.waitFor(pattern, label, timeoutMs));
  }

  /** Types text on the serial console exactly as given (the caller adds '\n'). */
  send(text: string): Steps<void> {
    ++this.stepCount;
    return this.enqueue(async () => {
      this.emulator.serial0_send(text);
    });
  }

  /**
   * Types `poweroff` and waits for the kernel's last words. v86 offers no ACPI tables to this guest, so the
   * kernel halts ("reboot: System halted") after busybox init has synced and remounted everything read-only.
   */
  powerOff(options: { timeoutMs?: number } = {}): Steps<ExpectResult> {
    return this.send('poweroff\n').expect(POWERED_OFF, options);
  }

  /** Stops the CPU and flushes every acknowledged disk write to the device. Safe to call twice. */
  stop(): Promise<void> {
    this.stopped ??= (async () => {
      await this.emulator.stop();
      await this.disk.flush();
      await this.emulator.destroy();
    })();
    return this.stopped;
  }

  /** stop(), then closes the disk's device and its backing chain. */
  async close(): Promise<void> {
    await this.stop();
    await this.disk.close();
  }

  private enqueue<T>(step: () => Promise<T>): Steps<T> {
    const done = this.queue.then(() => {
      // After a failure the script is over: later steps report the failure that ended it instead of running.
      if (this.failure) throw this.failure;
      return step();
    });
    this.queue = done.catch((error: unknown) => {
      this.failure ??= error;
    });
    // Marks the rejection handled for chains whose middle steps nobody awaits; awaiting `done` still rejects.
    done.catch(() => {});
    return new Steps(this, done);
  }

  private waitFor(pattern: string | RegExp, label: string, timeoutMs: number): Promise<ExpectResult> {
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
        reject(new StepError(label, this.console.lastLines(), `timed out after ${(timeoutMs / 1000).toFixed(1)} s`));
      }, timeoutMs);
      const unsubscribe = this.console.onChange(attempt);
      const cleanup = () => {
        clearTimeout(timer);
        unsubscribe();
      };
      attempt();
    });
  }
}

function describe(pattern: string | RegExp): string {
  return typeof pattern === 'string' ? JSON.stringify(pattern) : String(pattern);
}

export function bootMachine(options: MachineOptions): Machine {
  return new Machine(options);
}

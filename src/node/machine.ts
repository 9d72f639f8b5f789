/**
 * `qcow86/machine`: the boot harness as a library, for Node programs and test runners. `qcow86 boot` is built on
 * it; the options mean what the CLI's flags mean.
 *
 *   import { bootMachine } from 'qcow86/machine';
 *   const machine = await bootMachine({ base: 'disk.qcow2', overlay: 'run.qcow2' });
 *   await machine.expect('login:', { on: 'screen' });
 *   await machine.sendKeys('root\n');
 *   writeFileSync('screen.png', machine.screenshot());
 *   await machine.close();
 *
 * The disk is always a qcow2 overlay on the base (see boot-disk.ts), so the base is never written.
 */
import { join } from 'node:path';
import type { HttpStore } from '../io/http.js';
import { nodeCodecs } from '../io/node.js';
import { Qcow2Image } from '../qcow2/image.js';
import { Machine, type MachineOptions } from '../v86/machine.js';
import { SessionError, loadSession, resumeSession, v86StateMemoryBytes, type LoadedSession, type SessionInfo } from '../v86/session.js';
import { openBootDisk } from './boot-disk.js';
import { DEFAULT_DISK_BUS, type DiskBus } from '../v86/disk-bus.js';
import { DEFAULT_IMAGES_DIR, loadMachineAssets, readFileBuffer } from './machine-assets.js';

export { POWERED_OFF, StepError, Steps, DEFAULT_TIMEOUT_MS, type ExpectOptions, type ExpectResult } from '../v86/machine.js';
export { KeysError } from '../v86/keyboard.js';
export { SessionError, type SaveResult, type SessionInfo } from '../v86/session.js';
export type { DiskBus } from '../v86/disk-bus.js';

export interface BootMachineOptions {
  /** Base image: a file path or an http(s) URL read with Range requests (default: the default guest). */
  base?: string;
  /**
   * qcow2 file for the guest's writes: opened on its own backing file when it exists, created on `base` when it
   * does not. Without it the writes go to a throw-away overlay in memory.
   */
  overlay?: string;
  /** Guest RAM: bytes, or a size as the CLI writes it ('256M', '1G'; a bare number is MiB). Default 128 MiB. */
  memory?: number | string;
  /** Continue from session NAME saved in `overlay` (the disk goes back to that session). */
  resume?: string;
  /**
   * How the disk is attached: 'virtio' (default) or 'ide'. A resumed session uses the bus it was saved on (IDE for
   * sessions saved before buses were recorded); a different diskBus is refused.
   */
  diskBus?: DiskBus;
  /** Default time an expect step may wait, in milliseconds (default 300000). */
  timeout?: number;
  /** Every chunk of serial output as it arrives (escapes included), e.g. `(t) => process.stdout.write(t)`. */
  onSerial?: (text: string) => void;
  /** Open an existing overlay although its base changed since the overlay was made. */
  forceBaseChange?: boolean;
  /**
   * Open every file the images name, wherever it is (`--trust-image`). By default only backing files inside the
   * overlay's directory, `base`, the default guest's base and http(s) URLs that are not link-local, and data
   * files inside the overlay's directory (README, Security).
   */
  trustImage?: boolean;
  /**
   * The password of the chain's encrypted images (boot --key-secret); a new `overlay` is then created encrypted
   * with it (LUKS with QEMU's defaults).
   */
  password?: Uint8Array;
  /** Direct kernel boot with this command line (kernel and initrd default to the default guest's). */
  cmdline?: string;
  kernel?: string;
  initrd?: string;
}

const MiB = 1024 * 1024;

/** A size as `--memory` takes it: 128M, 1G, 512K, 64MiB; a bare number is MiB. */
export function parseSize(text: string): number {
  const match = /^(\d+)([KMG]?)i?B?$/i.exec(text.trim());
  if (!match) throw new RangeError(`bad size '${text}' (e.g. 128M)`);
  const unit = { '': MiB, K: 1024, M: MiB, G: 1024 * MiB }[match[2]!.toUpperCase() as '' | 'K' | 'M' | 'G'];
  return Number(match[1]) * unit;
}

/** Guest RAM in bytes from `memory` as bootMachine takes it; RangeError for sizes v86 cannot run. */
export function guestMemoryBytes(memory: number | string | undefined): number {
  if (memory === undefined) return 128 * MiB;
  const bytes = typeof memory === 'number' ? memory : parseSize(memory);
  if (!Number.isSafeInteger(bytes) || bytes < 16 * MiB || bytes > 3 * 1024 * MiB) {
    throw new RangeError(`memory ${JSON.stringify(memory)}: the guest needs between 16 MiB and 3 GiB`);
  }
  return bytes;
}

/** A machine booted by bootMachine: what was opened, for logs, and the HTTP counters of a remote base. */
export class BootedMachine extends Machine {
  /** What was opened: "overlay x.qcow2 (created) on base.qcow2". */
  description = '';
  /** The base's HTTP store when the base is an http(s) URL (requests, bytes fetched). */
  http: HttpStore | undefined;
  /** The session this machine continued from (options.resume). */
  resumed: SessionInfo | undefined;
}

/**
 * Boots the PC on an overlay of `base` and returns it running (resumed, with options.resume). Close it with
 * `close()`, which stops the CPU and flushes and closes the overlay.
 */
export async function bootMachine(options: BootMachineOptions = {}): Promise<BootedMachine> {
  const codecs = nodeCodecs();
  const memory = guestMemoryBytes(options.memory);
  if (options.resume !== undefined && options.overlay === undefined) {
    throw new SessionError('(no overlay)', options.resume, 'cannot be resumed without an overlay file (the file holding it)');
  }
  const disk = await openBootDisk({ base: options.base, overlay: options.overlay, forceBaseChange: options.forceBaseChange, trustImage: options.trustImage, password: options.password });
  let machine: BootedMachine | undefined;
  try {
    // A session is read and checked before the machine starts: a missing or damaged one fails with nothing changed.
    let loaded: LoadedSession | undefined;
    if (options.resume !== undefined) {
      if (!(disk.device instanceof Qcow2Image)) throw new SessionError(disk.device.name, options.resume, 'needs a qcow2 overlay');
      loaded = await loadSession(disk.device, options.resume, codecs);
      if (options.diskBus !== undefined && options.diskBus !== loaded.machine.diskBus) {
        throw new SessionError(disk.device.name, loaded.snapshot.name, `was saved with its disk on ${loaded.machine.diskBus}: it resumes on ${loaded.machine.diskBus}, not on --disk-bus ${options.diskBus} (leave --disk-bus out)`);
      }
    }
    const direct: Partial<MachineOptions> = options.cmdline !== undefined
      ? {
        bzimage: await readFileBuffer(options.kernel ?? join(DEFAULT_IMAGES_DIR, 'vmlinuz')),
        initrd: await readFileBuffer(options.initrd ?? join(DEFAULT_IMAGES_DIR, 'initrd.gz')),
        cmdline: options.cmdline,
      }
      : {};
    machine = new BootedMachine({
      disk: disk.device,
      ...(await loadMachineAssets()),
      // v86 restores a state only into a machine of the memory size it was saved with.
      memoryBytes: (loaded && v86StateMemoryBytes(loaded.state)) ?? memory,
      diskBus: loaded?.machine.diskBus ?? options.diskBus ?? DEFAULT_DISK_BUS,
      codecs,
      ...(options.timeout !== undefined ? { timeout: options.timeout } : {}),
      ...(options.onSerial ? { onSerial: options.onSerial } : {}),
      ...direct,
    });
    machine.description = disk.description;
    machine.http = disk.http;
    if (loaded && disk.device instanceof Qcow2Image) machine.resumed = await resumeSession(machine, disk.device, loaded, codecs);
    return machine;
  } catch (error) {
    if (machine) await machine.close().catch(() => {});
    else await disk.device.close().catch(() => {});
    throw error;
  }
}

export { BootedMachine as Machine };

/**
 * A volatile write cache on v86's IDE disk, made honest: the drive says it has one, and the guest's FLUSH CACHE
 * reaches our disk.
 *
 * v86 (npm 0.5.462) reports no write cache in IDENTIFY DEVICE (words 82 and 85 without bit 5), so Linux calls the
 * disk "write through" and never flushes, while our adapter caches writes; and it completes FLUSH CACHE (E7h) and
 * FLUSH CACHE EXT (EAh) at once without telling the disk. v86 has no hook for either, so the narrowest change is
 * made on the one drive object that holds our disk: its IDENTIFY data gets bit 5 in words 82 (write cache
 * supported) and 85 (enabled), and the two flush commands keep the drive busy until our flush is durable, then
 * complete as v86 completes commands (status DRDY|DSC, interrupt). Everything else stays v86's.
 *
 * v86's minified build keeps property names, so the drive is found by name. Anything unexpected about it throws
 * here, before the guest runs, rather than leaving a guest whose sync promises nothing: a v86 upgrade that
 * changes these internals fails the machine's start (and test/v86/ide-write-cache.test.ts) instead.
 */
import type { V86 } from 'v86';

const FLUSH_CACHE = 0xe7;
const FLUSH_CACHE_EXT = 0xea;
/** ATA status bits v86 uses: BSY, DRDY, DSC. */
const STATUS_BUSY = 0x80;
const STATUS_READY = 0x50;
/** Bit 5 of IDENTIFY words 82 (command set supported) and 85 (command set enabled): the volatile write cache. */
const WRITE_CACHE = 0x20;
const WORD_82 = 82 * 2;
const WORD_85 = 85 * 2;

/** The fields and methods of v86's IDEInterface this relies on. */
interface IdeDrive {
  buffer: unknown;
  is_atapi: boolean;
  drive_connected: boolean;
  status_reg: number;
  error_reg: number;
  current_command: number;
  data: Uint8Array;
  ata_command(command: number): void;
  create_identify_packet(): void;
  device_reset(): void;
  push_irq(): void;
}

/** What the drive's flush waits for: our disk adapter. */
export interface GuestFlushTarget {
  flushForGuest(): Promise<void>;
}

/** The primary master IDE drive of a v86 emulator whose `cpu` exists (after 'emulator-ready'). */
export function findIdeDrive(emulator: V86, disk: unknown): IdeDrive {
  const devices = (emulator as unknown as { v86?: { cpu?: { devices?: Record<string, unknown> } } }).v86?.cpu?.devices;
  const ide = devices?.ide as { primary?: { master?: Partial<IdeDrive> } } | undefined;
  const drive = ide?.primary?.master;
  const missing: string[] = [];
  if (!drive) {
    missing.push('v86.cpu.devices.ide.primary.master');
  } else {
    for (const name of ['ata_command', 'create_identify_packet', 'device_reset', 'push_irq'] as const) if (typeof drive[name] !== 'function') missing.push(name);
    for (const name of ['status_reg', 'error_reg', 'current_command'] as const) if (typeof drive[name] !== 'number') missing.push(name);
    if (!(drive.data instanceof Uint8Array)) missing.push('data');
  }
  if (missing.length > 0) {
    throw new Error(`this v86 build's IDE drive is not what qcow86 expects (missing: ${missing.join(', ')}): the guest's FLUSH CACHE cannot reach the disk`);
  }
  if (drive!.buffer !== disk) throw new Error("v86's primary IDE drive does not hold this machine's disk: cannot route FLUSH CACHE to it");
  return drive as IdeDrive;
}

/** Drives whose disk is ours, with the disk to flush (v86's drive objects are sealed: nothing can be added to them). */
const targets = new WeakMap<object, GuestFlushTarget>();
/** Resets per drive: a flush's late completion must not touch the command that follows a reset. */
const resets = new WeakMap<object, number>();
const patched = new WeakSet<object>();

/**
 * Makes the primary master drive (which holds `disk`) report a write cache and route the guest's flushes to
 * `disk.flushForGuest()`. Call on 'emulator-ready', before the guest runs.
 *
 * v86 seals its drive objects, so the three methods are wrapped on their shared prototype, once per v86 build
 * loaded; the wrappers act only on drives registered here and leave every other drive (the CD-ROM, v86's own
 * buffer disks, other machines in the process) to v86 unchanged.
 */
export function installIdeWriteCache(emulator: V86, disk: GuestFlushTarget): void {
  const drive = findIdeDrive(emulator, disk);
  const proto = Object.getPrototypeOf(drive) as IdeDrive;
  if (!patched.has(proto)) {
    patchDrivePrototype(proto);
    patched.add(proto);
  }
  targets.set(drive, disk);
}

function patchDrivePrototype(proto: IdeDrive): void {
  const identify = proto.create_identify_packet;
  proto.create_identify_packet = function (this: IdeDrive) {
    identify.call(this);
    if (this.is_atapi || !targets.has(this)) return;
    this.data[WORD_82]! |= WRITE_CACHE;
    this.data[WORD_85]! |= WRITE_CACHE;
  };

  const reset = proto.device_reset;
  proto.device_reset = function (this: IdeDrive) {
    resets.set(this, (resets.get(this) ?? 0) + 1);
    reset.call(this);
  };

  const command = proto.ata_command;
  proto.ata_command = function (this: IdeDrive, code: number) {
    const disk = targets.get(this);
    if (!disk || (code !== FLUSH_CACHE && code !== FLUSH_CACHE_EXT) || this.is_atapi || !this.drive_connected) {
      command.call(this, code);
      return;
    }
    this.current_command = code;
    this.error_reg = 0;
    this.status_reg = STATUS_BUSY | STATUS_READY;
    const issued = resets.get(this) ?? 0;
    void disk.flushForGuest().then(() => {
      if (issued !== (resets.get(this) ?? 0) || this.current_command !== code || !(this.status_reg & STATUS_BUSY)) return;
      this.status_reg = STATUS_READY;
      this.current_command = -1;
      this.push_irq();
    });
  };
}

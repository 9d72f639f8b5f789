/**
 * Which bus the machine's hard disk sits on, and the wiring for each, shared by the Node harness and the tab's
 * machine Worker: IDE (v86's own controller, with our write-cache hook) or virtio-blk (our device on v86's PCI
 * bus). Both put the same disk adapter in front of the image.
 */
import type { V86, V86Image, V86Options } from 'v86';
import type { V86DiskAdapter } from './disk.js';
import { installIdeWriteCache } from './ide-write-cache.js';
import { attachVirtioBlk, type VirtioBlk, type VirtioBlkOptions } from './virtio-blk.js';

export type DiskBus = 'ide' | 'virtio';
export const DISK_BUSES: readonly DiskBus[] = ['ide', 'virtio'];
/** New machines get virtio: it is faster and knows discard; sessions saved without a bus resume on IDE. */
export const DEFAULT_DISK_BUS: DiskBus = 'virtio';

export function isDiskBus(value: unknown): value is DiskBus {
  return value === 'ide' || value === 'virtio';
}

/** SeaBIOS boot order: hard disk, then floppy, then CD (v86's own choice when it has an IDE disk). */
const BOOT_HARD_DISK_FIRST = 0x312;

/** The v86 options that put `disk` on `bus` (for IDE: as hda; for virtio: nothing, it is attached on ready). */
export function diskBusOptions(bus: DiskBus, disk: V86DiskAdapter | { buffer: ArrayBuffer }): Partial<V86Options> {
  // v86 duck-types its disk: any object with get/set/load is used as is (see disk.ts for the contract).
  if (bus === 'ide') return { hda: disk as unknown as V86Image };
  return { boot_order: BOOT_HARD_DISK_FIRST } as unknown as Partial<V86Options>;
}

export interface AttachedDisk {
  bus: DiskBus;
  /** The virtio device, on the virtio bus. */
  virtio: VirtioBlk | undefined;
}

/**
 * Connects the disk to the guest once v86's devices exist: registers the virtio device, or gives the IDE drive
 * a write cache whose FLUSH CACHE reaches the adapter (unless the adapter is write-through, where "no write
 * cache" is the truth). Resolves on 'emulator-ready', before the BIOS runs; a v86 whose internals changed throws.
 */
export function attachDisk(emulator: V86, bus: DiskBus, disk: V86DiskAdapter, options: { ideWriteCache?: boolean; virtio?: VirtioBlkOptions } = {}): Promise<AttachedDisk> {
  return new Promise((resolve, reject) => {
    emulator.add_listener('emulator-ready', () => {
      try {
        if (bus === 'virtio') {
          resolve({ bus, virtio: attachVirtioBlk(emulator, disk, options.virtio) });
          return;
        }
        if (options.ideWriteCache !== false) installIdeWriteCache(emulator, disk);
        resolve({ bus, virtio: undefined });
      } catch (error) {
        reject(error);
      }
    });
  });
}

/**
 * Restores v86's own state into `emulator` (use this instead of `emulator.restore_state`).
 *
 * v86 0.5.462 restores each PCI device's I/O BARs by moving the bar objects of the machine it restores into. Its
 * IDE controller without a primary channel (no IDE disk: the virtio bus) has no bar objects for BARs 0 and 1
 * while its configuration space marks them as I/O until the BIOS rewrites them, so restoring a state saved
 * before that throws ("Cannot read properties of undefined (reading 'original_bar')"). For the restore only,
 * those slots get empty bars (nothing to move); they are taken away again at once, so the BIOS never sees them.
 */
export async function restoreV86State(emulator: V86, state: ArrayBuffer): Promise<void> {
  const ide = (emulator as unknown as { v86?: { cpu?: { devices?: { ide?: { pci_bars?: unknown[] } } } } }).v86?.cpu?.devices?.ide;
  const bars = ide?.pci_bars;
  const filled: number[] = [];
  if (Array.isArray(bars)) {
    for (let i = 0; i < bars.length; i++) {
      if (bars[i] !== undefined) continue;
      bars[i] = { size: 0, original_bar: 0, entries: [] };
      filled.push(i);
    }
  }
  try {
    await emulator.restore_state(state);
  } finally {
    for (const i of filled) bars![i] = undefined;
  }
}

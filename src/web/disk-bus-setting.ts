/**
 * The tab's disk bus: a setting kept per stored disk (localStorage, by the overlay's name), set by the address
 * (`?disk-bus=ide|virtio`) or by the Disk bus choice in the status panel. The bus is fixed when the machine is
 * built, so changing it saves the disk and builds a new page; a resumed session uses the bus it was saved on.
 */
import { DEFAULT_DISK_BUS, isDiskBus, type DiskBus } from '../v86/disk-bus.js';
import { ask, showProblem } from './status-view.js';

const key = (overlay: string) => `qcow86:disk-bus:${overlay}`;

/** The address's ?disk-bus= (then kept as this disk's setting), else the disk's setting, else virtio. */
export function chooseDiskBus(overlay: string, asked: string | null): DiskBus {
  if (asked !== null) {
    if (isDiskBus(asked)) {
      keepDiskBus(overlay, asked);
      return asked;
    }
    showProblem('other', `?disk-bus=${asked} is not a disk bus (ide or virtio): the disk's own setting is used.`);
  }
  try {
    const kept = localStorage.getItem(key(overlay));
    return isDiskBus(kept) ? kept : DEFAULT_DISK_BUS;
  } catch {
    return DEFAULT_DISK_BUS;
  }
}

export function keepDiskBus(overlay: string, bus: DiskBus): void {
  try {
    localStorage.setItem(key(overlay), bus);
  } catch {
    // Storage refused (a private window): the choice lasts for this page only.
  }
}

/**
 * Shows the bus the machine runs on in `select`; choosing the other one asks, keeps it for this disk, and has
 * `restart` save the disk and load the page again without ?disk-bus= (so the kept setting rules).
 */
export function showDiskBus(select: HTMLSelectElement, bus: DiskBus, overlay: string, restart: (url: URL) => Promise<void>): void {
  select.value = bus;
  select.onchange = () => {
    const wanted = select.value;
    if (!isDiskBus(wanted) || wanted === bus) return;
    void (async () => {
      const choice = await ask(
        `Restart with the disk on ${wanted === 'ide' ? 'IDE' : 'virtio'}?`,
        'The machine restarts (like a reset) with its disk attached the other way; the disk is saved first and keeps its contents. ' +
          'This disk remembers the choice.',
        [
          { label: 'Cancel', value: 'cancel' },
          { label: 'Restart', value: 'restart', kind: 'primary' },
        ],
      );
      if (choice !== 'restart') {
        select.value = bus;
        return;
      }
      keepDiskBus(overlay, wanted);
      const url = new URL(location.href);
      url.searchParams.delete('disk-bus');
      await restart(url);
    })().catch((error: unknown) => showProblem('other', (error as Error).message));
  };
}

/**
 * Guesses the boot phase from what a person would see: the machine starting, the first disk reads (boot
 * loader), the kernel's console output, and finally a shell prompt on the serial console. That story is known
 * only for the guests this server lists (images/build.mjs GUESTS); for any other disk the page says only what it
 * observes (the firmware started, the disk is being read, the console or the screen is active).
 */
import type { ConsoleView } from './console-view.js';
import type { PhaseState } from './status-view.js';

/** A shell prompt at the end of the console text: busybox's `~ # ` or a `$ ` (its ESC[6n is already removed). */
export const PROMPT = /(^|\n)[^\n]*[#$] $/;

type Listener = (text: string, state: PhaseState) => void;

export class BootPhases {
  private phase = '';
  private listeners: Listener[] = [];
  private running = false;
  /** The Worker's read counter spans restarts; reads of this boot are counted from here. */
  private baseline = 0;
  private needBaseline = false;
  private readsThisBoot = 0;
  private resumedFrom: string | undefined;
  /** The shell's prompt appeared in this boot: kernel messages printed after it (an ext4 warning) do not undo that. */
  private shellSeen = false;
  /** Whether the guest is one whose boot this page knows (a listed Linux guest). */
  private known = true;

  constructor(private readonly console: ConsoleView) {
    setInterval(() => this.update(), 200);
  }

  /** An unlisted guest: claim nothing about boot loaders, kernels or shells. */
  unknownGuest(): void {
    this.known = false;
    this.update();
  }

  onChange(listener: Listener): void {
    this.listeners.push(listener);
  }

  started(): void {
    this.running = true;
    this.update();
  }

  /** The machine continues from a saved session: it is running, not booting. */
  resumed(name: string): void {
    this.resumedFrom = name;
    this.running = true;
    this.phase = '';
    this.update();
  }

  reset(): void {
    this.resumedFrom = undefined;
    this.shellSeen = false;
    this.needBaseline = true;
    this.readsThisBoot = 0;
    this.phase = '';
  }

  noteDiskReads(total: number): void {
    if (this.needBaseline) {
      this.baseline = total;
      this.needBaseline = false;
    }
    this.readsThisBoot = total - this.baseline;
  }

  private update(): void {
    if (!this.running) return;
    const text = this.console.text;
    let phase: string;
    let state: PhaseState = 'busy';
    if (!this.known) {
      if (this.resumedFrom !== undefined) {
        phase = `Running — resumed session '${this.resumedFrom}'`;
        state = 'ready';
      } else if (this.readsThisBoot > 0) {
        phase = text.trim() ? 'Running — booted from the disk; its serial console is active' : 'Running — booted from the disk (see its screen)';
        state = 'ready';
      } else {
        phase = 'Firmware (BIOS) is starting…';
      }
    } else if (this.shellSeen || PROMPT.test(text)) {
      this.shellSeen = true;
      phase = 'Running — shell ready on the serial console';
      state = 'ready';
    } else if (this.resumedFrom !== undefined) {
      phase = `Running — resumed session '${this.resumedFrom}'`;
      state = 'ready';
    } else if (/Linux version|\[\s*\d+\.\d+\]|Run \/init|switch_root|Booting the kernel|decompress/i.test(text)) {
      phase = 'Linux is starting…';
    } else if (/syslinux|isolinux|Loading|boot:/i.test(text) || this.readsThisBoot > 0) {
      phase = 'Boot loader: loading the kernel from disk…';
    } else {
      phase = 'Firmware (BIOS) is starting…';
    }
    if (phase === this.phase) return;
    this.phase = phase;
    for (const listener of this.listeners) listener(phase, state);
  }
}

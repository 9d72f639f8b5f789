/**
 * Messages between the page and the machine Worker, which runs v86 itself. The emulator's instruction loop runs
 * in slices of its own choosing (tens to hundreds of milliseconds on a busy machine, longer while the BIOS clears
 * video memory); on the page's main thread those slices froze the tab, so the page keeps only the views.
 */
import type { DiskBus } from '../v86/disk-bus.js';
import type { MachineRecord } from '../v86/session.js';

/** A machine's whole state: v86's own blob, and what v86 does not save (the disk bus, our virtio device). */
export interface MachineState {
  v86: ArrayBuffer;
  machine: MachineRecord;
}

export interface MachineStart {
  op: 'start';
  /** A port to the disk Worker (RemoteDisk.connect()): the guest's disk requests never touch the page. */
  disk: MessagePort;
  virtualSize: number;
  name: string;
  /** The guest sees a read-only disk (virtio RO; on IDE the writes go to the disk Worker, which discards them). */
  readOnly: boolean;
  diskBus: DiskBus;
  /** Bytes of the image's clusters: discards smaller than this free nothing. */
  discardGranularity?: number | undefined;
  /** Absolute URLs of v86's wasm and the firmware. */
  wasm: string;
  bios: string;
  vgaBios: string;
  memoryBytes: number;
  /** A session's state to start from instead of booting (it fixes memoryBytes and diskBus: v86 needs the same). */
  initialState?: MachineState | undefined;
}

export type MachineRequest =
  | MachineStart
  | { op: 'serial'; data: string }
  | { op: 'scancodes'; codes: number[] }
  /** Stops the CPU and writes every acknowledged guest write to the disk (flushed). */
  | { op: 'stop' }
  /** Hands every acknowledged guest write to the disk Worker and flushes it (the machine keeps running). */
  | { op: 'flush' }
  /** Resets the machine and runs it; `diskChanged` when the disk was replaced underneath (reset, import). */
  | { op: 'restart'; diskChanged: boolean }
  | { op: 'run' }
  | { op: 'save-state' }
  /** Restores a session's state into the stopped machine, whose disk was reverted underneath; does not run it. */
  | { op: 'restore-state'; state: MachineState };

export type MachineEvent =
  | { event: 'started' }
  | { event: 'stopped' }
  /** Serial output bytes, batched (a message per byte would flood the page). */
  | { event: 'serial'; bytes: Uint8Array }
  /** The VGA text screen, one string per row, sent when it changed (at most a few times a second). */
  | { event: 'screen'; rows: string[]; cursor: { row: number; col: number } | undefined }
  /** A graphics mode's picture (RGBA), sent a few times a second while the guest shows one. */
  | { event: 'frame'; width: number; height: number; rgba: Uint8Array }
  /** Guest writes acknowledged but not yet handed to the disk Worker. */
  | { event: 'dirty'; bytes: number }
  | { event: 'disk-error'; kind: string; message: string }
  | { event: 'error'; message: string };

export type MachineReply = { id: number; ok: true; value: unknown } | { id: number; ok: false; message: string };

import type { MachineRecord } from '../v86/session.js';

/**
 * Messages between the page and the disk Worker. The Worker owns the whole disk (qcow2 engine, OPFS overlay,
 * HTTP base) so that no engine or storage work ever runs on the page's main thread; the page holds only a proxy.
 */

/** How the page wants the overlay opened. */
export type OpenMode =
  /** The stored overlay for this base, created when missing; this tab becomes its only writer. */
  | 'write'
  /** The stored overlay as it is now, with changes kept in memory and thrown away (another tab is writing). */
  | 'readonly'
  /** A new, empty overlay under a new name (another tab keeps the old one). */
  | 'fresh';

export interface OpenRequest {
  op: 'open';
  /** Absolute URL of the base image: it becomes the overlay's backing file name. */
  base: string;
  /** OPFS file name of the overlay. */
  overlay: string;
  mode: OpenMode;
  /**
   * The passphrase of an encrypted overlay, asked on every open: the Worker keeps it in memory while the disk is
   * open and never stores it.
   */
  passphrase?: string | undefined;
  /**
   * Set when the overlay this open creates (a fresh disk, or the first visit's disk when the address asks for an
   * encrypted one) is to be encrypted: with `passphrase` when given; without one the Worker creates nothing and
   * answers 'new-passphrase-needed', so that the page asks for one only when a disk is really created. An overlay
   * that already exists opens as it is.
   */
  encryptNew?: { passphrase?: string | undefined } | undefined;
}

export type Request =
  | OpenRequest
  | { op: 'read'; offset: number; length: number }
  | { op: 'write'; offset: number; data: Uint8Array }
  | { op: 'flush' }
  /**
   * Flushes and returns the overlay file's bytes, for a download: { bytes, name, asStored }. After a write failed
   * for want of space, the file as last flushed, without trying to write (asStored).
   */
  | { op: 'export' }
  /**
   * Open overlay: checks a file against the current base, stages it in a file beside the overlay and opens it
   * read-write there; replies with a StagedImport. The stored disk is not touched.
   */
  | { op: 'stage-import'; file: Blob; name: string; passphrase?: string | undefined }
  /**
   * "Encrypt this disk": the open overlay is rewritten as a LUKS-encrypted one with this passphrase (built in the
   * staging file, then swapped in as Open overlay does; its sessions are not carried over). Replies with
   * { map, encryption }. "Change passphrase" is the same on an encrypted disk, whose `current` passphrase must
   * then unlock it (the new overlay has a new master key too).
   */
  | { op: 'encrypt'; passphrase: string; current?: string | undefined }
  /**
   * "Decrypt disk": the open, encrypted overlay is rewritten as a plain qcow2 holding the same data (built in the
   * staging file, then swapped in; its sessions are not carried over). `passphrase` must unlock one of its key
   * slots: whoever decrypts it knows it. Replies with { map, encryption }.
   */
  | { op: 'decrypt'; passphrase: string }
  /** Puts the staged file in the stored overlay's place (or, on failure, leaves the old disk open). */
  | { op: 'commit-import' }
  /** Deletes the staged file (the user did not confirm). */
  | { op: 'discard-import' }
  /**
   * Replaces the overlay with an empty one (the disk goes back to the base). With a passphrase the new disk is
   * encrypted with it ("Encrypt this disk" when a disk is created); without one an encrypted disk stays encrypted
   * with the passphrase it was opened with. Replies with { map, encryption }.
   */
  | { op: 'reset'; passphrase?: string | undefined }
  // A stored overlay that could not be opened (its base changed): kept or thrown away without opening it.
  /** The stored overlay file's bytes as they are, for a download. */
  | { op: 'export-stored'; overlay: string }
  /** Deletes the stored overlay (and its sessions), so the next open starts a new one on the current base. */
  | { op: 'discard-stored'; overlay: string }
  | { op: 'close' }
  // Sessions (disk-sessions.ts): the page takes and restores v86's state; the Worker keeps it in the overlay.
  | { op: 'sessions' }
  /** Stores a stopped machine's save_state() whose disk writes have all been sent; replies with the session. */
  | { op: 'save-session'; name: string; state: ArrayBuffer; machine: MachineRecord; clockNsec: number; replace: boolean }
  /** Reverts the disk to the session and replies with its state ({ session, state, machine, map }). */
  | { op: 'resume-session'; id: string }
  | { op: 'delete-session'; id: string };

/** An overlay file staged by 'stage-import', opened and waiting for the user to confirm the swap. */
export interface StagedImport {
  /** Sessions it holds. */
  sessions: number;
  size: number;
  /** Its encryption, when it is encrypted (e.g. "LUKS aes-256-xts-plain64"). */
  encryption?: string | undefined;
}

/** A session stored in the overlay: an internal snapshot carrying v86's machine state. */
export interface SessionSummary {
  id: string;
  name: string;
  /** Milliseconds since the epoch. */
  date: number;
  /** Bytes of VM state in the file (compressed), as qemu-img's VM SIZE. */
  vmStateSize: number;
  guestClockNsec: number;
}

export interface OpenResult {
  virtualSize: number;
  /** The overlay's OPFS file name actually used (differs from the request for 'fresh'). */
  overlay: string;
  mode: OpenMode;
  /** True when the overlay was created by this open (first visit, or fresh). */
  created: boolean;
  /** The overlay's cluster size (qcow2): discards smaller than this free nothing. */
  clusterSize?: number | undefined;
  /** The overlay's encryption, when it is encrypted (e.g. "LUKS aes-256-xts-plain64"). */
  encryption?: string | undefined;
  map: ClusterMap;
  /** Read-only mode: when the copy of the stored overlay this tab reads was taken (ms since the epoch). */
  copiedAt?: number | undefined;
}

/** What a region of the virtual disk currently reads from. Ordered: a cell shows the highest state it holds. */
export const Cell = { Zero: 0, Base: 1, BaseRead: 2, Overlay: 3 } as const;
export type CellState = (typeof Cell)[keyof typeof Cell];

/** The virtual disk cut into cells of `cellSize` bytes, one state byte each (see Cell). */
export interface ClusterMap {
  cellSize: number;
  cells: Uint8Array;
}

export interface Stats {
  /** Bytes the base store fetched over the network, and the base image's size. */
  baseFetched: number;
  /** Bytes of the base read from the blocks kept in this browser (OPFS) from earlier sessions. */
  baseRestored: number;
  baseSize: number;
  requests: number;
  /** Reads answered from the base store's cache vs fetched. */
  cacheHits: number;
  cacheMisses: number;
  /** Overlay file size in OPFS. */
  overlaySize: number;
  /** Guest bytes written since the last flush to OPFS. */
  unsaved: number;
  guestReads: number;
  guestWrites: number;
  bytesWritten: number;
  /** The operation in progress and for how long, when there is one. */
  busy?: { what: string; ms: number } | undefined;
}

/**
 * 'passphrase-needed': the overlay is encrypted and no passphrase was given; 'wrong-passphrase': the one given
 * opens none of its key slots; 'new-passphrase-needed': the open would create an encrypted overlay and has no
 * passphrase for it (OpenRequest.encryptNew).
 */
export type ProblemKind = 'base-changed' | 'network' | 'quota' | 'locked' | 'foreign-overlay' | 'passphrase-needed' | 'wrong-passphrase' | 'new-passphrase-needed' | 'other';

/** Events the Worker sends without being asked. */
export type WorkerEvent =
  | { event: 'stats'; stats: Stats }
  /** Cells whose state changed: pairs of (cell index, new state). */
  | { event: 'map'; changes: Uint32Array }
  | { event: 'problem'; kind: ProblemKind; message: string; retryAt?: number | undefined }
  | { event: 'problem-cleared'; kind: ProblemKind };

export type Reply = { id: number; ok: true; value: unknown } | { id: number; ok: false; kind: ProblemKind; message: string };

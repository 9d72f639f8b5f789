/**
 * The object v86 uses as a hard disk, on top of any BlockDevice (a qcow2 chain, a raw file, a Worker proxy).
 *
 * v86's contract (npm v86 0.5.462; /work/shared/guest-recipe.md): `load()` must call `onload()`; `byteLength` is
 * read once; the npm build awaits `get_and_cache(0, 512)` then reads `get_from_cache(0, 512)` synchronously for
 * the CHS geometry; `get(start, len, cb, {signal})` covers one whole ATA command and may answer late, but after
 * a device reset aborts `signal` the answer must be dropped; PIO writes hand over v86's reusable scratch buffer
 * (and complete the command before calling `set`), DMA writes complete only when the callback runs.
 *
 * Nothing here knows about IDE: requests are byte ranges with callbacks, so a virtio-blk device can use the same
 * object later.
 *
 * Writes are write-back: they are copied into a pending list and acknowledged at once while the dirty total stays
 * under `maxDirtyBytes`; beyond it, acknowledgements wait for the write-back to drain (the guest slows down
 * rather than memory growing). Pending data is written to the device in order and flushed after
 * `flushDelayMs`, when the bound is reached, or on `flush()`/`close()`. Reads see pending writes, also those
 * whose device write is still in flight, by overlaying them on what the device returns.
 */
import type { BlockDevice } from '../qcow2/device.js';

export interface DiskAdapterOptions {
  /** Dirty bytes kept before acknowledgements wait for write-back (default 8 MiB). */
  maxDirtyBytes?: number;
  /** Write-back starts this long after the first unwritten write (default 1000 ms). */
  flushDelayMs?: number;
  /** A device read, write or flush failed; the guest's command stays busy (it never sees wrong data). */
  onError?: (error: unknown) => void;
}

export interface DiskStats {
  reads: number;
  readBytes: number;
  writes: number;
  writeBytes: number;
  /** Reads answered entirely from pending writes, without the device. */
  cacheHits: number;
  /** Device calls made (reads, writes, flushes) and the time they took. */
  deviceReads: number;
  deviceWrites: number;
  deviceFlushes: number;
  storeWaitMs: number;
  /** Acknowledgements that waited because the dirty bound was reached, and the peak dirty total. */
  throttledWrites: number;
  peakDirtyBytes: number;
}

type ReadCallback = (bytes: Uint8Array) => void;

interface Pending {
  readonly start: number;
  readonly data: Uint8Array;
  readonly seq: number;
  /** 'dirty' until a write-back batch takes it; it stays in the list (for reads) until the batch is flushed. */
  state: 'dirty' | 'writing';
}

/** Counts the time spent waiting on the device; works in Node and browsers alike. */
const now = (): number => (typeof performance !== 'undefined' ? performance.now() : Date.now());

export class V86DiskAdapter {
  readonly byteLength: number;
  onload: (() => void) | undefined = undefined;
  onprogress: ((event: unknown) => void) | undefined = undefined;
  readonly stats: DiskStats = {
    reads: 0, readBytes: 0, writes: 0, writeBytes: 0, cacheHits: 0,
    deviceReads: 0, deviceWrites: 0, deviceFlushes: 0, storeWaitMs: 0, throttledWrites: 0, peakDirtyBytes: 0,
  };

  private readonly maxDirtyBytes: number;
  private readonly flushDelayMs: number;
  private readonly onError: (error: unknown) => void;
  private pending: Pending[] = [];
  private dirtyBytes = 0;
  private seq = 0;
  private mbr: Uint8Array | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  /** The running write-back (one at a time keeps device writes in guest order). */
  private writeback: Promise<void> | undefined;
  /** Acknowledgements held back by the dirty bound. */
  private throttled: Array<() => void> = [];
  private failure: unknown;
  private closed = false;
  /** Bumped by invalidate(): answers to reads started before it describe a disk that no longer exists. */
  private generation = 0;
  private readsInFlight = 0;
  private readsSettled: Array<() => void> = [];

  constructor(readonly device: BlockDevice, options: DiskAdapterOptions = {}) {
    this.byteLength = device.virtualSize;
    this.maxDirtyBytes = options.maxDirtyBytes ?? 8 * 1024 * 1024;
    this.flushDelayMs = options.flushDelayMs ?? 1000;
    this.onError = options.onError ?? ((error) => { throw error; });
  }

  // ---------------------------------------------------------------- v86's side

  load(): void {
    this.onload?.();
  }

  get(start: number, length: number, callback: ReadCallback, options?: { signal?: AbortSignal }): void {
    this.stats.reads++;
    this.stats.readBytes += length;
    const generation = this.generation;
    this.readsInFlight++;
    this.read(start, length).then(
      (bytes) => {
        this.readSettled();
        if (!options?.signal?.aborted && generation === this.generation) callback(bytes);
      },
      (error) => {
        this.readSettled();
        this.fail(error);
      },
    );
  }

  set(start: number, data: Uint8Array, callback: () => void): void {
    this.stats.writes++;
    this.stats.writeBytes += data.length;
    // PIO passes a scratch buffer v86 reuses right after this call: copy before returning.
    this.addPending(start, data.slice());
    if (this.dirtyBytes <= this.maxDirtyBytes) {
      callback();
    } else {
      this.stats.throttledWrites++;
      this.throttled.push(callback);
      this.startWriteback();
    }
  }

  get_and_cache(start: number, length: number, callback: ReadCallback): void {
    this.read(start, length).then((bytes) => {
      if (start === 0) this.mbr = bytes.slice();
      callback(bytes);
    }, (error) => this.fail(error));
  }

  get_from_cache(start: number, length: number): Uint8Array | undefined {
    return start === 0 && this.mbr && this.mbr.length >= length ? this.mbr.subarray(0, length) : undefined;
  }

  /** v86 asks for the whole image (e.g. to offer a download); a qcow2 chain is not one buffer. */
  get_buffer(callback: (buffer: ArrayBuffer | undefined) => void): void {
    callback(undefined);
  }

  /**
   * v86 embeds this in save_state(): only an identity check, never disk contents (those live in the overlay,
   * which the caller flushes and keeps alongside a saved state).
   */
  get_state(): unknown[] {
    return ['qcow86-disk', 1, this.byteLength];
  }

  set_state(state: unknown[]): void {
    if (Array.isArray(state) && state[0] === 'qcow86-disk' && state[2] !== this.byteLength) {
      throw new Error(`saved state is for a ${String(state[2])}-byte disk, this disk has ${this.byteLength} bytes`);
    }
  }

  // ---------------------------------------------------------------- the caller's side

  /** Bytes acknowledged to the guest but not yet flushed to the device. */
  get unflushedBytes(): number {
    return this.dirtyBytes;
  }

  /** Writes every acknowledged write to the device and flushes it. */
  async flush(): Promise<void> {
    while (this.pending.length > 0 || this.writeback) {
      if (this.failure) throw this.failure;
      this.startWriteback();
      await this.writeback;
    }
    if (this.failure) throw this.failure;
  }

  /**
   * Resolves once no read is in flight. Saving a machine state waits for this after stopping the CPU: a read
   * answered later would complete an ATA command in a state that was already saved, and the restored guest would
   * wait forever for it.
   */
  async settle(): Promise<void> {
    while (this.readsInFlight > 0) await new Promise<void>((resolve) => this.readsSettled.push(resolve));
  }

  /**
   * Forgets everything tied to the disk's previous contents, after the device was reverted underneath (a
   * snapshot applied): answers to reads still in flight are dropped and the cached MBR is discarded. Call it
   * with the CPU stopped and after flush(): unwritten writes would land on the reverted disk.
   */
  invalidate(): void {
    if (this.pending.length > 0 || this.writeback) {
      throw new Error(`${this.device.name}: invalidate() with ${this.dirtyBytes} unflushed bytes (flush first)`);
    }
    this.generation++;
    this.mbr = undefined;
  }

  /** Flushes, then closes the device (and its backing chain). Later requests fail. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.flush();
    this.closed = true;
    this.clearTimer();
    await this.device.close();
  }

  // ---------------------------------------------------------------- internals

  private async read(start: number, length: number): Promise<Uint8Array> {
    if (this.closed) throw new Error(`${this.device.name}: read after close`);
    const before = this.overlapping(start, length);
    if (covers(before, start, length)) {
      this.stats.cacheHits++;
      const bytes = new Uint8Array(length);
      overlay(bytes, start, before);
      return bytes;
    }
    const began = now();
    this.stats.deviceReads++;
    const bytes = await this.device.read(start, length);
    this.stats.storeWaitMs += now() - began;
    // Overlay what was pending when the read began (the device may or may not have seen it yet) and anything
    // added since, in write order: the result is what the guest wrote last.
    const after = this.overlapping(start, length);
    const all = after.length === 0 ? before : [...new Set([...before, ...after])].sort((a, b) => a.seq - b.seq);
    if (all.length === 0) return bytes;
    const out = bytes.slice();
    overlay(out, start, all);
    return out;
  }

  private readSettled(): void {
    if (--this.readsInFlight > 0) return;
    for (const resolve of this.readsSettled.splice(0)) resolve();
  }

  private overlapping(start: number, length: number): Pending[] {
    const end = start + length;
    return this.pending.filter((p) => p.start < end && p.start + p.data.length > start);
  }

  private addPending(start: number, data: Uint8Array): void {
    if (this.closed) throw new Error(`${this.device.name}: write after close`);
    const end = start + data.length;
    // A dirty extent that this write covers entirely will never be read or written again: drop it (file systems
    // rewrite their superblock and bitmaps often).
    this.pending = this.pending.filter((p) => {
      const covered = p.state === 'dirty' && p.start >= start && p.start + p.data.length <= end;
      if (covered) this.dirtyBytes -= p.data.length;
      return !covered;
    });
    this.pending.push({ start, data, seq: this.seq++, state: 'dirty' });
    this.dirtyBytes += data.length;
    this.stats.peakDirtyBytes = Math.max(this.stats.peakDirtyBytes, this.dirtyBytes);
    if (this.dirtyBytes > this.maxDirtyBytes) this.startWriteback();
    else this.armTimer();
  }

  private armTimer(): void {
    if (this.timer !== undefined || this.writeback) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.startWriteback();
    }, this.flushDelayMs);
    // In Node an idle write-back timer must not keep the process alive (flush/close are the durable points).
    (this.timer as { unref?: () => void }).unref?.();
  }

  private clearTimer(): void {
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timer = undefined;
  }

  private startWriteback(): void {
    if (this.writeback || this.failure) return;
    const batch = this.pending.filter((p) => p.state === 'dirty');
    if (batch.length === 0) return;
    this.clearTimer();
    for (const p of batch) p.state = 'writing';
    this.writeback = this.writeBatch(batch).then(
      () => {
        const done = new Set(batch);
        this.pending = this.pending.filter((p) => !done.has(p));
        for (const p of batch) this.dirtyBytes -= p.data.length;
        this.writeback = undefined;
        this.releaseThrottled();
        if (this.dirtyBytes > this.maxDirtyBytes) this.startWriteback();
        else if (this.pending.length > 0) this.armTimer();
      },
      (error) => {
        this.writeback = undefined;
        this.fail(error);
      },
    );
  }

  private async writeBatch(batch: Pending[]): Promise<void> {
    for (const run of coalesce(batch)) {
      const began = now();
      this.stats.deviceWrites++;
      await this.device.write(run.start, run.data);
      this.stats.storeWaitMs += now() - began;
    }
    const began = now();
    this.stats.deviceFlushes++;
    await this.device.flush();
    this.stats.storeWaitMs += now() - began;
  }

  private releaseThrottled(): void {
    // Release acknowledgements in order while the total is back under the bound.
    while (this.throttled.length > 0 && this.dirtyBytes <= this.maxDirtyBytes) this.throttled.shift()!();
  }

  private fail(error: unknown): void {
    this.failure ??= error;
    this.onError(error);
  }
}

/** True when the extents together cover [start, start + length). */
function covers(extents: Pending[], start: number, length: number): boolean {
  if (extents.length === 0) return false;
  const sorted = [...extents].sort((a, b) => a.start - b.start);
  let reached = start;
  for (const p of sorted) {
    if (p.start > reached) return false;
    reached = Math.max(reached, p.start + p.data.length);
    if (reached >= start + length) return true;
  }
  return reached >= start + length;
}

/** Copies extents (in the order given: later wins) into target, which holds the bytes at [start, ...). */
function overlay(target: Uint8Array, start: number, extents: Pending[]): void {
  const end = start + target.length;
  for (const p of extents) {
    const from = Math.max(start, p.start);
    const to = Math.min(end, p.start + p.data.length);
    if (from < to) target.set(p.data.subarray(from - p.start, to - p.start), from - start);
  }
}

/**
 * Merges a batch into contiguous runs (overlaps resolved in write order), so a guest's sequential 128 KiB DMA
 * writes become one device write per run rather than one each.
 */
function coalesce(batch: Pending[]): Array<{ start: number; data: Uint8Array }> {
  const byStart = [...batch].sort((a, b) => a.start - b.start || a.seq - b.seq);
  const groups: Pending[][] = [];
  let groupEnd = -1;
  for (const p of byStart) {
    const last = groups[groups.length - 1];
    // Touching extents join too: one device write instead of several.
    if (last && p.start <= groupEnd) last.push(p);
    else groups.push([p]);
    groupEnd = last && p.start <= groupEnd ? Math.max(groupEnd, p.start + p.data.length) : p.start + p.data.length;
  }
  return groups.map((group) => {
    const start = group[0]!.start;
    const end = Math.max(...group.map((p) => p.start + p.data.length));
    if (group.length === 1) return { start, data: group[0]!.data };
    const data = new Uint8Array(end - start);
    overlay(data, start, [...group].sort((a, b) => a.seq - b.seq));
    return { start, data };
  });
}

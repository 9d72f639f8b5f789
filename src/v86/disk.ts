/**
 * The disk a v86 PC sees, on top of any BlockDevice (a qcow2 chain, a raw file, a Worker proxy): v86's `hda`
 * object for the IDE bus, and the request API of our virtio-blk device (virtio-blk.ts). Both buses share one
 * write cache and one flush, so their semantics are the same.
 *
 * v86's contract (npm v86 0.5.462; ../shared/guest-recipe.md): `load()` must call `onload()`; `byteLength` is
 * read once; the npm build awaits `get_and_cache(0, 512)` then reads `get_from_cache(0, 512)` synchronously for
 * the CHS geometry; `get(start, len, cb, {signal})` covers one whole ATA command and may answer late, but after
 * a device reset aborts `signal` the answer must be dropped; PIO writes hand over v86's reusable scratch buffer
 * (and complete the command before calling `set`), DMA writes complete only when the callback runs.
 *
 * Writes are cached like a disk with a volatile write cache: copied into a pending list and acknowledged at once
 * while the dirty total stays under `maxDirtyBytes` (beyond it acknowledgements wait for the write-back to drain:
 * the guest slows down rather than memory growing). Pending data is written to the device in order and flushed
 * after `flushDelayMs`, when the bound is reached, or on a flush. A guest flush (`flushForGuest`: IDE FLUSH
 * CACHE, virtio FLUSH) completes only once every write acknowledged before it is written and the device flushed
 * (Node: fdatasync; browser: the OPFS handle flushed), so nothing acknowledged before a flush can land after it.
 * With `writeThrough` every write is acknowledged only once durable (no cache at all; the benchmark's peer).
 *
 * Reads see pending writes, also those whose device write is still in flight, by overlaying them on what the
 * device returns. Zero writes and discards wait in the same list, in order with the writes around them.
 */
import type { BlockDevice } from '../qcow2/device.js';

export interface DiskAdapterOptions {
  /** Dirty bytes kept before acknowledgements wait for write-back (default 8 MiB). */
  maxDirtyBytes?: number;
  /** Write-back starts this long after the first unwritten write (default 1000 ms). */
  flushDelayMs?: number;
  /** Acknowledge each write only once it is durable (a write-through disk; default false: write-back). */
  writeThrough?: boolean;
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
  /** Flushes the guest asked for (and completed), zero writes and discards it sent. */
  guestFlushes: number;
  zeroWrites: number;
  discards: number;
}

type ReadCallback = (bytes: Uint8Array) => void;

interface Pending {
  readonly start: number;
  readonly length: number;
  /** 'data' carries bytes; 'zeroes' reads as zeros; 'discard' reads as whatever the device makes of it. */
  readonly kind: 'data' | 'zeroes' | 'discard';
  readonly data: Uint8Array | undefined;
  /** zeroes: the device may give the range's host clusters back. */
  readonly unmap: boolean;
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
    guestFlushes: 0, zeroWrites: 0, discards: 0,
  };

  private readonly maxDirtyBytes: number;
  private readonly flushDelayMs: number;
  private readonly writeThrough: boolean;
  private readonly onError: (error: unknown) => void;
  private pending: Pending[] = [];
  /** Bytes of pending data (memory held); zero writes and discards hold none. */
  private dirtyBytes = 0;
  /** Bytes covered by pending zero writes and discards (not durable yet, but no memory). */
  private rangeBytes = 0;
  private seq = 0;
  private mbr: Uint8Array | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  /** The running write-back (one at a time keeps device writes in guest order). */
  private writeback: Promise<void> | undefined;
  /** Acknowledgements held back by the dirty bound. */
  private throttled: Array<() => void> = [];
  private failure: unknown;
  private closed = false;
  /** Bumped by invalidate(): answers to requests started before it describe a disk that no longer exists. */
  private generation = 0;
  /** Guest requests whose answer is still to come (reads, flushes, write-through writes): settle() waits. */
  private inFlight = 0;
  private settled: Array<() => void> = [];

  constructor(readonly device: BlockDevice, options: DiskAdapterOptions = {}) {
    this.byteLength = device.virtualSize;
    this.maxDirtyBytes = options.maxDirtyBytes ?? 8 * 1024 * 1024;
    this.flushDelayMs = options.flushDelayMs ?? 1000;
    this.writeThrough = options.writeThrough ?? false;
    this.onError = options.onError ?? ((error) => { throw error; });
  }

  /** The device refuses writes: a virtio guest is told so (RO) and its writes fail without reaching the cache. */
  get readOnly(): boolean {
    return this.device.readOnly;
  }

  // ---------------------------------------------------------------- v86's IDE side

  load(): void {
    this.onload?.();
  }

  get(start: number, length: number, callback: ReadCallback, options?: { signal?: AbortSignal }): void {
    const generation = this.generation;
    this.guestRead(start, length).then(
      (bytes) => {
        if (!options?.signal?.aborted && generation === this.generation) callback(bytes);
      },
      (error) => this.fail(error),
    );
  }

  set(start: number, data: Uint8Array, callback: () => void): void {
    // PIO passes a scratch buffer v86 reuses right after this call: copy before returning.
    this.acknowledge(this.addWrite(start, data.slice()), callback);
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

  // ---------------------------------------------------------------- requests (the virtio device, the IDE hooks)

  /** A guest read; answers to reads made before invalidate() never come (the promise stays pending). */
  guestRead(start: number, length: number): Promise<Uint8Array> {
    this.stats.reads++;
    this.stats.readBytes += length;
    const generation = this.generation;
    return this.track(this.read(start, length), generation);
  }

  /** A guest write of bytes the caller gives up (not copied); resolves when the guest may be told it is done. */
  guestWrite(start: number, data: Uint8Array): Promise<void> {
    return new Promise((resolve) => this.acknowledge(this.addWrite(start, data), resolve));
  }

  /** Makes the range read as zeros, in order with the writes around it (virtio WRITE_ZEROES). */
  guestWriteZeroes(start: number, length: number, unmap: boolean): Promise<void> {
    this.stats.zeroWrites++;
    return new Promise((resolve) => this.acknowledge(this.addRange(start, length, 'zeroes', unmap), resolve));
  }

  /** Gives the range back (virtio DISCARD); whole clusters read as zeros afterwards. */
  guestDiscard(start: number, length: number): Promise<void> {
    this.stats.discards++;
    return new Promise((resolve) => this.acknowledge(this.addRange(start, length, 'discard', true), resolve));
  }

  /**
   * The guest's flush (ATA FLUSH CACHE, virtio FLUSH): resolves once every write acknowledged before it is
   * durable. settle() waits for it, so a machine state is never saved with a flush half done.
   */
  flushForGuest(): Promise<void> {
    const generation = this.generation;
    return this.track(this.flush().then(() => void this.stats.guestFlushes++), generation);
  }

  // ---------------------------------------------------------------- the caller's side

  /** Bytes acknowledged to the guest but not yet durable on the device (zeroed and discarded ranges included). */
  get unflushedBytes(): number {
    return this.dirtyBytes + this.rangeBytes;
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
   * Resolves once no guest request is waiting for its answer (reads, guest flushes, write-through writes).
   * Saving a machine state waits for this after stopping the CPU: an answer arriving later would complete a
   * command in a state that was already saved, and the restored guest would wait forever for it.
   */
  async settle(): Promise<void> {
    while (this.inFlight > 0) {
      await new Promise<void>((resolve) => this.settled.push(resolve));
      // Let the answers' own promise chains (a device writing guest memory, raising its interrupt) run out.
      await new Promise((resolve) => setTimeout(resolve, 0));
    }
  }

  /**
   * Forgets everything tied to the disk's previous contents, after the device was reverted underneath (a
   * snapshot applied): answers to requests still in flight are dropped and the cached MBR is discarded. Call it
   * with the CPU stopped and after flush(): unwritten writes would land on the reverted disk.
   */
  invalidate(): void {
    if (this.pending.length > 0 || this.writeback) {
      throw new Error(`${this.device.name}: invalidate() with ${this.unflushedBytes} unflushed bytes (flush first)`);
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

  /**
   * Counts a request until it settles. Its answer is dropped (never resolves) when invalidate() came in
   * between; a device failure is reported through onError and leaves the request unanswered too.
   */
  private track<T>(work: Promise<T>, generation: number): Promise<T> {
    this.inFlight++;
    return new Promise<T>((resolve) => {
      work.then(
        (value) => {
          // Answer first: the guest's command completes before settle() lets a state be saved.
          if (generation === this.generation) resolve(value);
          this.requestSettled();
        },
        (error) => {
          this.requestSettled();
          this.fail(error);
        },
      );
    });
  }

  private requestSettled(): void {
    if (--this.inFlight > 0) return;
    for (const resolve of this.settled.splice(0)) resolve();
  }

  /** Tells the guest a write (or zero write, discard) is done: at once, once under the bound, or once durable. */
  private acknowledge(entry: Pending, callback: () => void): void {
    if (this.writeThrough) {
      void this.track(this.flush(), this.generation).then(callback);
    } else if (this.dirtyBytes <= this.maxDirtyBytes) {
      callback();
    } else {
      this.stats.throttledWrites++;
      this.throttled.push(callback);
      this.startWriteback();
    }
    if (entry.kind !== 'data') this.startWriteback();
  }

  private async read(start: number, length: number): Promise<Uint8Array> {
    for (;;) {
      if (this.closed) throw new Error(`${this.device.name}: read after close`);
      const before = this.overlapping(start, length);
      // What a discard leaves behind is the device's to say: apply it before reading over it.
      if (before.some((p) => p.kind === 'discard')) {
        this.startWriteback();
        await this.writeback;
        if (this.failure) throw this.failure;
        continue;
      }
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
      if (after.some((p) => p.kind === 'discard' && !before.includes(p))) continue;
      const all = after.length === 0 ? before : [...new Set([...before, ...after])].sort((a, b) => a.seq - b.seq);
      if (all.length === 0) return bytes;
      const out = bytes.slice();
      overlay(out, start, all);
      return out;
    }
  }

  private overlapping(start: number, length: number): Pending[] {
    const end = start + length;
    return this.pending.filter((p) => p.start < end && p.start + p.length > start);
  }

  private addWrite(start: number, data: Uint8Array): Pending {
    this.stats.writes++;
    this.stats.writeBytes += data.length;
    return this.addPending({ start, length: data.length, kind: 'data', data, unmap: false, seq: this.seq++, state: 'dirty' });
  }

  private addRange(start: number, length: number, kind: 'zeroes' | 'discard', unmap: boolean): Pending {
    return this.addPending({ start, length, kind, data: undefined, unmap, seq: this.seq++, state: 'dirty' });
  }

  private addPending(entry: Pending): Pending {
    if (this.closed) throw new Error(`${this.device.name}: write after close`);
    const end = entry.start + entry.length;
    // A dirty extent that a data or zero write covers entirely will never be read or written again: drop it (file
    // systems rewrite their superblock and bitmaps often). A discard replaces nothing: it says too little.
    if (entry.kind !== 'discard') {
      this.pending = this.pending.filter((p) => {
        const covered = p.state === 'dirty' && p.start >= entry.start && p.start + p.length <= end;
        if (covered) this.forget(p);
        return !covered;
      });
    }
    this.pending.push(entry);
    if (entry.kind === 'data') this.dirtyBytes += entry.length;
    else this.rangeBytes += entry.length;
    this.stats.peakDirtyBytes = Math.max(this.stats.peakDirtyBytes, this.dirtyBytes);
    if (this.dirtyBytes > this.maxDirtyBytes) this.startWriteback();
    else this.armTimer();
    return entry;
  }

  private forget(p: Pending): void {
    if (p.kind === 'data') this.dirtyBytes -= p.length;
    else this.rangeBytes -= p.length;
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
        for (const p of batch) this.forget(p);
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
    for (const op of plan(batch)) {
      const began = now();
      this.stats.deviceWrites++;
      if (op.kind === 'data') await this.device.write(op.start, op.data!);
      else if (op.kind === 'zeroes') await this.zeroes(op.start, op.length, op.unmap);
      else if (this.device.discard) await this.device.discard(op.start, op.length);
      this.stats.storeWaitMs += now() - began;
    }
    const began = now();
    this.stats.deviceFlushes++;
    await this.device.flush();
    this.stats.storeWaitMs += now() - began;
  }

  private async zeroes(start: number, length: number, unmap: boolean): Promise<void> {
    if (this.device.writeZeroes) return this.device.writeZeroes(start, length, { unmap });
    const chunk = 1024 * 1024;
    for (let at = start; at < start + length; at += chunk) await this.device.write(at, new Uint8Array(Math.min(chunk, start + length - at)));
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
    reached = Math.max(reached, p.start + p.length);
    if (reached >= start + length) return true;
  }
  return reached >= start + length;
}

/**
 * Copies extents (in the order given: later wins) into target, which holds the bytes at [start, ...). Zero writes
 * copy zeros; discards are never overlaid (reads wait for them to reach the device).
 */
function overlay(target: Uint8Array, start: number, extents: Pending[]): void {
  const end = start + target.length;
  for (const p of extents) {
    const from = Math.max(start, p.start);
    const to = Math.min(end, p.start + p.length);
    if (from >= to) continue;
    if (p.kind === 'data') target.set(p.data!.subarray(from - p.start, to - p.start), from - start);
    else if (p.kind === 'zeroes') target.fill(0, from - start, to - start);
  }
}

type Op = { kind: Pending['kind']; start: number; length: number; data?: Uint8Array; unmap: boolean };

/**
 * The device calls for a batch. Extents that overlap or touch form groups (groups are disjoint, so their order
 * does not matter). A group of data writes becomes one device write (a guest's sequential 128 KiB DMA writes:
 * one write per run instead of one each); a group holding a zero write or a discard is replayed in guest order.
 */
function plan(batch: Pending[]): Op[] {
  const byStart = [...batch].sort((a, b) => a.start - b.start || a.seq - b.seq);
  const groups: Pending[][] = [];
  let groupEnd = -1;
  for (const p of byStart) {
    const last = groups[groups.length - 1];
    if (last && p.start <= groupEnd) {
      last.push(p);
      groupEnd = Math.max(groupEnd, p.start + p.length);
    } else {
      groups.push([p]);
      groupEnd = p.start + p.length;
    }
  }
  return groups.flatMap((group): Op[] => {
    if (group.some((p) => p.kind !== 'data')) return [...group].sort((a, b) => a.seq - b.seq).map((p) => ({ ...p }));
    const start = group[0]!.start;
    if (group.length === 1) return [{ kind: 'data', start, length: group[0]!.length, data: group[0]!.data!, unmap: false }];
    const end = Math.max(...group.map((p) => p.start + p.length));
    const data = new Uint8Array(end - start);
    overlay(data, start, [...group].sort((a, b) => a.seq - b.seq));
    return [{ kind: 'data', start, length: data.length, data, unmap: false }];
  });
}

/**
 * Worker threads for CPU-bound cluster work in Node - encryption, decryption, compression - as qemu-img uses a
 * thread pool for the same work. Results are the same bytes the calling thread would compute (the same code on
 * the same OpenSSL and zlib), and callers place them in their own order, so output stays deterministic.
 *
 * One worker per core (at most 4), started on first use and not keeping the process alive while idle. A run of
 * sectors bigger than one piece is cut into sector-aligned pieces spread over the workers. Bytes travel as
 * transferred copies: the caller's buffer is never handed away.
 */
import { Worker } from 'node:worker_threads';
import { existsSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import type { CipherSpec } from '../qcow2/crypto.js';

/** A run of sectors is cut into pieces of at least this size, one per worker. */
const MIN_PIECE = 256 * 1024;
const SECTOR = 512;

type Job = { op: 'encrypt' | 'decrypt'; spec: CipherSpec; key: Uint8Array; data: Uint8Array; sector: number } | { op: 'deflate' | 'zstd'; data: Uint8Array };
export type WorkerRequest = Job & { id: number };

export type WorkerReply = { id: number; data: Uint8Array } | { id: number; error: string };

interface Pending {
  resolve(data: Uint8Array): void;
  reject(error: Error): void;
}

class WorkerSlot {
  readonly pending = new Map<number, Pending>();
  constructor(readonly worker: Worker) {}
}

export class ClusterWorkers {
  private readonly slots: WorkerSlot[] = [];
  private nextId = 1;
  private failure: Error | undefined;

  constructor(
    private readonly script: URL,
    readonly size: number,
  ) {}

  /**
   * Encrypts or decrypts a run of sectors, each piece's result copied into `into` (which may be `data`: decryption
   * in place) as it arrives. Decryption in place of shared memory (a SharedArrayBuffer, as convert's buffers are)
   * copies nothing: the workers decrypt the caller's bytes where they lie.
   */
  async cipher(op: 'encrypt' | 'decrypt', spec: CipherSpec, key: Uint8Array, data: Uint8Array, sector: number, into: Uint8Array): Promise<void> {
    const inPlace = op === 'decrypt' && into === data && data.buffer instanceof SharedArrayBuffer;
    const pieceCount = Math.max(1, Math.min(this.size, Math.floor(data.length / MIN_PIECE)));
    const pieceBytes = Math.ceil(data.length / pieceCount / SECTOR) * SECTOR;
    const jobs: Promise<void>[] = [];
    for (let at = 0; at < data.length; at += pieceBytes) {
      const piece = data.subarray(at, Math.min(data.length, at + pieceBytes));
      const sent = inPlace ? piece : copyOf(piece);
      jobs.push(
        this.run({ op, spec, key, data: sent, sector: sector + at / SECTOR }).then((result) => {
          // Shared memory in place: the bytes are already where the caller wants them.
          if (!inPlace) into.set(result, at);
        }),
      );
    }
    await Promise.all(jobs);
  }

  /** Raw deflate (QEMU's settings) or zstd of one cluster, on a worker. */
  compress(op: 'deflate' | 'zstd', data: Uint8Array): Promise<Uint8Array> {
    return this.run({ op, data: copyOf(data) });
  }

  private run(request: Job): Promise<Uint8Array> {
    if (this.failure) return Promise.reject(this.failure);
    const slot = this.leastBusy();
    const id = this.nextId++;
    return new Promise<Uint8Array>((resolve, reject) => {
      if (slot.pending.size === 0) slot.worker.ref();
      slot.pending.set(id, { resolve, reject });
      // Shared memory is shared, not transferred; anything else is a copy of the caller's made for the trip.
      const buffer = request.data.buffer;
      slot.worker.postMessage({ ...request, id }, buffer instanceof SharedArrayBuffer ? [] : [buffer]);
    });
  }

  private leastBusy(): WorkerSlot {
    if (this.slots.length < this.size && this.slots.every((slot) => slot.pending.size > 0)) this.slots.push(this.start());
    let best = this.slots[0]!;
    for (const slot of this.slots) if (slot.pending.size < best.pending.size) best = slot;
    return best;
  }

  private start(): WorkerSlot {
    // Not the parent's --input-type (a CLI started with -e has it), which a worker file refuses.
    const worker = new Worker(fileURLToPath(this.script), { execArgv: process.execArgv.filter((arg) => !arg.startsWith('--input-type')) });
    const slot = new WorkerSlot(worker);
    worker.unref();
    worker.on('message', (reply: WorkerReply) => {
      const job = slot.pending.get(reply.id);
      if (!job) return;
      slot.pending.delete(reply.id);
      if (slot.pending.size === 0) worker.unref();
      if ('error' in reply) job.reject(new Error(reply.error));
      else job.resolve(reply.data);
    });
    const fail = (error: Error) => {
      this.failure = new Error(`cluster worker failed: ${error.message}`);
      for (const job of slot.pending.values()) job.reject(this.failure);
      slot.pending.clear();
    };
    worker.on('error', fail);
    worker.on('exit', (code) => {
      if (slot.pending.size) fail(new Error(`exited with code ${code}`));
    });
    return slot;
  }
}

/** A copy in an ArrayBuffer of its own (Buffer#slice would share memory, and the copy is transferred). */
function copyOf(data: Uint8Array): Uint8Array {
  return new Uint8Array(data);
}

let shared: ClusterWorkers | null | undefined;

/**
 * The process's worker pool, or undefined where there is none: no compiled worker script next to this module (the
 * TypeScript sources run directly under a test runner), QCOW86_WORKERS=0, or a single core. QCOW86_WORKERS=N asks
 * for N workers; otherwise one per core (at most 4), whatever else the machine is doing, as qemu-img's thread pool
 * does: deciding by the load average made a run's speed depend on what ran in the minute before it (the 256 MiB
 * convert -c bench: 0.62 of qemu-img's time with workers, 0.82 when a load of 2.1 left over from the previous
 * bench switched them off), and on a busy machine workers cost nothing measurable now that convert decrypts in
 * place (256 MiB of LUKS data at load 8: 0.77-1.24 s in one thread, 0.82-1.14 s with two workers).
 */
export function clusterWorkers(): ClusterWorkers | undefined {
  if (shared !== undefined) return shared ?? undefined;
  const cores = availableParallelism();
  const wanted = process.env.QCOW86_WORKERS !== undefined ? Number(process.env.QCOW86_WORKERS) : cores >= 2 ? Math.min(4, cores) : 0;
  const script = new URL('./cluster-worker.js', import.meta.url);
  shared = wanted >= 1 && script.protocol === 'file:' && existsSync(fileURLToPath(script)) ? new ClusterWorkers(script, Math.floor(wanted)) : null;
  return shared ?? undefined;
}

/**
 * `qcow86 convert [-f FMT] [-O raw] [-l SNAPSHOT] [-p] SRC DST`: qemu-img convert to raw. The output is sparse
 * like qemu-img's: it is truncated to the disk size, ranges the chain reports as zero or unallocated are never
 * read or written, and data blocks that turn out all-zero (4 KiB granularity, qemu-img's default -S) are
 * skipped. Reads go in large chunks, several ahead of the one write in flight.
 *
 * Output formats are targets (ConvertTarget): qcow2 output is a second target behind the same copy loop.
 */
import { parseArgs } from 'node:util';
import { close, ftruncate, open, writeSync } from 'node:fs';
import { failed, writeAll } from '../../io/file.js';
import { withOutputLocks } from '../../io/lock.js';
import type { BlockDevice } from '../../qcow2/device.js';
import type { ByteStore } from '../../qcow2/store.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { QcowV1Image } from '../../qcow2/qcow1.js';
import { RawImage } from '../../qcow2/raw.js';
import { blockStatus, type HoleProbe } from '../../qcow2/block-status.js';
import { FormatError } from '../../qcow2/errors.js';
import { isZero } from '../../qcow2/bytes.js';
import { openPath, parseFormat } from '../open-image.js';
import { usageError } from '../usage.js';
import { SECRET_OPTIONS, SECRET_USAGE, imageArgumentOf } from '../image-spec.js';

export const USAGE = `usage: qcow86 convert [-f raw|qcow2|qcow] ${SECRET_USAGE} [-O raw] [-l SNAPSHOT] [-p] [-q] [-U] SRC DST`;

/**
 * Bytes per read request (a multiple of every cluster size), and how many chunks are read or written at once.
 * Small on purpose: every page of a fresh buffer is faulted in once, which in a VM costs more than the reads
 * into it (the first read into a new 1 MiB buffer took 3-7 ms, later ones 0.2-0.3 ms), while 1 MiB requests
 * already make the per-request cost small (2 MiB x 6 buffers measured no faster, 256 KiB slower).
 */
export const CHUNK = 1024 * 1024;
const BUFFERS = 4;
/**
 * Writes issued at once, in disk order. The kernel runs buffered writes to one file one at a time anyway (the
 * inode lock); the second one waits there and starts the moment the first ends, instead of after a round trip
 * through the event loop (about 10 ms less per 256 MiB bench run).
 */
const WRITES = 2;
/** qemu-img's default minimum sparse run (-S 4k): zero runs at least this long become holes. */
const SPARSE_BLOCK = 4096;
/** Block status is asked about at most this much at a time, as qemu-img does. */
const STATUS_LIMIT = 2 ** 30;

/** Where converted bytes go. The target starts out reading as zeros over `size` bytes. */
export interface ConvertTarget {
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Optional: the same write, done before returning (a local file). */
  writeSync?(offset: number, data: Uint8Array): void;
  /** Called once, after every write completed. */
  finish(): Promise<void>;
  /** Called on failure instead of finish. */
  abort(): Promise<void>;
}

/** True when a convert command line asks for qcow2 output (handed over to src/node/convert-qcow2.ts). */
export function wantsQcow2(args: readonly string[]): boolean {
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '-O' && args[i + 1] === 'qcow2') return true;
    if (args[i] === '-Oqcow2' || args[i] === '--output-format=qcow2') return true;
  }
  return false;
}

export async function run(args: string[]): Promise<number> {
  // qcow2 output lives in its own module, loaded only for it (src/node/convert-qcow2.ts) with its own options.
  if (wantsQcow2(args)) return (await import('../convert-qcow2.js')).run(args);
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      format: { type: 'string', short: 'f' },
      'output-format': { type: 'string', short: 'O', default: 'raw' },
      snapshot: { type: 'string', short: 'l' },
      progress: { type: 'boolean', short: 'p', default: false },
      quiet: { type: 'boolean', short: 'q', default: false },
      'force-share': { type: 'boolean', short: 'U', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      ...SECRET_OPTIONS,
    },
  });
  if (values.help) return console.log(USAGE), 0;
  if (positionals.length !== 2) return usageError('convert', 'expecting a source and a destination file name', USAGE);
  const outputFormat = parseFormat(values['output-format'], '-O');
  if (outputFormat !== 'raw') return usageError('convert', `output format '${outputFormat}' is not supported yet (raw only)`, USAGE);
  const [src, dst] = positionals as [string, string];
  const source = await imageArgumentOf(src, values);
  const image = await openPath(source.path, source.open);
  try {
    const device = values.snapshot === undefined ? image : await snapshotOf(image, values.snapshot);
    // The destination's lock is taken before it is truncated and held until the copy is done.
    await withOutputLocks([dst], async () => {
      const target = await RawTarget.create(dst, device.virtualSize);
      const progress = values.progress && !values.quiet ? progressPrinter() : undefined;
      try {
        await copyDevice(device, target, progress);
      } catch (error) {
        await target.abort();
        throw error;
      }
      await target.finish();
      progress?.(1, true);
    });
    return 0;
  } finally {
    await image.close();
  }
}

/**
 * The snapshot's contents at the image's CURRENT size, as qemu-img convert -l gives them (QEMU swaps in the
 * snapshot's L1 table but keeps the disk size): past the snapshot's own disk end, the backing file or zeros.
 */
async function snapshotOf(image: BlockDevice, idOrName: string): Promise<BlockDevice> {
  if (!(image instanceof Qcow2Image)) throw new FormatError(image.name, `only qcow2 images have internal snapshots (-l ${idOrName})`);
  const view = await image.openSnapshot(idOrName);
  const size = image.virtualSize;
  return {
    name: view.name,
    format: view.format,
    readOnly: true,
    virtualSize: size,
    async read(offset: number, length: number): Promise<Uint8Array> {
      const out = new Uint8Array(length);
      const inView = Math.max(0, Math.min(offset + length, view.virtualSize) - offset);
      if (inView > 0) out.set(await view.read(offset, inView), 0);
      const from = offset + inView;
      const backing = image.backing;
      const fromBacking = backing ? Math.max(0, Math.min(offset + length, backing.virtualSize) - from) : 0;
      if (backing && fromBacking > 0) out.set(await backing.read(from, fromBacking), inView);
      return out;
    },
    write: view.write.bind(view),
    flush: async () => {},
    close: async () => {},
  };
}

/**
 * Copies every non-zero block of `source` into `target`. Ranges whose bytes lie uncompressed in a local file
 * (block status names the file and offset, and the file store can read synchronously) are copied on the spot
 * with blocking reads and writes: this process has nothing else to do, and a blocking pread/pwrite pair costs a
 * fraction of a threadpool round trip each way (256 MiB bench: a 45 ms copy instead of 125 ms). Everything else
 * (compressed clusters, snapshot views, stores that cannot block) goes through the engine as a pipeline: up to
 * BUFFERS chunks are being read (and decompressed) ahead while the oldest are written, at most WRITES at a time,
 * in disk order as qemu-img's writes are (each chunk's write waits for the one WRITES chunks back; chunks never
 * overlap). Buffers are allocated once and reused, so memory stays bounded and is page-faulted in only once;
 * they are shared memory, so worker threads decrypt them in place (no copy to a worker and back).
 */
export async function copyDevice(source: BlockDevice, target: ConvertTarget, progress?: (fraction: number) => void): Promise<void> {
  const size = source.virtualSize;
  const spare: Uint8Array[] = [];
  let direct: Uint8Array | undefined;
  /** One entry per chunk read or being written, oldest first; each settles when its buffer is free again. */
  const busy: Promise<void>[] = [];
  let done = 0;
  try {
    for await (const { offset, length, copy, from } of dataRangesOf(source)) {
      if (!copy) {
        done += length;
        progress?.(done / size);
        continue;
      }
      if (from?.store.readIntoSync && target.writeSync) {
        direct ??= new Uint8Array(CHUNK);
        const data = direct.subarray(0, length);
        const got = from.store.readIntoSync(from.offset, data);
        // Data clusters past the end of their file read as zeros, as in the engine's reads.
        if (got < length) data.fill(0, got);
        const runs = nonZeroRuns(offset, data);
        for (let i = 0; i < runs.length; i += 2) target.writeSync(offset + runs[i]!, data.subarray(runs[i]!, runs[i + 1]!));
        done += length;
        progress?.(done / size);
        continue;
      }
      if (busy.length === BUFFERS) await busy.shift();
      const buffer = spare.pop() ?? new Uint8Array(new SharedArrayBuffer(CHUNK));
      const data = buffer.subarray(0, length);
      const read = source.readInto ? source.readInto(offset, data).then(() => data) : source.read(offset, length);
      // At most WRITES writes under way: this one waits for the one WRITES chunks back.
      const after = busy.length >= WRITES ? busy[busy.length - WRITES]! : undefined;
      const written = Promise.all([read, after]).then(async ([bytes]) => {
        await writeNonZero(target, offset, bytes);
        spare.push(buffer);
        done += length;
        progress?.(done / size);
      });
      // Its failure surfaces through the next chunk or the final await; until then it must not count as unhandled.
      written.catch(() => {});
      busy.push(written);
    }
    await Promise.all(busy);
  } catch (error) {
    // Nothing may still be reading or writing when the caller closes the files.
    await Promise.allSettled(busy);
    throw error;
  }
}

/** A chunk of the disk: whether it must be read (`copy`), and where its bytes lie when block status knows. */
interface CopyRange {
  offset: number;
  length: number;
  copy: boolean;
  from?: { store: ByteStore; offset: number };
}

/**
 * The disk cut into chunks of at most CHUNK bytes, each marked whether it must be read (`copy`) or is known to
 * read as zeros. Pulled as the copy goes, so block status is only asked as far as the copy got.
 */
async function* dataRangesOf(source: BlockDevice): AsyncGenerator<CopyRange> {
  const size = source.virtualSize;
  // Snapshot views and foreign devices have no block status: everything is read (zero blocks still skipped).
  const hasStatus = source instanceof Qcow2Image || source instanceof QcowV1Image || source instanceof RawImage;
  // Raw layers are read, not probed for holes: the zero-block check after reading finds them anyway.
  const options = { holeProbe: noHoles };
  let at = 0;
  while (at < size) {
    const status: { length: number; zero: boolean; data?: boolean; offset?: number; store?: ByteStore } = hasStatus
      ? await blockStatus(source, at, Math.min(STATUS_LIMIT, size - at), options)
      : { length: size - at, zero: false };
    const end = at + status.length;
    if (status.zero) {
      yield { offset: at, length: status.length, copy: false };
    } else {
      // Chunks aligned to CHUNK keep reads on cluster boundaries.
      for (let chunk = at; chunk < end; ) {
        const chunkEnd = Math.min(end, (Math.floor(chunk / CHUNK) + 1) * CHUNK);
        const where = status.data && status.store && status.offset !== undefined ? { store: status.store, offset: status.offset + (chunk - at) } : undefined;
        yield { offset: chunk, length: chunkEnd - chunk, copy: true, ...(where ? { from: where } : {}) };
        chunk = chunkEnd;
      }
    }
    at = end;
  }
}

export const noHoles: HoleProbe = async (_store, _offset, length) => ({ hole: false, length });

/** Writes the runs of `data` that are not all-zero 4 KiB blocks (aligned to the disk), each as one write, in order. */
async function writeNonZero(target: ConvertTarget, offset: number, data: Uint8Array): Promise<void> {
  const runs = nonZeroRuns(offset, data);
  for (let i = 0; i < runs.length; i += 2) {
    const start = runs[i]!;
    const end = runs[i + 1]!;
    await target.write(offset + start, start === 0 && end === data.length ? data : data.subarray(start, end));
  }
}

/**
 * The runs of `data` (at disk offset `offset`) that are not all-zero 4 KiB blocks, as start, end pairs. Kept
 * apart from the writing: a small synchronous loop is what the JIT optimises cheaply, where the same loop inside
 * an async function cost tens of milliseconds of compilation in a short CLI run.
 */
function nonZeroRuns(offset: number, data: Uint8Array): number[] {
  // One word view for the whole chunk: a view per 4 KiB block costs more than checking the block.
  const words = (data.byteOffset & 3) === 0 ? new Uint32Array(data.buffer, data.byteOffset, data.length >>> 2) : undefined;
  const runs: number[] = [];
  const length = data.length;
  let runStart = -1;
  let at = 0;
  // Blocks are aligned to the disk, so the first one may be partial.
  let blockEnd = Math.min(length, SPARSE_BLOCK - (offset % SPARSE_BLOCK));
  while (at < length) {
    // Most data blocks start with a non-zero byte: those cost one load, no call.
    const zero = data[at] === 0 && isZeroBlock(data, words, at, blockEnd);
    if (!zero && runStart < 0) runStart = at;
    if (zero && runStart >= 0) {
      runs.push(runStart, at);
      runStart = -1;
    }
    at = blockEnd;
    blockEnd = Math.min(length, blockEnd + SPARSE_BLOCK);
  }
  if (runStart >= 0) runs.push(runStart, length);
  return runs;
}

/** True when data[start, end) is all zero; `words` is a Uint32Array over all of `data` when it is aligned. */
function isZeroBlock(data: Uint8Array, words: Uint32Array | undefined, start: number, end: number): boolean {
  if (words && (start & 3) === 0 && (end & 3) === 0) {
    for (let i = start >>> 2, last = end >>> 2; i < last; i++) if (words[i] !== 0) return false;
    return true;
  }
  return isZero(data.subarray(start, end));
}

/** A raw output file: created (or truncated) and sized up front, so skipped ranges stay holes. */
export class RawTarget implements ConvertTarget {
  private constructor(
    readonly path: string,
    private readonly fd: number,
  ) {}

  static async create(path: string, size: number): Promise<RawTarget> {
    // Created and sized through one descriptor, written through another, as qemu-img does (its create step, then
    // the open for the copy). On ext4, closing a descriptor that truncated a non-empty file to 0 starts writeback
    // of everything written through it (auto_da_alloc, meant for programs that rewrite a file in place without
    // fsync): closing the creating descriptor while the file is still empty makes that free, where closing after
    // the copy flushed the whole output on our time and left the next truncation of it waiting for the disk.
    const created = await openFd(path, 'w');
    try {
      await new Promise<void>((resolve, reject) => ftruncate(created, size, (error) => (error ? reject(error) : resolve())));
    } finally {
      await closeFd(created);
    }
    return new RawTarget(path, await openFd(path, 'r+'));
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return writeAll(this.fd, data, offset).catch((error: unknown) => {
      throw failed(this.path, `writing ${data.length} bytes at offset ${offset}`, error);
    });
  }

  writeSync(offset: number, data: Uint8Array): void {
    try {
      for (let done = 0; done < data.length; ) done += writeSync(this.fd, data, done, data.length - done, offset + done);
    } catch (error) {
      throw failed(this.path, `writing ${data.length} bytes at offset ${offset}`, error);
    }
  }

  async finish(): Promise<void> {
    // No fsync: qemu-img convert does not sync its output either (it runs with cache=unsafe), and on a busy
    // disk a sync costs more than the whole conversion.
    await closeFd(this.fd);
  }

  async abort(): Promise<void> {
    await closeFd(this.fd);
  }
}

function openFd(path: string, flags: string): Promise<number> {
  return new Promise((resolve, reject) => open(path, flags, (error, fd) => (error ? reject(error) : resolve(fd))));
}

function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => close(fd, (error) => (error ? reject(error) : resolve())));
}

/**
 * qemu-img's progress output: "    (12.34/100%)\r" on stdout (whether or not it is a terminal), starting at
 * 0.00 and ending with 100.00 and a newline.
 */
export function progressPrinter(): (fraction: number, last?: boolean) => void {
  let shown = 0;
  process.stdout.write('    (0.00/100%)\r');
  return (fraction, last = false) => {
    const percent = Math.floor(fraction * 10000) / 100;
    if (percent === shown && !last) return;
    shown = percent;
    process.stdout.write(`    (${percent.toFixed(2)}/100%)\r${last ? '\n' : ''}`);
  };
}

/**
 * `qcow86 convert -O qcow2 [-c] [-o OPTIONS] [-B BACKING [-F FMT]] [-f FMT] SRC DST`: the qcow2 output side of
 * convert. The output is created with the same layout qemu-img create gives it, then filled cluster by
 * cluster in guest order: clusters that read as zero are never written (a fresh image reads as zeros), so sizes
 * track qemu-img's; with -c every other cluster goes through the engine's compressed write. With -B the output
 * gets that backing file and only clusters whose contents differ from it are written.
 */
import { parseArgs } from 'node:util';
import { FileStore, nodeCodecs, nodeResolver } from '../io/node.js';
import { openImage } from '../qcow2/open.js';
import { withNewQcow2 } from './create-image.js';
import { Qcow2Image } from '../qcow2/image.js';
import { QcowV1Image } from '../qcow2/qcow1.js';
import { RawImage } from '../qcow2/raw.js';
import { blockStatus } from '../qcow2/block-status.js';
import { isZero } from '../qcow2/bytes.js';
import type { BlockDevice } from '../qcow2/device.js';
import { openPath, parseFormat } from './open-image.js';
import { encryptionRequest, parseOptionList, qcow2Options } from './image-options.js';
import { SECRET_OPTIONS, SECRET_USAGE, Secrets, imageArgument } from './image-spec.js';
import { nodeCrypto } from '../io/node-crypto.js';
import { usageError } from './usage.js';
import { FormatError } from '../qcow2/errors.js';
import { progressPrinter } from './commands/convert.js';

export const USAGE = `usage: qcow86 convert -O qcow2 [-c] [-o OPTIONS] [-B BACKING [-F FMT]] [-f FMT] ${SECRET_USAGE} [-l SNAPSHOT] [-p] [-q] SRC DST`;

/** Guest bytes read per step (a multiple of every cluster size). */
const BATCH = 4 * 1024 * 1024;
/** Block status is asked about at most this much at a time, as qemu-img does. */
const STATUS_LIMIT = 2 ** 30;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      format: { type: 'string', short: 'f' },
      'output-format': { type: 'string', short: 'O' },
      options: { type: 'string', short: 'o', multiple: true, default: [] },
      compress: { type: 'boolean', short: 'c', default: false },
      backing: { type: 'string', short: 'B' },
      'backing-format': { type: 'string', short: 'F' },
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
  const [src, dst] = positionals as [string, string];
  const options = parseOptionList(values.options);
  if (values.backing !== undefined) options.set('backing_file', values.backing);
  if (values['backing-format'] !== undefined) options.set('backing_fmt', values['backing-format']);
  const createOptions = qcow2Options(options);
  if (createOptions.backingFile !== undefined && createOptions.backingFormat === undefined) {
    console.error('qcow86 convert: Use of backing file requires explicit backing format');
    return 1;
  }
  if (values.compress && createOptions.dataFile !== undefined) return usageError('convert', 'compression is not possible with an external data file', USAGE);
  if (values.compress && createOptions.preallocation === 'metadata') return usageError('convert', 'Compression and preallocation not supported at the same time', USAGE);
  const secrets = await Secrets.parse(values.object);
  const encrypt = encryptionRequest(options);
  if (values.compress && encrypt) return usageError('convert', 'Compression and encryption not supported at the same time', USAGE);
  const password = encrypt ? secrets.password(encrypt.keySecret) : undefined;
  if (encrypt && password) {
    const { cipher, hash, iterTimeMs, nameIvgenHash } = encrypt;
    createOptions.encryption = { password, crypto: nodeCrypto(), cipher, hash, iterTimeMs, nameIvgenHash };
  }

  const input = imageArgument(src, values['image-opts'], secrets, parseFormat(values.format));
  const image = await openPath(input.path, input.open);
  try {
    let source = image;
    if (values.snapshot !== undefined) {
      if (!(image instanceof Qcow2Image)) throw new FormatError(image.name, `only qcow2 images have internal snapshots (-l ${values.snapshot})`);
      // The snapshot at the image's current size, as qemu-img convert -l reads it.
      source = await image.loadSnapshotTemporarily(values.snapshot);
    }
    const progress = values.progress && !values.quiet ? progressPrinter() : undefined;
    // The destination's lock is taken before it is truncated and held until the copy is flushed.
    await withNewQcow2(dst, { ...createOptions, size: source.virtualSize }, async () => {
      // The new image's backing file (-B) opens with the source's backing passwords (backing.encrypt.key-secret).
      const target = await openImage(await FileStore.open(dst, { readOnly: false }), {
        format: 'qcow2',
        readOnly: false,
        resolver: nodeResolver(),
        codecs: nodeCodecs(),
        crypto: nodeCrypto(),
        passwords: (depth) => (depth === 0 ? password : input.passwords(depth)),
      });
      try {
        if (!(target instanceof Qcow2Image)) throw new Error(`${dst}: not a qcow2 image after creating it`);
        await copyToQcow2(source, target, { compress: values.compress, ...(progress ? { progress } : {}) });
        await target.flush();
      } finally {
        await target.close();
      }
    });
    progress?.(1, true);
    return 0;
  } finally {
    await image.close();
  }
}

/**
 * Copies every cluster of `source` that does not read as zero (or, when the target has a backing file, that
 * differs from what the target would read from it) into `target`. Batches are pipelined: the next one is read and
 * its clusters' compression started while the one before is being placed, so the workers compressing are not left
 * idle while the file is read and written (the 256 MiB bench: workers idle half the time before).
 */
export async function copyToQcow2(source: BlockDevice, target: Qcow2Image, options: { compress: boolean; progress?: (fraction: number) => void }): Promise<void> {
  const cs = target.clusterSize;
  const size = source.virtualSize;
  const backing = target.backing;
  const hasStatus = source instanceof Qcow2Image || source instanceof QcowV1Image || source instanceof RawImage;
  /** The batch being placed; its failure surfaces at the next await of it. */
  let placing: Promise<void> | undefined;
  const place = async (steps: Step[], done: number) => {
    if (placing) await placing;
    placing = placeBatch(target, steps).then(() => options.progress?.(done / size));
    placing.catch(() => {});
  };
  try {
    let at = 0;
    while (at < size) {
      const status = hasStatus ? await blockStatus(source, at, Math.min(STATUS_LIMIT, size - at)) : { length: size - at, zero: false };
      let end = at + status.length;
      // A zero range only lets whole target clusters be skipped, and only without a backing file to hide.
      if (status.zero && !backing) {
        at = end;
        continue;
      }
      // Work in whole target clusters: the range is widened to cluster bounds (the part outside is read anyway).
      let from = Math.floor(at / cs) * cs;
      end = Math.min(size, Math.ceil(end / cs) * cs);
      while (from < end) {
        const to = Math.min(end, Math.floor(from / BATCH) * BATCH + BATCH);
        await place(await prepareBatch(source, target, backing, from, to, options.compress), to);
        from = to;
      }
      at = end;
    }
    if (placing) await placing;
  } catch (error) {
    // Nothing may still be writing when the caller closes the target.
    await placing?.catch(() => {});
    throw error;
  }
  options.progress?.(1);
}

/** One write of a batch, in the order they must reach the target. */
type Step =
  | { kind: 'data'; offset: number; data: Uint8Array }
  | { kind: 'zeroes'; offset: number; length: number }
  | { kind: 'compressed'; first: number; clusters: Uint8Array[]; compressed: Promise<(Uint8Array | undefined)[]> };

/** Reads a batch and decides its writes; compression starts now (on the workers) and is awaited when placed. */
async function prepareBatch(source: BlockDevice, target: Qcow2Image, backing: BlockDevice | undefined, from: number, to: number, compress: boolean): Promise<Step[]> {
  const cs = target.clusterSize;
  const data = await source.read(from, to - from);
  const base = backing ? await readBacking(backing, from, to - from) : undefined;
  const steps: Step[] = [];
  let runStart = -1;
  // Clusters to compress, gathered while they follow each other: compressed together (in parallel), placed in order.
  let pending: { first: number; clusters: Uint8Array[] } | undefined;
  const flushCompressed = () => {
    if (pending) {
      const compressed = target.compressClusters(pending.clusters);
      // Awaited when placed; a failure before then must not count as unhandled.
      compressed.catch(() => {});
      steps.push({ kind: 'compressed', ...pending, compressed });
    }
    pending = undefined;
  };
  const flushRun = (runEnd: number) => {
    flushCompressed();
    if (runStart >= 0) steps.push({ kind: 'data', offset: from + runStart, data: data.subarray(runStart, runEnd) });
    runStart = -1;
  };
  for (let off = 0; off < data.length; off += cs) {
    const cluster = data.subarray(off, Math.min(data.length, off + cs));
    const same = base ? equal(cluster, base.subarray(off, off + cluster.length)) : isZero(cluster);
    if (same) {
      flushRun(off);
      continue;
    }
    if (base && isZero(cluster)) {
      // Zeros over backing data: a zero cluster, as qemu-img writes it, not a cluster of zero bytes.
      flushRun(off);
      steps.push({ kind: 'zeroes', offset: from + off, length: cluster.length });
    } else if (compress) {
      const index = (from + off) / cs;
      if (pending && pending.first + pending.clusters.length !== index) flushCompressed();
      pending ??= { first: index, clusters: [] };
      pending.clusters.push(cluster);
    } else if (runStart < 0) {
      runStart = off;
    }
  }
  flushRun(data.length);
  return steps;
}

async function placeBatch(target: Qcow2Image, steps: Step[]): Promise<void> {
  for (const step of steps) {
    if (step.kind === 'data') await target.write(step.offset, step.data);
    else if (step.kind === 'zeroes') await target.writeZeroes(step.offset, step.length);
    else await target.writeCompressedClusters(step.first, step.clusters, step.compressed);
  }
}

/** What the target reads from its backing file: zeros past the backing file's end. */
async function readBacking(backing: BlockDevice, offset: number, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  const inside = Math.max(0, Math.min(length, backing.virtualSize - offset));
  if (inside > 0) out.set(await backing.read(offset, inside));
  return out;
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

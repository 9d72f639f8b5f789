/**
 * Native zlib for Node: compressed images decode several times faster than with pako, which matters for
 * convert of deflate-compressed images. zstd stays portable (Node 20's zlib has none).
 *
 * node:zlib (and the stream modules it pulls in) is loaded on first use: most images have no compressed
 * clusters, and a CLI run pays for every module it loads.
 */
import type { InflateRaw } from 'node:zlib';
import { QEMU_DEFLATE_LEVEL, QEMU_MEM_LEVEL, QEMU_WINDOW_BITS, QEMU_ZSTD_LEVEL, portableCodecModule, portableCodecs, type Codecs } from '../qcow2/compression.js';
import { clusterWorkers } from './cluster-workers.js';

type Zlib = typeof import('node:zlib');
let zlibModule: Promise<Zlib> | undefined;

function zlib(): Promise<Zlib> {
  zlibModule ??= import('node:zlib');
  return zlibModule;
}

/**
 * Room for the whole cluster in one output chunk: zlib's default 16 KiB chunks made every 64 KiB cluster four
 * allocations plus a concatenating copy, which cost more than inflating it. The spare KiB lets zlib see the end
 * of a stream that fills the cluster exactly without asking for another chunk.
 */
const CHUNK_SLACK = 1024;

/**
 * Node's codecs. Compression (convert -c) runs on the worker threads of cluster-workers.ts unless
 * `workers: false` (what a worker itself uses): callers that compress several clusters at once get them
 * compressed in parallel.
 */
export function nodeCodecs(options: { workers?: boolean } = {}): Codecs {
  const portable = portableCodecs();
  const workers = options.workers === false ? undefined : clusterWorkers();
  let inflater: DirectInflater | undefined;
  const inflateRaw = async (src: Uint8Array, maxOutput: number): Promise<Uint8Array> => {
    const { constants, inflateRawSync } = await zlib();
    try {
      // Z_SYNC_FLUSH as the final flush returns what a truncated stream holds instead of throwing; Node ignores
      // bytes after the end of the stream. Both match what QEMU tolerates.
      const out = inflateRawSync(src, { windowBits: QEMU_WINDOW_BITS, maxOutputLength: maxOutput, finishFlush: constants.Z_SYNC_FLUSH, chunkSize: maxOutput + CHUNK_SLACK });
      return new Uint8Array(out.buffer, out.byteOffset, out.length);
    } catch {
      // A stream longer than the cluster (Node refuses it outright) or one that goes bad after the cluster is
      // full: QEMU keeps the first cluster's worth in both cases, and so does a single bounded pako pass.
      return (await portableCodecModule()).pakoInflateRaw(src, maxOutput);
    }
  };
  return {
    // Synchronous on purpose: a qcow2 cluster inflates in tens of microseconds, while zlib's asynchronous
    // convenience API builds a stream per call and cost ~2-4x more CPU per cluster in measurements
    // (1360 text clusters: 66-89 ms sync, 231-429 ms async with 16 in flight).
    inflateRaw,
    async inflateRawInto(src, into) {
      inflater ??= new DirectInflater(await zlib());
      const produced = inflater.inflate(src, into);
      if (produced !== undefined) return produced;
      const out = await inflateRaw(src, into.length);
      into.set(out);
      return out.length;
    },
    async deflateRaw(src) {
      if (workers) return workers.compress('deflate', src);
      const { deflateRawSync } = await zlib();
      const out = deflateRawSync(src, { level: QEMU_DEFLATE_LEVEL, windowBits: QEMU_WINDOW_BITS, memLevel: QEMU_MEM_LEVEL });
      return new Uint8Array(out.buffer, out.byteOffset, out.length);
    },
    zstdDecompress: portable.zstdDecompress,
    zstdCompress: (src, level) => (workers && (level ?? QEMU_ZSTD_LEVEL) === QEMU_ZSTD_LEVEL ? workers.compress('zstd', src) : portable.zstdCompress(src, level)),
  };
}

/** What DirectInflater uses of a zlib stream beyond its documented API (present since Node 10, checked at use). */
interface ZlibInternals {
  _handle?: { writeSync?(flush: number, input: Uint8Array, inOffset: number, inLength: number, output: Uint8Array, outOffset: number, outLength: number): void };
  _writeState?: Uint32Array;
}

/**
 * Inflates cluster after cluster with one zlib stream, straight into the caller's buffer, resetting the stream
 * in between. inflateRawSync builds a stream and allocates a fresh output buffer per call; for a convert of a
 * compressed image that was 85 MiB of new memory (each page faulted in, expensive in a VM) plus a copy, for
 * clusters that inflate in microseconds. This drives the stream's native handle the way Node's own synchronous
 * path does (zlib.js processChunkSync); `undefined` means "not done here" (a corrupt stream, or a Node whose
 * stream internals differ) and the caller takes the inflateRawSync path, so results and errors are unchanged.
 */
class DirectInflater {
  private stream: InflateRaw | undefined;
  private failed = false;

  constructor(private readonly zlib: Zlib) {}

  inflate(src: Uint8Array, into: Uint8Array): number | undefined {
    const stream = this.ready();
    if (!stream) return undefined;
    const { _handle: handle, _writeState: state } = stream as unknown as ZlibInternals;
    let error = false;
    try {
      handle!.writeSync!(this.zlib.constants.Z_SYNC_FLUSH, src, 0, src.length, into, 0, into.length);
    } catch {
      error = true;
    }
    // zlib reports a data error by destroying the stream (synchronously), its 'error' event comes later.
    if (error || stream.destroyed) {
      // A data error destroys the stream; the next cluster gets a new one.
      this.stream = undefined;
      return undefined;
    }
    stream.reset();
    // state[0] is what is left of the output space: the cluster is full when it is 0 (QEMU stops there too,
    // whatever follows in the stream).
    return into.length - state![0]!;
  }

  private ready(): InflateRaw | undefined {
    if (this.stream || this.failed) return this.stream;
    const stream = this.zlib.createInflateRaw({ windowBits: QEMU_WINDOW_BITS });
    // The error reaches the caller as `undefined` (then the inflateRawSync path names it); the event that
    // follows a destroyed stream must not become an uncaught exception.
    stream.on('error', () => {});
    const internals = stream as unknown as ZlibInternals;
    if (typeof internals._handle?.writeSync !== 'function' || !(internals._writeState instanceof Uint32Array)) {
      this.failed = true;
      return undefined;
    }
    this.stream = stream;
    return stream;
  }
}

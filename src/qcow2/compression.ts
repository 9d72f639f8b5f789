/**
 * Compressed-cluster codecs. The engine calls decompressCluster/compressCluster; the byte-level work goes through
 * an injectable Codecs object so Node can plug in native zlib (src/io/node-codecs.ts) while browsers use the
 * portable JavaScript/WASM implementations below.
 *
 * QEMU's rules (block/qcow2-threads.c, QEMU 7.2):
 * - deflate is RAW deflate with a 4 KiB window (windowBits -12), default level, memLevel 9. Decoding stops as soon
 *   as the cluster is full: the stream may end exactly there or carry more, and the input may carry trailing bytes
 *   because the L2 descriptor only records whole 512-byte sectors.
 * - zstd input is one or more frames with no length prefix; decoding goes frame by frame until the cluster is
 *   full and fails when a step makes no progress or a frame would overflow the cluster.
 * - A compressed cluster must be at most clusterSize - 1 bytes, otherwise QEMU stores the cluster uncompressed.
 */
import { FormatError } from './errors.js';
import { hex } from './bytes.js';

export type CompressionType = 'deflate' | 'zstd';

/**
 * The byte-level codecs. Decoders return at most `maxOutput` bytes: the first `maxOutput` bytes of the decoded
 * stream, or fewer when the stream (or the input) ends first. They throw on a corrupt stream. Encoders return
 * the complete compressed form of `src`.
 */
export interface Codecs {
  /** Raw deflate (no zlib header), window 4 KiB as QEMU writes it. */
  inflateRaw(src: Uint8Array, maxOutput: number): Promise<Uint8Array>;
  /**
   * inflateRaw into `into` (at most `into.length` bytes), returning how many bytes it produced. Optional: it
   * saves an allocation and a copy per cluster where a codec can write to a given buffer.
   */
  inflateRawInto?(src: Uint8Array, into: Uint8Array): Promise<number>;
  deflateRaw(src: Uint8Array): Promise<Uint8Array>;
  zstdDecompress(src: Uint8Array, maxOutput: number): Promise<Uint8Array>;
  /** `level` defaults to QEMU's (3); clusters always use that, larger blobs (session VM state) may ask for more. */
  zstdCompress(src: Uint8Array, level?: number): Promise<Uint8Array>;
}

/** QEMU's zlib settings: raw deflate (negative window bits), 2^12-byte window, memLevel 9, default level. */
export const QEMU_WINDOW_BITS = 12;
export const QEMU_MEM_LEVEL = 9;
export const QEMU_DEFLATE_LEVEL = -1;
/** ZSTD_CLEVEL_DEFAULT: QEMU creates its compression context without setting a level. */
export const QEMU_ZSTD_LEVEL = 3;

type PortableModule = typeof import('./codecs-portable.js');
let portableModule: Promise<PortableModule> | undefined;

/**
 * pako and fzstd (codecs-portable.ts) are loaded on first use: most images have no compressed clusters, and
 * loading them costs a CLI run about as much as reading a few hundred MiB (Node uses native zlib anyway).
 */
export function portableCodecModule(): Promise<PortableModule> {
  portableModule ??= import('./codecs-portable.js');
  return portableModule;
}

/** Pure JavaScript deflate (pako), JavaScript zstd decoding (fzstd), WASM zstd encoding; all loaded on first use. */
export function portableCodecs(): Codecs {
  return {
    inflateRaw: async (src, maxOutput) => (await portableCodecModule()).pakoInflateRaw(src, maxOutput),
    deflateRaw: async (src) => (await portableCodecModule()).pakoDeflateRaw(src),
    zstdDecompress: async (src, maxOutput) => (await portableCodecModule()).zstdDecompressPortable(src, maxOutput),
    zstdCompress: async (src, level) => (await zstdWasm()).compress(src, level ?? QEMU_ZSTD_LEVEL),
  };
}

/**
 * Decodes one compressed cluster into exactly `clusterSize` bytes, or throws a FormatError saying why not. With
 * `into` (clusterSize bytes) the cluster is decoded there, when the codec can, and `into` is returned.
 */
export async function decompressCluster(
  file: string,
  type: CompressionType,
  src: Uint8Array,
  clusterSize: number,
  codecs: Codecs,
  hostOffset: number,
  into?: Uint8Array,
): Promise<Uint8Array> {
  const where = `compressed cluster at host offset ${hex(hostOffset)}`;
  let out: Uint8Array;
  let length: number;
  try {
    if (into && type === 'deflate' && codecs.inflateRawInto) {
      length = await codecs.inflateRawInto(src, into.subarray(0, clusterSize));
      out = into;
    } else {
      out = type === 'zstd' ? await codecs.zstdDecompress(src, clusterSize) : await codecs.inflateRaw(src, clusterSize);
      length = out.length;
    }
  } catch (error) {
    if (error instanceof FormatError) throw error;
    throw new FormatError(file, `${where}: ${type} data is corrupt (${(error as Error).message})`, { field: 'compressed data', offset: hostOffset });
  }
  if (length > clusterSize) {
    throw new FormatError(file, `${where}: ${type} data expands past the cluster size (${clusterSize} bytes)`, { field: 'compressed data', offset: hostOffset });
  }
  if (length < clusterSize) {
    throw new FormatError(
      file,
      `${where}: ${type} data ends after ${length} of ${clusterSize} bytes (${src.length} compressed bytes read)`,
      { field: 'compressed data', offset: hostOffset, value: length },
    );
  }
  if (into && out !== into) into.set(out);
  return into ?? out;
}

/**
 * Compresses one cluster the way QEMU does. `data` shorter than a cluster (the image's last, partial cluster) is
 * padded with zeros. Returns undefined when the result would not be smaller than clusterSize - 1 bytes: QEMU
 * then writes the cluster uncompressed.
 */
export async function compressCluster(type: CompressionType, data: Uint8Array, clusterSize: number, codecs: Codecs): Promise<Uint8Array | undefined> {
  if (data.length > clusterSize) throw new RangeError(`compressCluster: ${data.length} bytes is more than one cluster (${clusterSize})`);
  let input = data;
  if (data.length < clusterSize) {
    input = new Uint8Array(clusterSize);
    input.set(data);
  }
  const out = type === 'zstd' ? await codecs.zstdCompress(input) : await codecs.deflateRaw(input);
  return out.length <= clusterSize - 1 ? out : undefined;
}

// ---- zstd ------------------------------------------------------------------------------------------------------

type ZstdWasm = typeof import('@bokuweb/zstd-wasm');
let zstdWasmModule: Promise<ZstdWasm> | undefined;

/** The WASM encoder is loaded only when something is first compressed with zstd (never on the read path). */
function zstdWasm(): Promise<ZstdWasm> {
  zstdWasmModule ??= (async () => {
    const module = await import('@bokuweb/zstd-wasm');
    await module.init();
    return module;
  })();
  return zstdWasmModule;
}

const ZSTD_MAGIC = 0xfd2fb528;
export const ZSTD_BLOCK_MAX = 128 * 1024;

export interface ZstdFrame {
  /** Byte length of the whole frame in the input, checksum included. */
  length: number;
  skippable: boolean;
  /** Frame_Content_Size when the header records it. */
  contentSize: number | undefined;
  windowSize: number;
  /** Offset of the Window_Descriptor byte inside the frame, when there is one (not single-segment). */
  windowDescriptorAt: number | undefined;
  blocks: number;
}

function le(bytes: Uint8Array, at: number, n: number): number {
  let value = 0;
  for (let i = n - 1; i >= 0; i--) value = value * 256 + bytes[at + i]!;
  return value;
}

/**
 * Walks one frame's header and block headers without decoding anything, so the decoder is only ever handed a
 * complete, size-checked frame (RFC 8878 section 3.1).
 */
export function scanZstdFrame(src: Uint8Array, at: number): ZstdFrame {
  const need = (n: number, what: string) => {
    if (at + n > src.length) throw new Error(`${what} at input offset ${at} is truncated`);
  };
  need(8, 'frame header');
  const magic = le(src, at, 4);
  if ((magic & 0xfffffff0) >>> 0 === 0x184d2a50) {
    const length = 8 + le(src, at + 4, 4);
    need(length, 'skippable frame');
    return { length, skippable: true, contentSize: undefined, windowSize: 0, windowDescriptorAt: undefined, blocks: 0 };
  }
  if (magic !== ZSTD_MAGIC) throw new Error(`no zstd frame magic at input offset ${at} (found ${hex(magic)})`);
  const descriptor = src[at + 4]!;
  if (descriptor & 0x08) throw new Error('reserved bit set in frame header');
  const singleSegment = (descriptor >> 5) & 1;
  const checksum = (descriptor >> 2) & 1;
  const dictBytes = [0, 1, 2, 4][descriptor & 3]!;
  const fcsFlag = descriptor >> 6;
  const fcsBytes = fcsFlag === 0 ? singleSegment : 1 << fcsFlag;
  let pos = at + 5;
  let windowSize = 0;
  let windowDescriptorAt: number | undefined;
  if (!singleSegment) {
    const w = src[pos]!;
    const base = 2 ** (10 + (w >> 3));
    windowSize = base + (base / 8) * (w & 7);
    windowDescriptorAt = pos - at;
    pos++;
  }
  need(pos - at + dictBytes + fcsBytes, 'frame header');
  if (dictBytes && le(src, pos, dictBytes) !== 0) throw new Error('frame needs a dictionary');
  pos += dictBytes;
  let contentSize: number | undefined;
  if (fcsBytes) contentSize = le(src, pos, fcsBytes) + (fcsBytes === 2 ? 256 : 0);
  pos += fcsBytes;
  if (singleSegment) windowSize = contentSize!;
  let blocks = 0;
  for (;;) {
    if (pos + 3 > src.length) throw new Error(`block header at input offset ${pos} is truncated`);
    const header = le(src, pos, 3);
    const last = header & 1;
    const type = (header >> 1) & 3;
    const size = header >>> 3;
    if (type === 3) throw new Error(`reserved block type at input offset ${pos}`);
    if (size > Math.min(ZSTD_BLOCK_MAX, Math.max(windowSize, 1))) throw new Error(`block of ${size} bytes exceeds the maximum block size`);
    pos += 3 + (type === 1 ? 1 : size);
    if (pos > src.length) throw new Error(`block at input offset ${pos} is truncated`);
    blocks++;
    if (last) break;
  }
  pos += checksum * 4;
  if (pos > src.length) throw new Error('frame checksum is truncated');
  return { length: pos - at, skippable: false, contentSize, windowSize, windowDescriptorAt, blocks };
}

/**
 * The portable codecs' byte-level work: pako (zlib's JavaScript port, driven like QEMU drives zlib) and fzstd.
 * compression.ts loads this module on first use only (portableCodecModule).
 */
import {
  ZStream,
  Z_BUF_ERROR,
  Z_DEFAULT_STRATEGY,
  Z_FINISH,
  Z_OK,
  Z_STREAM_END,
  zlibDeflate,
  zlibDeflateEnd,
  zlibDeflateInit2,
  zlibInflate,
  zlibInflateEnd,
  zlibInflateInit2,
} from 'pako';
import { Decompress as ZstdStream, decompress as zstdDecompressWhole } from 'fzstd';
import { QEMU_DEFLATE_LEVEL, QEMU_MEM_LEVEL, QEMU_WINDOW_BITS, ZSTD_BLOCK_MAX, scanZstdFrame } from './compression.js';

const Z_DEFLATED_METHOD = 8;

// ---- deflate (pako's zlib port, driven like QEMU drives zlib) --------------------------------------------------

/** One inflate(Z_FINISH) call into a fixed buffer: output can never exceed maxOutput, whatever the input says. */
export function pakoInflateRaw(src: Uint8Array, maxOutput: number): Uint8Array {
  const strm = new ZStream();
  const output = new Uint8Array(maxOutput);
  if (zlibInflateInit2(strm, -QEMU_WINDOW_BITS) !== Z_OK) throw new Error('inflateInit2 failed');
  strm.input = src;
  strm.next_in = 0;
  strm.avail_in = src.length;
  strm.output = output;
  strm.next_out = 0;
  strm.avail_out = maxOutput;
  const status = zlibInflate(strm, Z_FINISH);
  const produced = strm.next_out;
  const message = strm.msg;
  zlibInflateEnd(strm);
  // Z_BUF_ERROR means "stopped for lack of room or input": fine, the caller checks the length.
  if (status !== Z_STREAM_END && status !== Z_BUF_ERROR && status !== Z_OK) throw new Error(message || `inflate status ${status}`);
  return output.subarray(0, produced);
}

export function pakoDeflateRaw(src: Uint8Array): Uint8Array {
  const strm = new ZStream();
  if (zlibDeflateInit2(strm, QEMU_DEFLATE_LEVEL, Z_DEFLATED_METHOD, -QEMU_WINDOW_BITS, QEMU_MEM_LEVEL, Z_DEFAULT_STRATEGY) !== Z_OK) {
    throw new Error('deflateInit2 failed');
  }
  // zlib's conservative deflateBound (a 4 KiB window means stored blocks of at most 4 KiB, 5 bytes each); the
  // loop below still grows the buffer should a stream ever need more.
  let output = new Uint8Array(src.length + (src.length >> 3) + (src.length >> 6) + 64);
  strm.input = src;
  strm.next_in = 0;
  strm.avail_in = src.length;
  strm.output = output;
  strm.next_out = 0;
  strm.avail_out = output.length;
  let status = zlibDeflate(strm, Z_FINISH);
  while (status === Z_OK || (status === Z_BUF_ERROR && strm.avail_out === 0)) {
    const bigger = new Uint8Array(output.length * 2);
    bigger.set(output.subarray(0, strm.next_out));
    output = bigger;
    strm.output = output;
    strm.avail_out = output.length - strm.next_out;
    status = zlibDeflate(strm, Z_FINISH);
  }
  const produced = strm.next_out;
  zlibDeflateEnd(strm);
  if (status !== Z_STREAM_END) throw new Error(`deflate did not finish (status ${status})`);
  return output.subarray(0, produced);
}

/**
 * Frame-by-frame decoding with fzstd, bounded: each frame is scanned first and a frame that declares more
 * content than the cluster has room for is refused. Decoding stops once maxOutput bytes exist; what follows
 * (padding up to the sector boundary, a neighbour's data) is never looked at.
 *
 * A single-segment frame with a content size (every frame QEMU writes: it compresses a whole cluster in one
 * ZSTD_e_end call) decodes in one call into a buffer of its declared size, in linear time.
 * fzstd takes the declared size on trust there: a damaged frame can yield wrong bytes instead of an error, as
 * any damage zstd has no checksum for would. Other frames go through fzstd's streaming decoder, whose window
 * buffer is capped at the cluster size (back-references inside one cluster never reach further).
 */
export function zstdDecompressPortable(src: Uint8Array, maxOutput: number): Uint8Array {
  const output = new Uint8Array(maxOutput);
  let produced = 0;
  let at = 0;
  // The streaming decoder shifts its whole window buffer once per block: a hostile stream of thousands of tiny
  // frames or blocks must end in an error, not minutes of copying. Real clusters stay far below this.
  let budget = 512 * Math.max(maxOutput, ZSTD_BLOCK_MAX);
  while (produced < maxOutput) {
    if (at >= src.length) break;
    const frame = scanZstdFrame(src, at);
    const bytes = src.subarray(at, at + frame.length);
    at += frame.length;
    budget -= 4096 * (frame.blocks + 1);
    if (frame.skippable) continue;
    const room = maxOutput - produced;
    if (frame.contentSize !== undefined && frame.contentSize > room) {
      throw new Error(`frame declares ${frame.contentSize} bytes of content but only ${room} bytes of the cluster remain`);
    }
    if (frame.contentSize !== undefined && frame.windowDescriptorAt === undefined) {
      // fzstd sizes its buffer from the (checked) content size; this is several times faster than handing it
      // our output slice, which it fills through a slow path.
      const decoded = zstdDecompressWhole(bytes);
      if (decoded.length !== frame.contentSize) throw new Error(`frame decoded to ${decoded.length} bytes, not its declared ${frame.contentSize}`);
      output.set(decoded, produced);
      produced += decoded.length;
      if (budget < 0) throw new Error('zstd stream needs too much work for one cluster (too many frames or blocks)');
      continue;
    }
    let input = bytes;
    let window = frame.windowSize;
    const cap = Math.max(ZSTD_BLOCK_MAX, 2 ** Math.ceil(Math.log2(Math.max(room, 1024))));
    if (frame.windowDescriptorAt !== undefined && window > cap) {
      input = bytes.slice();
      input[frame.windowDescriptorAt] = (Math.log2(cap) - 10) << 3;
      window = cap;
    }
    budget -= window * (frame.blocks + 1);
    if (budget < 0) throw new Error('zstd stream needs too much work for one cluster (too many frames or blocks)');
    const decoder = new ZstdStream((chunk) => {
      if (chunk.length > maxOutput - produced) throw new Error(`zstd data expands past ${maxOutput} bytes`);
      output.set(chunk, produced);
      produced += chunk.length;
    });
    decoder.push(input, true);
  }
  return output.subarray(0, produced);
}

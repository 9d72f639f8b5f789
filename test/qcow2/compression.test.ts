import { describe, expect, it, beforeAll } from 'vitest';
import fc from 'fast-check';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { compressCluster, decompressCluster, portableCodecs, scanZstdFrame, type Codecs, type CompressionType } from '../../src/qcow2/compression.js';
import { FormatError } from '../../src/qcow2/errors.js';
import { nodeCodecs } from '../../src/io/node-codecs.js';
import { qemuImg, tempDir } from '../helpers/qemu.js';
import { ZStream, Z_FINISH, Z_STREAM_END, zlibInflate, zlibInflateInit2 } from 'pako';

const codecSets: Array<[string, Codecs]> = [
  ['portable', portableCodecs()],
  ['node', nodeCodecs()],
];
const types: CompressionType[] = ['deflate', 'zstd'];

/** Compressible data: runs, text-like repeats and noise mixed, so both "compresses" and "does not" occur. */
function mixedData(size: number, seed: number): Uint8Array {
  const out = new Uint8Array(size);
  let x = seed >>> 0 || 1;
  const rand = () => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0), x >>> 16);
  for (let i = 0; i < size; ) {
    const kind = rand() % 3;
    const n = Math.min(size - i, 64 + (rand() % 4096));
    for (let j = 0; j < n; j++, i++) out[i] = kind === 0 ? 0 : kind === 1 ? 'qcow86 text '.charCodeAt(j % 12) : rand() & 0xff;
  }
  return out;
}

/** How the engine hands a cluster to the codecs: sector-rounded, with whatever follows on disk. */
function withTrailing(compressed: Uint8Array, trailing: Uint8Array): Uint8Array {
  const out = new Uint8Array(compressed.length + trailing.length);
  out.set(compressed);
  out.set(trailing, compressed.length);
  return out;
}

async function outcome(promise: Promise<Uint8Array>): Promise<Uint8Array | 'error'> {
  try {
    return await promise;
  } catch (error) {
    expect(error).toBeInstanceOf(FormatError);
    return 'error';
  }
}

/** The codec's output even when it does not save space (compressCluster would return undefined). */
function rawCompress(type: CompressionType, data: Uint8Array, codecs: Codecs): Promise<Uint8Array> {
  return type === 'zstd' ? codecs.zstdCompress(data) : codecs.deflateRaw(data);
}

/** Exact length of the deflate stream qemu-img stored (the descriptor only knows sectors). */
function deflateStreamLength(src: Uint8Array, clusterSize: number): number {
  const strm = new ZStream();
  zlibInflateInit2(strm, -12);
  strm.input = src;
  strm.next_in = 0;
  strm.avail_in = src.length;
  strm.output = new Uint8Array(clusterSize + 1);
  strm.next_out = 0;
  strm.avail_out = clusterSize + 1;
  expect(zlibInflate(strm, Z_FINISH)).toBe(Z_STREAM_END);
  return strm.next_in;
}

const clusterSizes = fc.constantFrom(512, 1024, 4096, 65536);

describe.each(codecSets)('%s codecs', (_name, codecs) => {
  describe.each(types)('%s', (type) => {
    it('round-trips any cluster, ignoring trailing bytes', async () => {
      await fc.assert(
        fc.asyncProperty(clusterSizes, fc.integer(), fc.uint8Array({ maxLength: 1024 }), fc.boolean(), async (clusterSize, seed, trailing, partial) => {
          let data = mixedData(clusterSize, seed);
          if (partial) data = data.subarray(0, clusterSize >> 1);
          const compressed = await compressCluster(type, data, clusterSize, codecs);
          const padded = new Uint8Array(clusterSize);
          padded.set(data);
          if (compressed === undefined) {
            // Only refused when it really does not fit in clusterSize - 1 bytes.
            const raw = type === 'zstd' ? await codecs.zstdCompress(padded) : await codecs.deflateRaw(padded);
            expect(raw.length).toBeGreaterThanOrEqual(clusterSize);
            return;
          }
          expect(compressed.length).toBeLessThan(clusterSize);
          const out = await decompressCluster('img', type, withTrailing(compressed, trailing), clusterSize, codecs, 0x1200);
          expect(out.length).toBe(clusterSize);
          expect(Buffer.from(out).equals(Buffer.from(padded))).toBe(true);
        }),
        { numRuns: 60 },
      );
    });

    it('refuses incompressible clusters like QEMU (undefined: write uncompressed), yet encodes them', async () => {
      for (const size of [4096, 65536, 2 * 1024 * 1024]) {
        const noise = new Uint8Array(size);
        let x = 0x9e3779b9;
        for (let i = 0; i < noise.length; i++) noise[i] = (x ^= x << 13, x ^= x >>> 17, x ^= x << 5) & 0xff;
        expect(await compressCluster(type, noise, size, codecs)).toBeUndefined();
        // The codec itself still produces a complete stream (stored blocks) that decodes back.
        const raw = await rawCompress(type, noise, codecs);
        const out = type === 'zstd' ? await codecs.zstdDecompress(raw, size) : await codecs.inflateRaw(raw, size);
        expect(Buffer.from(out).equals(Buffer.from(noise))).toBe(true);
      }
    });

    it('truncated input gives a FormatError or the exact original cluster, never other bytes', async () => {
      await fc.assert(
        fc.asyncProperty(fc.integer(), fc.double({ min: 0, max: 1, noNaN: true }), async (seed, cut) => {
          const data = mixedData(4096, seed);
          const compressed = await rawCompress(type, data, codecs);
          const truncated = compressed.subarray(0, Math.floor(compressed.length * cut));
          const result = await outcome(decompressCluster('img', type, truncated, 4096, codecs, 0));
          if (result !== 'error') expect(Buffer.from(result).equals(Buffer.from(data))).toBe(true);
        }),
        { numRuns: 100 },
      );
    });

    it('garbage and bit-flipped input end in a FormatError or exactly one cluster, quickly', async () => {
      await fc.assert(
        fc.asyncProperty(fc.integer(), fc.uint8Array({ minLength: 0, maxLength: 3000 }), fc.nat(), fc.boolean(), async (seed, garbage, flipAt, flip) => {
          let input = garbage;
          if (flip) {
            input = (await rawCompress(type, mixedData(4096, seed), codecs)).slice();
            input[flipAt % input.length]! ^= 1 << flipAt % 8;
          }
          const started = Date.now();
          const result = await outcome(decompressCluster('img', type, input, 4096, codecs, 0));
          if (result !== 'error') expect(result.length).toBe(4096);
          // A hang guard, not a speed target: generous so a loaded CI machine cannot fail it.
          expect(Date.now() - started).toBeLessThan(10_000);
        }),
        { numRuns: 200 },
      );
    }, 120_000);
  });

  it('deflate: a stream longer than the cluster is cut at the cluster, as QEMU does', async () => {
    const long = mixedData(8192, 7);
    const compressed = await codecs.deflateRaw(long);
    const out = await decompressCluster('img', 'deflate', compressed, 4096, codecs, 0);
    expect(Buffer.from(out).equals(Buffer.from(long.subarray(0, 4096)))).toBe(true);
    const into = new Uint8Array(4096);
    expect(await decompressCluster('img', 'deflate', compressed, 4096, codecs, 0, into)).toBe(into);
    expect(Buffer.from(into).equals(Buffer.from(long.subarray(0, 4096)))).toBe(true);
  });
});

describe('portable and native deflate agree', () => {
  it('on valid, truncated and damaged streams', async () => {
    const [portable, native] = [codecSets[0]![1], codecSets[1]![1]];
    await fc.assert(
      fc.asyncProperty(fc.integer(), fc.nat(), fc.nat(), async (seed, cut, flipAt) => {
        const stream = (await native.deflateRaw(mixedData(4096, seed))).slice();
        if (flipAt % 3 === 0) stream[flipAt % stream.length]! ^= 0x10;
        const input = stream.subarray(0, cut % (stream.length + 1));
        const a = await outcome(decompressCluster('img', 'deflate', input, 4096, portable, 0));
        const b = await outcome(decompressCluster('img', 'deflate', input, 4096, native, 0));
        expect(a === 'error' ? a : Buffer.from(a)).toEqual(b === 'error' ? b : Buffer.from(b));
        // Native zlib decoding straight into the caller's buffer (convert's path) agrees too.
        const c = await outcome(decompressCluster('img', 'deflate', input, 4096, native, 0, new Uint8Array(4096).fill(0xee)));
        expect(c === 'error' ? c : Buffer.from(c)).toEqual(b === 'error' ? b : Buffer.from(b));
      }),
      { numRuns: 200 },
    );
  });
});

describe('zstd framing', () => {
  const codecs = portableCodecs();
  const data = mixedData(65536, 3);

  it('decodes a cluster split over several frames with skippable frames between', async () => {
    const a = await codecs.zstdCompress(data.subarray(0, 20000));
    const b = await codecs.zstdCompress(data.subarray(20000));
    const skippable = new Uint8Array([0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9]);
    const input = new Uint8Array([...a, ...skippable, ...b, 0xde, 0xad]);
    const out = await decompressCluster('img', 'zstd', input, 65536, codecs, 0);
    expect(Buffer.from(out).equals(Buffer.from(data))).toBe(true);
  });

  it('decodes frames that are not single-segment (streaming path), capping a 2 GiB window', async () => {
    const single = await codecs.zstdCompress(data);
    expect(single[4]! & 0x20).toBe(0x20);
    for (const windowByte of [0x30, 0xa8]) {
      // Same frame with the single-segment flag cleared and a Window_Descriptor inserted (64 KiB / 2 GiB).
      const frame = new Uint8Array([...single.subarray(0, 4), single[4]! & ~0x20, windowByte, ...single.subarray(5)]);
      expect(scanZstdFrame(frame, 0).windowDescriptorAt).toBe(5);
      const out = await decompressCluster('img', 'zstd', frame, 65536, codecs, 0);
      expect(Buffer.from(out).equals(Buffer.from(data))).toBe(true);
    }
  });

  it('refuses a frame that declares more content than the cluster holds', async () => {
    const big = await codecs.zstdCompress(new Uint8Array(131072));
    await expect(decompressCluster('disk.qcow2', 'zstd', big, 65536, codecs, 0x30000)).rejects.toThrow(
      /disk\.qcow2: compressed cluster at host offset 0x30000: zstd data is corrupt \(frame declares 131072 bytes/,
    );
  });

  it('ends a stream of thousands of empty frames with an error, not a hang', async () => {
    const empty = await codecs.zstdCompress(new Uint8Array(0));
    const input = new Uint8Array(empty.length * 200000);
    for (let i = 0; i < 200000; i++) input.set(empty, i * empty.length);
    const started = Date.now();
    const attempt = decompressCluster('img', 'zstd', input, 2 * 1024 * 1024, codecs, 0);
    await expect(attempt).rejects.toThrow(FormatError);
    // The error must come from the work budget (without it this walks all 200,000 frames); the time limit only
    // guards against a hang, generous enough for a loaded CI machine.
    await expect(attempt).rejects.toThrow(/too much work/);
    expect(Date.now() - started).toBeLessThan(30_000);
  }, 60_000);

  it('refuses a frame whose blocks run past the input', () => {
    expect(() => scanZstdFrame(new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x10, 0x00, 0x00, 0x00]), 0)).toThrow(/truncated/);
  });

  it('caps the window a non-single-segment frame asks for', async () => {
    // Frame header with a 2 GiB window and one raw block of 3 bytes; without the cap fzstd would allocate 2 GiB.
    const frame = new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xa8, 0x19, 0x00, 0x00, 1, 2, 3]);
    const out = await decompressCluster('img', 'zstd', new Uint8Array([...frame, ...new Uint8Array(0)]), 512, codecs, 0).catch((e: Error) => e);
    expect(out).toBeInstanceOf(FormatError);
    expect((out as Error).message).toMatch(/ends after 3 of 512 bytes/);
  });
});

/**
 * Real clusters from qemu-img: walk the L1/L2 tables of a `convert -c` image just enough to find each compressed
 * descriptor, decode it with our codecs and compare with the source bytes.
 */
describe.each([
  ['zlib', 'deflate', 65536],
  ['zlib', 'deflate', 4096],
  ['zstd', 'zstd', 65536],
  ['zstd', 'zstd', 2 * 1024 * 1024],
] as const)('clusters from qemu-img convert -c (compression_type=%s, %s, cluster %i)', (qemuType, type, clusterSize) => {
  let source: Uint8Array;
  let image: Uint8Array;
  const dir = tempDir();

  beforeAll(async () => {
    source = mixedData(8 * 1024 * 1024, 11);
    await writeFile(join(dir, 'src.raw'), source);
    await qemuImg(['convert', '-c', '-O', 'qcow2', '-o', `compression_type=${qemuType},cluster_size=${clusterSize}`, join(dir, 'src.raw'), join(dir, 'c.qcow2')]);
    image = new Uint8Array(await readFile(join(dir, 'c.qcow2')));
  });

  function compressedClusters(): Array<{ guest: number; host: number; length: number }> {
    const view = new DataView(image.buffer, image.byteOffset);
    const clusterBits = view.getUint32(20);
    const l1Size = view.getUint32(36);
    const l1Offset = Number(view.getBigUint64(40));
    const x = 62 - (clusterBits - 8);
    const found = [];
    for (let i = 0; i < l1Size; i++) {
      const l2Offset = Number(view.getBigUint64(l1Offset + 8 * i) & 0x00fffffffffffe00n);
      if (!l2Offset) continue;
      for (let j = 0; j < clusterSize / 8; j++) {
        const entry = view.getBigUint64(l2Offset + 8 * j);
        if (!(entry & (1n << 62n))) continue;
        const host = Number(entry & ((1n << BigInt(x)) - 1n));
        const sectors = Number((entry >> BigInt(x)) & ((1n << BigInt(62 - x)) - 1n)) + 1;
        found.push({ guest: (i * (clusterSize / 8) + j) * clusterSize, host, length: sectors * 512 - (host & 511) });
      }
    }
    return found;
  }

  it.each(codecSets)('%s codecs decode every compressed cluster byte-identically', async (_name, codecs) => {
    const clusters = compressedClusters();
    expect(clusters.length).toBeGreaterThan(0);
    for (const { guest, host, length } of clusters) {
      const out = await decompressCluster('c.qcow2', type, image.subarray(host, Math.min(image.length, host + length)), clusterSize, codecs, host);
      expect(Buffer.from(out).equals(Buffer.from(source.subarray(guest, guest + clusterSize)))).toBe(true);
    }
  });

  it.each(codecSets)('%s codecs compress to within 2 percent of qemu-img', async (name, codecs) => {
    const clusters = compressedClusters();
    let ours = 0;
    let theirs = 0;
    let identical = 0;
    for (const { guest, host, length } of clusters) {
      const compressed = await compressCluster(type, source.subarray(guest, guest + clusterSize), clusterSize, codecs);
      expect(compressed).toBeDefined();
      const stored = image.subarray(host, host + length);
      const exact = type === 'zstd' ? scanZstdFrame(stored, 0).length : deflateStreamLength(stored, clusterSize);
      ours += compressed!.length;
      theirs += exact;
      if (Buffer.from(compressed!).equals(Buffer.from(stored.subarray(0, exact)))) identical++;
    }
    expect(Math.abs(ours - theirs) / theirs).toBeLessThan(0.02);
    console.log(`${qemuType} cluster ${clusterSize} ${name}: ${clusters.length} clusters, ours ${ours} B, qemu-img ${theirs} B, ${identical} byte-identical`);
  });
});

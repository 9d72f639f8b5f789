/**
 * Property tests for the bit-level codecs of the read path: compressed L2 descriptors and the header
 * (encodeHeader then parseHeader gives back every field), over generated values at every cluster size.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { decodeCompressed, encodeCompressed, type L2Entry } from '../../src/qcow2/mapping.js';
import { encodeHeader, parseHeader, requiredL1Size, type Qcow2Header } from '../../src/qcow2/header.js';

function entryOf(value: bigint): L2Entry {
  return { hi: Number(value >> 32n), lo: Number(value & 0xffffffffn), allocMask: 0, zeroMask: 0 };
}

describe('compressed descriptor', () => {
  it('round-trips host offset and sector-granular length for cluster_bits 9..21', () => {
    fc.assert(
      fc.property(fc.integer({ min: 9, max: 21 }), fc.nat(), fc.nat(), (clusterBits, offsetSeed, lengthSeed) => {
        const offsetBits = 62 - (clusterBits - 8);
        const hostOffset = offsetSeed % 2 ** Math.min(offsetBits, 40);
        // QEMU stores at most a cluster's worth of compressed bytes (plus the sector the data starts in).
        const length = 1 + (lengthSeed % (2 ** clusterBits - 1));
        const decoded = decodeCompressed(entryOf(encodeCompressed(hostOffset, length, clusterBits)), clusterBits);
        expect(decoded.hostOffset).toBe(hostOffset);
        // The descriptor covers every byte of the stream and ends at the end of a sector.
        expect(decoded.compressedLength).toBeGreaterThanOrEqual(length);
        expect((hostOffset + decoded.compressedLength) % 512).toBe(0);
        expect(decoded.compressedLength - length).toBeLessThan(512);
      }),
    );
  });

  it('decodes every 62-bit descriptor as the spec says (bigint reference, offsets far above 4 GiB)', () => {
    fc.assert(
      fc.property(fc.integer({ min: 9, max: 21 }), fc.bigInt({ min: 0n, max: (1n << 62n) - 1n }), (clusterBits, bits) => {
        const x = BigInt(62 - (clusterBits - 8));
        const hostOffset = Number(bits & ((1n << x) - 1n));
        const sectors = Number(bits >> x) + 1;
        const decoded = decodeCompressed(entryOf((1n << 62n) | bits), clusterBits);
        expect(decoded).toEqual({ hostOffset, compressedLength: sectors * 512 - (hostOffset % 512) });
      }),
    );
  });
});

describe('header', () => {
  it('parseHeader(encodeHeader(h)) gives back every field', () => {
    fc.assert(
      fc.property(
        fc.record({
          version: fc.constantFrom(2 as const, 3 as const),
          clusterBits: fc.integer({ min: 9, max: 21 }),
          sizeSectors: fc.integer({ min: 0, max: 2 ** 31 }),
          refcountOrder: fc.integer({ min: 0, max: 6 }),
          lazy: fc.boolean(),
          zstd: fc.boolean(),
          backing: fc.option(fc.stringMatching(/^[a-z0-9/._-]{1,60}$/), { nil: undefined }),
          backingFormat: fc.option(fc.constantFrom('qcow2', 'raw'), { nil: undefined }),
          nbSnapshots: fc.integer({ min: 0, max: 100 }),
        }),
        (r) => {
          const clusterSize = 2 ** r.clusterBits;
          const size = r.sizeSectors * 512;
          const l1Size = requiredL1Size(size, r.clusterBits, false);
          fc.pre(l1Size <= 4 * 1024 * 1024); // QEMU's L1 limit (32 MiB): such headers are refused by design
          const v3 = r.version === 3;
          const header: Qcow2Header = {
            version: r.version,
            backingFileOffset: 0,
            backingFileSize: 0,
            clusterBits: r.clusterBits,
            size,
            cryptMethod: 0,
            l1Size,
            l1TableOffset: 3 * clusterSize,
            refcountTableOffset: clusterSize,
            refcountTableClusters: 1,
            nbSnapshots: r.nbSnapshots,
            snapshotsOffset: r.nbSnapshots ? 2 * clusterSize : 0,
            incompatibleFeatures: v3 && r.zstd ? 8n : 0n,
            compatibleFeatures: v3 && r.lazy ? 1n : 0n,
            autoclearFeatures: 0n,
            refcountOrder: v3 ? r.refcountOrder : 4,
            headerLength: v3 ? 112 : 72,
            compressionType: v3 && r.zstd ? 1 : 0,
            unknownHeaderBytes: new Uint8Array(v3 ? 7 : 0),
            backingFile: r.backing,
            backingFormat: r.backing ? r.backingFormat : undefined,
            dataFile: undefined,
            featureNames: [],
            bitmaps: undefined,
            fde: undefined,
            unknownExtensions: [],
          };
          let encoded: Uint8Array;
          try {
            encoded = encodeHeader(structuredClone(header));
          } catch {
            return; // header and backing name do not fit one cluster (512-byte clusters): refused, fine
          }
          const cluster0 = new Uint8Array(clusterSize);
          cluster0.set(encoded.subarray(0, Math.min(encoded.length, clusterSize)));
          const fileSize = (4 + Math.ceil((l1Size * 8) / clusterSize)) * clusterSize + r.nbSnapshots * 64;
          const parsed = parseHeader('prop', cluster0, fileSize);
          for (const key of ['version', 'clusterBits', 'size', 'l1Size', 'l1TableOffset', 'refcountTableOffset', 'refcountTableClusters', 'nbSnapshots', 'snapshotsOffset', 'incompatibleFeatures', 'compatibleFeatures', 'refcountOrder', 'compressionType', 'backingFile', 'backingFormat'] as const) {
            expect({ key, value: parsed[key] }).toEqual({ key, value: header[key] });
          }
        },
      ),
      { numRuns: 300 },
    );
  });
});

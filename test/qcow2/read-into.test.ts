/**
 * readInto (convert's reused buffers) and concurrent reads through a tiny L2 cache must give exactly what
 * qemu-img convert gives: every extent kind overwrites stale buffer contents, and tables evicted while a read
 * waits for another table still map correctly.
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { FileStore, nodeResolver } from '../../src/io/node.js';
import { nodeCodecs } from '../../src/io/node-codecs.js';
import { openImage } from '../../src/qcow2/open.js';
import { makeImage, qemuConvertToRaw, tempDir } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** A backing file shorter than its overlay, and an overlay with data, zero, compressed and unallocated parts. */
async function chain(extendedL2: boolean, clusterSize: number): Promise<string> {
  const dir = tempDir();
  await makeImage({ path: join(dir, 'base.qcow2'), size: '3M', clusterSize }, [
    { offset: 0, length: 3 * MiB, pattern: 0x11 },
    { offset: MiB, length: 256 * KiB, zero: true },
  ]);
  return makeImage({ path: join(dir, 'top.qcow2'), size: '8M', clusterSize, extendedL2, backing: 'base.qcow2', backingFormat: 'qcow2' }, [
    { offset: 64 * KiB, length: 192 * KiB, pattern: 0x22 },
    { offset: 40 * KiB, length: 12 * KiB, pattern: 0x33 },
    { offset: 512 * KiB, length: 128 * KiB, zero: true },
    { offset: 2 * MiB, length: 256 * KiB, pattern: 0x44, compressed: true },
    { offset: 5 * MiB, length: 512 * KiB, pattern: 0x55 },
    { offset: 6 * MiB, length: 64 * KiB, zero: true },
  ]);
}

/** Deterministic pseudo-random (offset, length) pairs inside `size`, 512-byte granular and not. */
function ranges(size: number, count: number, seed: number): Array<[number, number]> {
  let x = seed;
  const next = () => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0), x);
  const out: Array<[number, number]> = [[0, size]];
  for (let i = 0; i < count; i++) {
    const offset = next() % size;
    const length = Math.min(size - offset, 1 + (next() % (1536 * KiB)));
    out.push(i % 2 ? [offset & ~511, Math.max(512, length & ~511)] : [offset, length]);
  }
  return out.filter(([o, l]) => o + l <= size);
}

describe.each([
  ['standard L2, 64 KiB clusters', false, 64 * KiB],
  ['extended L2, 64 KiB clusters', true, 64 * KiB],
  ['standard L2, 4 KiB clusters', false, 4 * KiB],
])('%s', (_name, extendedL2, clusterSize) => {
  it('readInto over a dirty buffer equals qemu-img convert, range by range', async () => {
    const path = await chain(extendedL2, clusterSize);
    const truth = await qemuConvertToRaw(path);
    const device = await openImage(await FileStore.open(path), { resolver: nodeResolver(), codecs: nodeCodecs() });
    try {
      expect(device.readInto).toBeDefined();
      for (const [offset, length] of ranges(truth.length, 60, 7)) {
        const buffer = new Uint8Array(length).fill(0xa5);
        await device.readInto!(offset, buffer);
        expect({ offset, length, same: Buffer.compare(buffer, truth.subarray(offset, offset + length)) === 0 }).toEqual({ offset, length, same: true });
      }
    } finally {
      await device.close();
    }
  });

  it('many concurrent reads through a two-table L2 cache equal qemu-img convert', async () => {
    const path = await chain(extendedL2, clusterSize);
    const truth = await qemuConvertToRaw(path);
    // The smallest cache (two tables) with reads spread over every L2 table: tables are evicted while other
    // reads wait for theirs.
    const device = await openImage(await FileStore.open(path), { resolver: nodeResolver(), codecs: nodeCodecs(), l2CacheSize: 2 * clusterSize });
    try {
      const all = ranges(truth.length, 200, 99).map(([o, l]) => [o, Math.min(l, 96 * KiB)] as const);
      const results = await Promise.all(all.map(([o, l]) => device.read(o, l)));
      all.forEach(([offset, length], i) => {
        expect({ offset, length, same: Buffer.compare(results[i]!, truth.subarray(offset, offset + length)) === 0 }).toEqual({ offset, length, same: true });
      });
    } finally {
      await device.close();
    }
  });
});

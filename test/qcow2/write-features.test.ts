/**
 * Write-side features against qemu-img/qemu-io: every refcount width, refcount table growth, VM state in
 * snapshots, compressed writes (sizes within 2 % of qemu-img convert -c), the metadata-overlap guard, autoclear
 * bits and unknown extensions, disk growth, and mutual readability with QEMU-written images.
 */
import { describe, expect, it } from 'vitest';
import { readFile, writeFile } from 'node:fs/promises';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { makeImage, qemuImg, qemuInfo, qemuIo, run, tempDir } from '../helpers/qemu.js';
import { createFile, expectClean, expectSameContents, openRw, pattern } from '../helpers/engine.js';
import { CorruptImageError } from '../../src/qcow2/errors.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { u64 } from '../../src/qcow2/bytes.js';

function noise(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** Half compressible text, half noise, some zero runs: what convert -c meets in practice. */
function mixed(length: number, seed: number): Uint8Array {
  const out = noise(length, seed);
  const text = new TextEncoder().encode('qcow86 writes compressed clusters the way QEMU packs them. ');
  for (let at = 0; at < length; at += 65536) {
    const kind = (at / 65536 + seed) % 3;
    const end = Math.min(length, at + 65536);
    if (kind === 0) for (let i = at; i < end; i++) out[i] = text[i % text.length]!;
    if (kind === 1) out.fill(0, at, at + 30000 > end ? end : at + 30000);
  }
  return out;
}

describe('refcount widths', () => {
  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    it(`refcount_bits=${bits}: our writes on a qemu-img image and qemu-io writes on ours stay consistent`, async () => {
      const dir = tempDir();
      const ours = await makeImage({ path: join(dir, 'ours.qcow2'), size: '16M', refcountBits: bits, clusterSize: 4096 }, [{ offset: 0, length: 300000, pattern: 1 }]);
      const image = await openRw(ours);
      await image.write(5 * 2 ** 20 + 100, noise(3 * 2 ** 20, bits));
      await image.discard(0, 65536);
      await image.close();
      const out = join(dir, 'ours.raw');
      await qemuImg(['convert', '-O', 'raw', ours, out]);
      const back = new Uint8Array(await readFile(out));
      expect(Buffer.from(back.subarray(5 * 2 ** 20 + 100, 8 * 2 ** 20 + 100)).equals(Buffer.from(noise(3 * 2 ** 20, bits)))).toBe(true);
      expect(back.subarray(0, 65536).every((b) => b === 0)).toBe(true);
      expect(back.subarray(65536, 300000).every((b) => b === 1)).toBe(true);
      await expectClean(ours);
      // qemu-io continues on what we wrote, then we continue on what it wrote.
      await qemuIo(['-c', 'write -P 7 9M 1M', ours]);
      const again = await openRw(ours);
      await again.write(12 * 2 ** 20, pattern(2 ** 20, 8));
      await again.close();
      await expectClean(ours);
      await qemuIo(['-c', 'read -P 7 9M 1M', '-c', 'read -P 8 12M 1M', ours]);
    });
  }
});

describe('refcount structures grow', () => {
  it('512-byte clusters with 64-bit refcounts: the refcount table moves several times and stays self-describing', async () => {
    const dir = tempDir();
    const path = join(dir, 'grow.qcow2');
    await createFile(path, { size: 64 * 2 ** 20, clusterSize: 512, refcountBits: 64 });
    const image = await openRw(path);
    const data = noise(24 * 2 ** 20, 5);
    for (let at = 0; at < data.length; at += 2 ** 20) await image.write(at + 7, data.subarray(at, at + 2 ** 20));
    await image.close();
    await expectClean(path);
    const raw = join(dir, 'expected.raw');
    const expected = new Uint8Array(64 * 2 ** 20);
    expected.set(data, 7);
    await writeFile(raw, expected);
    await expectSameContents(path, raw, ['-F', 'raw']);
  });
});

describe('file sizes follow qemu-io', () => {
  for (const [clusterSize, refcountBits] of [
    [512, 16],
    [512, 64],
    [1024, 64],
    [65536, 16],
  ] as const) {
    it(`sequential 1 MiB writes, ${clusterSize}-byte clusters, ${refcountBits}-bit refcounts: same file size as qemu-io`, async () => {
      const dir = tempDir();
      const ours = await makeImage({ path: join(dir, 'ours.qcow2'), size: '1G', clusterSize, refcountBits });
      const theirs = await makeImage({ path: join(dir, 'theirs.qcow2'), size: '1G', clusterSize, refcountBits });
      const image = await openRw(ours);
      for (let i = 0; i < 20; i++) await image.write(i * 2 ** 20, pattern(2 ** 20, i + 1));
      await image.close();
      await qemuIo(Array.from({ length: 20 }, (_, i) => ['-c', `write -P ${i + 1} ${i}M 1M`]).flat().concat([theirs]));
      await expectClean(ours);
      await expectSameContents(ours, theirs);
      expect(statSync(ours).size).toBe(statSync(theirs).size);
    });
  }
});

describe('snapshots with VM state', () => {
  it('VM state is stored past the disk end, listed by qemu-img, read back, and freed on delete', async () => {
    const dir = tempDir();
    const path = await makeImage({ path: join(dir, 'vm.qcow2'), size: '32M' }, [{ offset: 0, length: 2 ** 20, pattern: 3 }]);
    const state = mixed(700_000, 9);
    let image = await openRw(path);
    const snapshot = await image.createSnapshot('with-state', { vmState: state, vmClockNsec: 123_456_789 });
    await image.write(0, pattern(65536, 4));
    await image.close();
    await expectClean(path);
    const list = await qemuImg(['snapshot', '-l', path]);
    expect(list).toMatch(/with-state/);
    expect(list).toMatch(/684 KiB/); // qemu-img's VM SIZE column for 700000 bytes
    image = await openRw(path);
    expect(Buffer.from(await image.readVmState('with-state')).equals(Buffer.from(state))).toBe(true);
    expect(Buffer.from(await image.readVmState(snapshot)).equals(Buffer.from(state))).toBe(true);
    await image.applySnapshot('with-state');
    await image.close();
    await qemuIo(['-c', 'read -P 3 0 1M', path]);
    await expectClean(path);
    const before = (await qemuCheckAllocated(path));
    image = await openRw(path);
    await image.deleteSnapshot('with-state');
    await image.close();
    await expectClean(path);
    expect(await qemuCheckAllocated(path)).toBeLessThan(before); // the VM state clusters were given back
    expect(await qemuImg(['snapshot', '-l', path])).not.toMatch(/with-state/);
  });

  it('snapshots made by qemu-img are applied and deleted by us, and ours by qemu-img', async () => {
    const dir = tempDir();
    const path = await makeImage({ path: join(dir, 's.qcow2'), size: '8M' }, [{ offset: 0, length: 3 * 2 ** 20, pattern: 1 }]);
    await qemuImg(['snapshot', '-c', 'theirs', path]);
    await qemuIo(['-c', 'write -P 2 1M 1M', path]);
    let image = await openRw(path);
    await image.createSnapshot('ours');
    await image.write(0, pattern(100, 5));
    await image.applySnapshot('theirs');
    await image.close();
    await qemuIo(['-c', 'read -P 1 0 3M', path]);
    await qemuImg(['snapshot', '-a', 'ours', path]);
    await qemuIo(['-c', 'read -P 1 0 1M', '-c', 'read -P 2 1M 1M', path]);
    image = await openRw(path);
    await image.deleteSnapshot('theirs');
    await image.close();
    await qemuImg(['snapshot', '-d', 'ours', path]);
    await expectClean(path);
    await qemuIo(['-c', 'read -P 1 0 1M', '-c', 'read -P 2 1M 1M', '-c', 'read -P 1 2M 1M', path]);
  });
});

async function qemuCheckAllocated(path: string): Promise<number> {
  const r = JSON.parse((await run('qemu-img', ['check', '--output=json', path])).stdout);
  return r['image-end-offset'];
}

describe('compressed writes', () => {
  for (const type of ['zlib', 'zstd'] as const) {
    it(`${type}: convert -c by hand is within 2 % of qemu-img convert -c and reads back`, async () => {
      const dir = tempDir();
      const size = 8 * 2 ** 20;
      const data = mixed(size, type === 'zlib' ? 1 : 2);
      await writeFile(join(dir, 'src.raw'), data);
      await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, join(dir, 'src.raw'), join(dir, 'theirs.qcow2')]);
      const ours = join(dir, 'ours.qcow2');
      await createFile(ours, { size, compressionType: type === 'zlib' ? 'deflate' : 'zstd' });
      const image = await openRw(ours);
      for (let c = 0; c < size / 65536; c++) {
        const cluster = data.subarray(c * 65536, (c + 1) * 65536);
        if (cluster.every((b) => b === 0)) continue; // convert skips zero clusters
        await image.writeCompressed(c, cluster);
      }
      await image.close();
      await expectClean(ours);
      await expectSameContents(ours, join(dir, 'src.raw'), ['-F', 'raw']);
      const ratio = statSync(ours).size / statSync(join(dir, 'theirs.qcow2')).size;
      expect(ratio).toBeGreaterThan(0.98);
      expect(ratio).toBeLessThan(1.02);
      // Overwriting a compressed cluster partially allocates a normal one (never in place).
      const again = await openRw(ours);
      await again.write(65536 + 100, pattern(1000, 0xee));
      await again.close();
      await expectClean(ours);
      const expected = data.slice();
      expected.fill(0xee, 65536 + 100, 65536 + 1100);
      await writeFile(join(dir, 'expected.raw'), expected);
      await expectSameContents(ours, join(dir, 'expected.raw'), ['-F', 'raw']);
    });
  }
});

describe('metadata-overlap guard', () => {
  it('a refcount lie that would put data on an L2 table marks the image corrupt, fails the write, and loses nothing', async () => {
    const dir = tempDir();
    const path = await makeImage({ path: join(dir, 'o.qcow2'), size: '16M' }, [{ offset: 0, length: 65536, pattern: 1 }]);
    // Layout: header, refcount table, refcount block (cluster 2), L1 (3), L2 (4), data (5). Claim cluster 4 free.
    const bytes = new Uint8Array(await readFile(path));
    expect(u64(bytes.subarray(3 * 65536), 0) & 0xffffffffffff).toBe(4 * 65536);
    bytes[2 * 65536 + 4 * 2] = 0;
    bytes[2 * 65536 + 4 * 2 + 1] = 0;
    await writeFile(path, bytes);
    const image = await openRw(path);
    await image.write(2 * 2 ** 20, pattern(4096, 2)).then(
      () => {
        throw new Error('the write was not refused');
      },
      (error: unknown) => expect(error).toBeInstanceOf(CorruptImageError),
    );
    await image.close();
    const info = await qemuInfo(path);
    expect(info['format-specific'].data.corrupt).toBe(true);
    await qemuIo(['-r', '-c', 'read -P 1 0 64k', '-c', 'read -P 0 2M 4k', path]);
  });
});

describe('header bits on the first write', () => {
  it('unknown autoclear bits and the bitmaps bit are cleared; unknown header extensions are kept', async () => {
    const dir = tempDir();
    const path = await makeImage({ path: join(dir, 'a.qcow2'), size: '4M' });
    const bytes = new Uint8Array(await readFile(path));
    bytes[95] = 0x20; // autoclear bit 5: unknown
    // An unknown extension where the end marker was (after the feature-name table).
    let at = 112;
    while (((bytes[at]! << 24) | (bytes[at + 1]! << 16) | (bytes[at + 2]! << 8) | bytes[at + 3]!) !== 0) {
      const length = (bytes[at + 4]! << 24) | (bytes[at + 5]! << 16) | (bytes[at + 6]! << 8) | bytes[at + 7]!;
      at += 8 + Math.ceil(length / 8) * 8;
    }
    bytes.set([0x12, 0x34, 0x56, 0x78, 0, 0, 0, 5, 104, 101, 108, 108, 111, 0, 0, 0], at);
    await writeFile(path, bytes);
    const image = await openRw(path);
    await image.write(0, pattern(512, 9));
    await image.close();
    const after = new Uint8Array(await readFile(path));
    expect(after[95]).toBe(0);
    expect(Buffer.from(after).indexOf(Buffer.from([0x12, 0x34, 0x56, 0x78, 0, 0, 0, 5, 104, 101, 108, 108, 111]))).toBeGreaterThan(0);
    await expectClean(path);
  });

  it('persistent bitmaps we cannot update: bit 0 cleared, the stale bitmaps dropped and their clusters freed', async () => {
    const dir = tempDir();
    const path = await makeImage({ path: join(dir, 'b.qcow2'), size: '64M' }, [{ offset: 0, length: 2 ** 20, pattern: 1 }]);
    await qemuImg(['bitmap', '--add', path, 'b1']);
    await qemuImg(['bitmap', '--add', '-g', '65536', path, 'b2']);
    await qemuIo(['-c', 'write -P 2 2M 1M', path]); // gives the bitmaps dirty bits, so they own data clusters
    expect((await qemuInfo(path))['format-specific'].data.bitmaps).toHaveLength(2);
    const image = await openRw(path);
    await image.write(5 * 2 ** 20, pattern(65536, 3));
    await image.close();
    const info = await qemuInfo(path);
    expect(info['format-specific'].data.bitmaps ?? []).toHaveLength(0);
    await expectClean(path);
    await qemuIo(['-c', 'read -P 1 0 1M', '-c', 'read -P 2 2M 1M', '-c', 'read -P 3 5M 64k', path]);
  });

  it('lazy refcounts: the dirty bit is set while open for writing and cleared on close', async () => {
    const dir = tempDir();
    const path = await makeImage({ path: join(dir, 'l.qcow2'), size: '4M', lazyRefcounts: true });
    const image = await openRw(path);
    await image.write(0, pattern(65536, 1));
    await image.flush();
    expect((await qemuInfo(path))['dirty-flag']).toBe(true);
    await image.close();
    expect((await qemuInfo(path))['dirty-flag']).toBe(false);
    await expectClean(path);
  });
});

describe('disk growth', () => {
  it('grow() extends the L1 table and the new space is writable', async () => {
    const dir = tempDir();
    const path = join(dir, 'g.qcow2');
    await createFile(path, { size: 2 ** 20, clusterSize: 4096 });
    const image = await openRw(path);
    await image.write(0, pattern(2 ** 20, 1));
    await image.grow(64 * 2 ** 20);
    expect(image.virtualSize).toBe(64 * 2 ** 20);
    await image.write(60 * 2 ** 20, pattern(2 ** 20, 2));
    await image.close();
    await expectClean(path);
    expect((await qemuInfo(path))['virtual-size']).toBe(64 * 2 ** 20);
    await qemuIo(['-c', 'read -P 1 0 1M', '-c', 'read -P 0 1M 59M', '-c', 'read -P 2 60M 1M', path]);
    expect(image).toBeInstanceOf(Qcow2Image);
  });
});

/**
 * createQcow2 against qemu-img create: same file size, same qemu-img info, clean check, and writable by both.
 */
import { describe, expect, it } from 'vitest';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { makeImage, qemuInfo, qemuIo, run, tempDir, type ImageOptions } from '../helpers/qemu.js';
import { createFile, expectClean, expectSameContents, openRw, pattern } from '../helpers/engine.js';
import type { CreateOptions } from '../../src/qcow2/create.js';
import { FileStore } from '../../src/io/node.js';

const GiB = 2 ** 30;

const cases: { name: string; size: number; ours: Omit<CreateOptions, 'size'>; qemu: Omit<ImageOptions, 'size'> }[] = [
  { name: 'defaults', size: GiB, ours: {}, qemu: {} },
  { name: 'compat 0.10', size: GiB, ours: { compat: '0.10' }, qemu: { compat: '0.10' } },
  { name: '512-byte clusters (refcount blocks for the L1 table)', size: GiB, ours: { clusterSize: 512 }, qemu: { clusterSize: 512 } },
  { name: '2 MiB clusters', size: GiB, ours: { clusterSize: 2 * 2 ** 20 }, qemu: { clusterSize: 2 * 2 ** 20 } },
  { name: 'refcount_bits=1', size: GiB, ours: { refcountBits: 1 }, qemu: { refcountBits: 1 } },
  { name: 'refcount_bits=64, 4k clusters', size: GiB, ours: { refcountBits: 64, clusterSize: 4096 }, qemu: { refcountBits: 64, clusterSize: 4096 } },
  { name: 'extended L2', size: GiB, ours: { extendedL2: true }, qemu: { extendedL2: true } },
  { name: 'lazy refcounts', size: GiB, ours: { lazyRefcounts: true }, qemu: { lazyRefcounts: true } },
  { name: 'zstd', size: GiB, ours: { compressionType: 'zstd' }, qemu: { compressionType: 'zstd' } },
  { name: 'preallocation=metadata', size: 256 * 2 ** 20, ours: { preallocation: 'metadata' }, qemu: { preallocation: 'metadata' } },
  { name: 'preallocation=metadata, 4k clusters, odd size', size: 1000000, ours: { preallocation: 'metadata', clusterSize: 4096 }, qemu: { preallocation: 'metadata', clusterSize: 4096 } },
  { name: 'empty disk', size: 0, ours: {}, qemu: {} },
];

const INFO_KEYS = ['virtual-size', 'cluster-size', 'format', 'backing-filename', 'backing-filename-format'];
const SPECIFIC_KEYS = ['compat', 'compression-type', 'lazy-refcounts', 'refcount-bits', 'corrupt', 'extended-l2', 'data-file', 'data-file-raw'];

function pick(info: any): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const key of INFO_KEYS) out[key] = info[key];
  for (const key of SPECIFIC_KEYS) out[`specific.${key}`] = info['format-specific']?.data?.[key];
  return out;
}

describe('createQcow2 matches qemu-img create', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const dir = tempDir();
      const ours = join(dir, 'ours.qcow2');
      const theirs = join(dir, 'theirs.qcow2');
      await createFile(ours, { size: c.size, ...c.ours });
      await makeImage({ path: theirs, size: c.size, ...c.qemu });
      expect(statSync(ours).size).toBe(statSync(theirs).size);
      expect(pick(await qemuInfo(ours))).toEqual(pick(await qemuInfo(theirs)));
      await expectClean(ours);
      if (c.size > 0) {
        // Writable by qemu-io and by us, with the same result.
        await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x61 0 100k', ours]);
        const image = await openRw(ours);
        await image.write(c.size - 5000, pattern(5000, 0x62));
        await image.close();
        await qemuIo(['-f', 'qcow2', '-c', 'write -P 0x61 0 100k', '-c', `write -P 0x62 ${c.size - 5000} 5000`, theirs]);
        await expectClean(ours);
        await expectSameContents(ours, theirs);
      }
    });
  }

  it('10 GiB with 512-byte clusters and 64-bit refcounts: the refcount table grows many times while the L1 table is allocated', async () => {
    const dir = tempDir();
    await createFile(join(dir, 'ours.qcow2'), { size: 10 * GiB, clusterSize: 512, refcountBits: 64 });
    await makeImage({ path: join(dir, 'theirs.qcow2'), size: 10 * GiB, clusterSize: 512, refcountBits: 64 });
    await expectClean(join(dir, 'ours.qcow2'));
    // Same layout except where the last grown refcount table lands (at most two 512-byte clusters apart).
    expect(Math.abs(statSync(join(dir, 'ours.qcow2')).size - statSync(join(dir, 'theirs.qcow2')).size)).toBeLessThanOrEqual(1024);
  });

  it('refuses sizes whose L1 table would pass 32 MiB, as qemu-img does', async () => {
    const path = join(tempDir(), 'huge.qcow2');
    await expect(createFile(path, { size: 2 ** 40, clusterSize: 512 })).rejects.toThrow(/too large/);
    expect((await run('qemu-img', ['create', '-f', 'qcow2', '-o', 'cluster_size=512', path, '1T'])).exitCode).toBe(1);
  });

  it('backing file with its format recorded', async () => {
    const dir = tempDir();
    const base = await makeImage({ path: join(dir, 'base.qcow2'), size: '4M' }, [{ offset: 0, length: 4 * 2 ** 20, pattern: 0x33 }]);
    await createFile(join(dir, 'ours.qcow2'), { size: 4 * 2 ** 20, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
    await makeImage({ path: join(dir, 'theirs.qcow2'), size: 4 * 2 ** 20, backing: 'base.qcow2', backingFormat: 'qcow2' });
    expect(pick(await qemuInfo(join(dir, 'ours.qcow2')))).toEqual(pick(await qemuInfo(join(dir, 'theirs.qcow2'))));
    expect(statSync(join(dir, 'ours.qcow2')).size).toBe(statSync(join(dir, 'theirs.qcow2')).size);
    const image = await openRw(join(dir, 'ours.qcow2'));
    await image.write(1000, pattern(70000, 0x44)); // partial clusters: copy-on-write from the backing file
    await image.close();
    await qemuIo(['-c', 'write -P 0x44 1000 70000', join(dir, 'theirs.qcow2')]);
    await expectClean(join(dir, 'ours.qcow2'));
    await expectSameContents(join(dir, 'ours.qcow2'), join(dir, 'theirs.qcow2'));
  });

  it('external data file, raw and not', async () => {
    for (const raw of [false, true]) {
      const dir = tempDir();
      const dataStore = await FileStore.open(join(dir, 'ours.data'), { readOnly: false, create: true });
      await createFile(join(dir, 'ours.qcow2'), { size: 8 * 2 ** 20, dataFile: join(dir, 'ours.data'), dataStore, dataFileRaw: raw });
      await dataStore.close();
      await makeImage({ path: join(dir, 'theirs.qcow2'), size: 8 * 2 ** 20, dataFile: join(dir, 'theirs.data'), dataFileRaw: raw });
      expect(statSync(join(dir, 'ours.qcow2')).size).toBe(statSync(join(dir, 'theirs.qcow2')).size);
      expect(statSync(join(dir, 'ours.data')).size).toBe(statSync(join(dir, 'theirs.data')).size);
      const image = await openRw(join(dir, 'ours.qcow2'));
      await image.write(3000, pattern(200000, 0x71));
      await image.writeZeroes(65536, 65536);
      await image.discard(3 * 65536, 65536);
      await image.close();
      await qemuIo(['-c', 'write -P 0x71 3000 200000', '-c', 'write -z 64k 64k', '-c', 'discard 192k 64k', join(dir, 'theirs.qcow2')]);
      await expectClean(join(dir, 'ours.qcow2'));
      await expectSameContents(join(dir, 'ours.qcow2'), join(dir, 'theirs.qcow2'));
    }
  });
});

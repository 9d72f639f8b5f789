/**
 * checkImage against qemu-img check --output=json on clean, leaky and corrupted images (made with qemu-img and
 * qemu-io, then damaged by poking bytes), and repair (-r leaks / -r all) leaving images qemu-img calls clean.
 */
import { describe, expect, it } from 'vitest';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { makeImage, qemuCheck, qemuImg, qemuIo, run, tempDir, type ImageOptions, type ImageWrite } from '../helpers/qemu.js';
import { expectClean, expectSameContents } from '../helpers/engine.js';
import { FileStore, nodeResolver } from '../../src/io/node.js';
import { openImage } from '../../src/qcow2/open.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { checkImage, checkResultJson, type RepairMode } from '../../src/qcow2/check.js';
import { putU64, u32 } from '../../src/qcow2/bytes.js';

/** Bits 9..55 of a table entry (flags stripped). */
function entryOffset(bytes: Uint8Array, at: number): number {
  return (u32(bytes, at) & 0x00ffffff) * 2 ** 32 + ((u32(bytes, at + 4) & 0xfffffe00) >>> 0);
}

async function ourCheck(path: string, repair?: RepairMode) {
  const readOnly = repair === undefined;
  const image = await openImage(await FileStore.open(path, { readOnly }), { readOnly, repair: !readOnly, resolver: nodeResolver(), openBacking: false });
  if (!(image instanceof Qcow2Image)) throw new Error('not qcow2');
  try {
    return await checkImage(image, { repair });
  } finally {
    await image.close();
  }
}

function sorted(o: Record<string, unknown>): Record<string, unknown> {
  const out = { ...o };
  delete out.filename;
  return out;
}

async function expectAgreement(path: string): Promise<Record<string, unknown>> {
  const ours = checkResultJson(await ourCheck(path), path);
  const theirs = (await qemuCheck(path)).result;
  expect(sorted(ours)).toEqual(sorted(theirs));
  return ours;
}

type Poke = (bytes: Uint8Array, header: { l1: number; refcountTable: number; clusterSize: number }) => Uint8Array | void;

const base: ImageOptions = { size: '16M', clusterSize: 4096 };
const writes: ImageWrite[] = [
  { offset: 0, length: 1024 * 1024, pattern: 1 },
  { offset: 5 * 1024 * 1024, length: 64 * 1024, pattern: 2, compressed: true },
  { offset: 9 * 1024 * 1024, length: 12 * 1024, pattern: 3 },
];

const damage: { name: string; poke: Poke; expect: 'leaks' | 'corruptions' }[] = [
  {
    name: 'refcount set on a free cluster appended to the file (leak)',
    expect: 'leaks',
    poke: (b, h) => {
      const grown = new Uint8Array(Math.ceil(b.length / h.clusterSize) * h.clusterSize + h.clusterSize);
      grown.set(b);
      const block = entryOffset(grown, h.refcountTable);
      const free = grown.length / h.clusterSize - 1;
      grown[block + free * 2 + 1] = 1;
      return grown;
    },
  },
  {
    name: 'L1 entry dropped (its L2 table and data leak)',
    expect: 'leaks',
    poke: (b, h) => putU64(b, h.l1 + 8 * 4, 0),
  },
  {
    name: 'refcount of a data cluster zeroed (corruption)',
    expect: 'corruptions',
    poke: (b, h) => {
      const l2 = entryOffset(b, h.l1);
      const data = entryOffset(b, l2 + 8) / h.clusterSize;
      const block = entryOffset(b, h.refcountTable);
      b[block + data * 2] = 0;
      b[block + data * 2 + 1] = 0;
    },
  },
  {
    name: 'COPIED flag cleared on an L2 entry (corruption)',
    expect: 'corruptions',
    poke: (b, h) => {
      const l2 = entryOffset(b, h.l1);
      b[l2 + 8] = b[l2 + 8]! & 0x7f;
    },
  },
  {
    name: 'refcount table entry pointing outside the file (corruption, rebuilt)',
    expect: 'corruptions',
    poke: (b, h) => putU64(b, h.refcountTable + 8, 2 ** 40),
  },
];


describe('check agrees with qemu-img check', () => {
  for (const options of [
    { name: 'v3 4k', image: base },
    { name: 'v2 64k', image: { size: '16M', compat: '0.10' } as ImageOptions },
    { name: 'extended L2', image: { size: '16M', extendedL2: true } as ImageOptions },
    { name: 'refcount_bits=8', image: { size: '16M', refcountBits: 8, clusterSize: 8192 } as ImageOptions },
    { name: 'zstd', image: { size: '16M', compressionType: 'zstd' } as ImageOptions },
  ]) {
    it(`clean ${options.name} image, with and without snapshots`, async () => {
      const path = await makeImage({ ...options.image, path: join(tempDir(), 'c.qcow2') }, writes);
      await expectAgreement(path);
      await qemuImg(['snapshot', '-c', 'one', path]);
      await qemuIo(['-c', 'write -P 4 0 100k', '-c', 'write -z 9M 4k', path]);
      await qemuImg(['snapshot', '-c', 'two', path]);
      await qemuIo(['-c', 'discard 0 1M', path]);
      const ours = await expectAgreement(path);
      expect(ours['check-errors']).toBe(0);
    });
  }

  it('image with persistent bitmaps (directory, tables and bitmap data clusters are referenced)', async () => {
    const path = await makeImage({ size: '64M', path: join(tempDir(), 'b.qcow2') }, [{ offset: 0, length: 2 ** 20, pattern: 1 }]);
    await qemuImg(['bitmap', '--add', path, 'b1']);
    await qemuImg(['bitmap', '--add', '-g', '65536', path, 'b2']);
    await qemuIo(['-c', 'write -P 2 2M 3M', path]);
    const ours = await expectAgreement(path);
    expect(ours.leaks).toBeUndefined();
  });

  it('external data file image', async () => {
    const dir = tempDir();
    const path = await makeImage({ size: '16M', path: join(dir, 'd.qcow2'), dataFile: join(dir, 'd.raw') }, writes.filter((w) => !('compressed' in w)));
    await expectAgreement(path);
  });

  for (const d of damage) {
    it(`${d.name}: same counts, then repair makes qemu-img happy`, async () => {
      const dir = tempDir();
      const path = await makeImage({ ...base, path: join(dir, 'd.qcow2') }, writes);
      const pristine = join(dir, 'pristine.qcow2');
      await copyFile(path, pristine);
      const bytes = new Uint8Array(await readFile(path));
      const header = { l1: entryOffset(bytes, 40), refcountTable: entryOffset(bytes, 48), clusterSize: 4096 };
      await writeFile(path, d.poke(bytes, header) ?? bytes);
      const found = await expectAgreement(path);
      expect((found[d.expect] as number) > 0).toBe(true);
      const mode: RepairMode = d.expect === 'leaks' ? 'leaks' : 'all';
      const repaired = await ourCheck(path, mode);
      expect(repaired.leaks + repaired.corruptions).toBe(0);
      expect(repaired.leaksFixed + repaired.corruptionsFixed).toBeGreaterThan(0);
      await expectClean(path);
      if (d.name.startsWith('refcount') || d.name.startsWith('COPIED')) await expectSameContents(path, pristine);
    });
  }
});

describe('check on hostile images', () => {
  it('L2 entries pointing far past the end of the file: counted as corruptions in bounded memory', async () => {
    const dir = tempDir();
    const path = await makeImage({ path: join(dir, 'h.qcow2'), size: '1G' }, [{ offset: 0, length: 65536, pattern: 1 }]);
    const bytes = new Uint8Array(await readFile(path));
    const l2 = entryOffset(bytes, entryOffset(bytes, 40));
    // 8192 entries, each a different cluster around 2^50: every one a reference to a cluster with refcount 0.
    for (let i = 0; i < 8192; i++) putU64(bytes, l2 + i * 8, (2n ** 50n + BigInt(i) * 2n ** 36n) | (1n << 63n));
    await writeFile(path, bytes);
    const before = process.memoryUsage().rss;
    const result = await ourCheck(path);
    // Each entry is a reference a cluster or more past the end of the file (a corruption, not counted) whose
    // COPIED flag is also wrong: the same count as qemu-img's.
    expect(result.corruptions).toBeGreaterThanOrEqual(8192);
    const theirs = await run('qemu-img', ['check', '--output=json', path]);
    expect(JSON.parse(theirs.stdout).corruptions).toBe(result.corruptions);
    expect(result.messages.length).toBeLessThanOrEqual(20002);
    expect(process.memoryUsage().rss - before).toBeLessThan(256 * 1024 * 1024);
  });
});

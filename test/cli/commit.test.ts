/**
 * commit against qemu-img: the same chain is built twice (identical files), `qcow86 commit` runs on one copy and
 * `qemu-img commit` with the same options on the other. Then, for every image in the chain: the same guest-visible
 * contents (`qemu-img compare`), the same backing name/format and virtual size (`qemu-img info`), and a clean
 * `qemu-img check` for every image we wrote. Independently of qemu-img, the committed base must read what the top
 * read before the commit, and an emptied top must define nothing itself (`qemu-img map`: depth > 0 everywhere).
 */
import { describe, expect, it } from 'vitest';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { hostname } from 'node:os';
import { makeImage, qemuConvertToRaw, qemuImg, qemuInfo, qemuMap, run, tempDir, type ImageWrite } from '../helpers/qemu.js';
import { buildChain, contents, mapShape, sameAsQemu, twin, type LayerSpec } from '../helpers/chain.js';
import { qcow86 } from './cli.js';

const KiB = 1024;
const MiB = 1024 * KiB;

interface CommitCase {
  name: string;
  layers: LayerSpec[];
  /** Options for both tools, e.g. ['-d'] or ['-b', 'base.qcow2']. */
  args?: string[];
  /** The layer committed into (default: the one under the top). */
  into?: string;
}

const pattern = (offset: number, length: number, value: number): ImageWrite => ({ offset, length, pattern: value });
const zero = (offset: number, length: number, unmap = false): ImageWrite => ({ offset, length, zero: true, unmap });
const discard = (offset: number, length: number): ImageWrite => ({ offset, length, discard: true });

const overlayWrites: ImageWrite[] = [
  pattern(0, 64 * KiB, 2),
  pattern(100 * KiB, 3 * KiB, 3),
  zero(1 * MiB, 64 * KiB),
  zero(1280 * KiB, 128 * KiB, true),
  discard(2 * MiB, 128 * KiB),
  pattern(3 * MiB - 5 * KiB, 10 * KiB, 4),
];

const cases: CommitCase[] = [
  {
    name: 'v3 64k, overlay larger than base (base grows)',
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '8M', writes: [...overlayWrites, pattern(6 * MiB, 64 * KiB, 5), zero(7 * MiB, 64 * KiB)] },
    ],
  },
  {
    name: 'base larger than overlay (base keeps its size)',
    layers: [
      { file: 'base.qcow2', size: '8M', writes: [pattern(0, 8 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ],
  },
  {
    name: 'v2 (compat 0.10), 4k clusters',
    layers: [
      { file: 'base.qcow2', size: '4M', options: { compat: '0.10', clusterSize: 4096 }, writes: [pattern(0, 3 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', options: { compat: '0.10', clusterSize: 4096 }, writes: overlayWrites },
    ],
  },
  {
    name: 'extended_l2 overlay (subcluster writes and zeros) on an extended_l2 base',
    layers: [
      { file: 'base.qcow2', size: '4M', options: { extendedL2: true, clusterSize: 64 * KiB }, writes: [pattern(0, 4 * MiB, 1), zero(512 * KiB, 8 * KiB)] },
      {
        file: 'top.qcow2',
        size: '4M',
        options: { extendedL2: true, clusterSize: 64 * KiB },
        writes: [...overlayWrites, pattern(2 * MiB + 6 * KiB, 2 * KiB, 7), zero(2 * MiB + 16 * KiB, 4 * KiB), zero(520 * KiB, 2 * KiB)],
      },
    ],
  },
  {
    name: '512-byte overlay clusters on a 2 MiB-cluster base',
    layers: [
      { file: 'base.qcow2', size: '6M', options: { clusterSize: 2 * MiB }, writes: [pattern(0, 6 * MiB, 1)] },
      { file: 'top.qcow2', size: '6M', options: { clusterSize: 512 }, writes: [...overlayWrites, pattern(5 * MiB + 512, 1536, 9)] },
    ],
  },
  {
    name: 'deflate-compressed base (overwritten compressed clusters get new ones)',
    layers: [
      {
        file: 'base.qcow2',
        size: '4M',
        writes: Array.from({ length: 64 }, (_, i) => ({ offset: i * 64 * KiB, length: 64 * KiB, pattern: (i % 7) + 1, compressed: true })),
      },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ],
  },
  {
    name: 'raw base, overlay larger (the raw file grows)',
    layers: [
      { file: 'base.raw', size: '3M', options: { format: 'raw' }, writes: [pattern(0, 3 * MiB, 1)] },
      { file: 'top.qcow2', size: '5M', writes: [...overlayWrites, pattern(4 * MiB, 64 * KiB, 6), zero(3 * MiB, 64 * KiB)] },
    ],
  },
  {
    name: '3 levels: top into mid (a base with a backing file of its own)',
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'mid.qcow2', size: '4M', writes: [pattern(512 * KiB, MiB, 2), zero(3 * MiB, 64 * KiB)] },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ],
  },
  {
    name: '3 levels, smaller base: mid grows, the new area stays zero over its longer backing',
    layers: [
      { file: 'base.qcow2', size: '6M', writes: [pattern(0, 6 * MiB, 1)] },
      { file: 'mid.qcow2', size: '2M', writes: [pattern(512 * KiB, MiB, 2)] },
      { file: 'top.qcow2', size: '6M', writes: [...overlayWrites, pattern(5 * MiB, 64 * KiB, 3)] },
    ],
  },
  {
    name: '3 levels, -b base (commits top and mid; -b implies -d)',
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'mid.qcow2', size: '4M', writes: [pattern(512 * KiB, MiB, 2), zero(3 * MiB, 128 * KiB), discard(2 * MiB, 64 * KiB)] },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ],
    args: ['-b', 'base.qcow2'],
    into: 'base.qcow2',
  },
  {
    name: '4 levels, -b names a layer in the middle of the chain',
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'mid1.qcow2', size: '4M', options: { compat: '0.10' }, writes: [pattern(0, MiB, 2)] },
      { file: 'mid2.qcow2', size: '4M', writes: [pattern(MiB, MiB, 3), zero(0, 64 * KiB)] },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ],
    args: ['-b', 'mid1.qcow2'],
    into: 'mid1.qcow2',
  },
  {
    name: '-b naming the immediate backing file (still implies -d: the top is not emptied)',
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ],
    args: ['-b', 'base.qcow2'],
  },
  {
    name: '-d keeps the overlay as it is',
    layers: [
      { file: 'base.qcow2', size: '4M', options: { clusterSize: 4096 }, writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', options: { extendedL2: true }, writes: overlayWrites },
    ],
    args: ['-d'],
  },
  {
    name: 'overlay with internal snapshots is emptied without losing them',
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ],
  },
];

describe('commit', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const ours = tempDir();
      await buildChain(ours, c.layers);
      if (c.name.includes('snapshots')) {
        await qemuImg(['snapshot', '-c', 'snap', join(ours, 'top.qcow2')]);
      }
      const theirs = await twin(ours);
      const top = c.layers.at(-1)!.file;
      const into = c.into ?? c.layers.at(-2)!.file;
      const before = await contents(join(ours, top));

      const result = await qcow86(['commit', ...(c.args ?? []), top], { cwd: ours });
      expect(result.exitCode, result.stderr).toBe(0);
      expect(result.stdout).toBe('Image committed.\n');
      await qemuImg(['commit', ...(c.args ?? []), top], { cwd: theirs });

      const emptied = !(c.args ?? []).some((a) => a === '-d' || a === '-b');
      await sameAsQemu(ours, theirs, emptied ? [into, top] : [into]);
      // Independent truth: the base now reads what the top read (the base may be larger).
      const after = await contents(join(ours, into));
      expect(after.length).toBeGreaterThanOrEqual(before.length);
      expect(Buffer.compare(Buffer.from(after.subarray(0, before.length)), Buffer.from(before))).toBe(0);
      // The top still reads the same, through its chain.
      expect(Buffer.compare(Buffer.from(await contents(join(ours, top))), Buffer.from(before))).toBe(0);
      // What the top itself defines (depth 0; deeper entries describe the base, whose allocation legitimately
      // differs between writers): nothing when emptied, the same as qemu-img's otherwise.
      const own = async (path: string) => (await mapShape(path)).filter((e) => e.depth === 0 && e.present);
      const mine = await own(join(ours, top));
      if (emptied) expect(mine).toEqual([]);
      else expect(mine.length).toBeGreaterThan(0);
      expect(mine).toEqual(await own(join(theirs, top)));
      if (c.name.includes('snapshots')) {
        const snapshots = (await qemuInfo(join(ours, top))).snapshots;
        expect(snapshots?.map((s: any) => s.name)).toEqual(['snap']);
        const view = await qemuConvertToRaw(join(ours, top), { snapshot: 'snap' });
        expect(Buffer.compare(Buffer.from(view), Buffer.from(before))).toBe(0);
      }
    });
  }

  it('the default guest-style base: compressed qcow2 written by our convert -c', async () => {
    const dir = tempDir();
    await makeImage({ path: join(dir, 'src.qcow2'), size: '4M' }, [pattern(0, 3 * MiB, 1), pattern(3 * MiB, 64 * KiB, 2)]);
    const converted = await qcow86(['convert', '-c', '-O', 'qcow2', 'src.qcow2', 'base.qcow2'], { cwd: dir });
    expect(converted.exitCode, converted.stderr).toBe(0);
    await makeImage({ path: join(dir, 'top.qcow2'), size: '4M', backing: 'base.qcow2', backingFormat: 'qcow2' }, overlayWrites);
    const theirs = await twin(dir);
    const before = await contents(join(dir, 'top.qcow2'));
    expect((await qcow86(['commit', '-q', 'top.qcow2'], { cwd: dir })).stdout).toBe('');
    await qemuImg(['commit', '-q', 'top.qcow2'], { cwd: theirs });
    await sameAsQemu(dir, theirs, ['base.qcow2', 'top.qcow2']);
    expect(Buffer.compare(Buffer.from(await contents(join(dir, 'base.qcow2'))), Buffer.from(before))).toBe(0);
  });
});

describe('commit errors (exit codes and messages as qemu-img)', () => {
  it('an image without a backing file', async () => {
    const path = await makeImage({ size: '1M' });
    const ours = await qcow86(['commit', path]);
    const theirs = await run('qemu-img', ['commit', path]);
    expect(ours.exitCode).toBe(theirs.exitCode);
    expect(ours.exitCode).toBe(1);
    expect(ours.stderr).toContain('Image does not have a backing file');
  });

  it('-b that is not in the chain', async () => {
    const dir = tempDir();
    await buildChain(dir, [
      { file: 'base.qcow2', size: '1M' },
      { file: 'top.qcow2', size: '1M', writes: [pattern(0, 4096, 1)] },
    ]);
    for (const base of ['nothere.qcow2', 'top.qcow2']) {
      const ours = await qcow86(['commit', '-b', base, 'top.qcow2'], { cwd: dir });
      const theirs = await run('qemu-img', ['commit', '-b', base, 'top.qcow2'], { cwd: dir });
      expect(theirs.exitCode).toBe(1);
      expect(ours.exitCode).toBe(1);
      expect(ours.stderr).toContain(`Did not find '${base}' in the backing chain of 'top.qcow2'`);
    }
    // -b spelled as an absolute path or with ./ finds the same layer.
    expect((await qcow86(['commit', '-b', join(dir, 'base.qcow2'), 'top.qcow2'], { cwd: dir })).exitCode).toBe(0);
    expect((await qcow86(['commit', '-b', './base.qcow2', 'top.qcow2'], { cwd: dir })).exitCode).toBe(0);
  });

  it('a missing backing file', async () => {
    const dir = tempDir();
    await buildChain(dir, [
      { file: 'base.qcow2', size: '1M' },
      { file: 'top.qcow2', size: '1M' },
    ]);
    await run('rm', [join(dir, 'base.qcow2')]);
    const ours = await qcow86(['commit', 'top.qcow2'], { cwd: dir });
    expect(ours.exitCode).toBe((await run('qemu-img', ['commit', 'top.qcow2'], { cwd: dir })).exitCode);
    expect(ours.exitCode).toBe(1);
    expect(ours.stderr).toContain('base.qcow2');
  });

  it('a base another live process is writing is refused, naming the lock, and nothing changes', async () => {
    const dir = tempDir();
    await buildChain(dir, [
      { file: 'base.qcow2', size: '1M', writes: [pattern(0, MiB, 1)] },
      { file: 'top.qcow2', size: '1M', writes: [pattern(0, 4096, 2)] },
    ]);
    const before = await contents(join(dir, 'base.qcow2'));
    // This test process is alive: its PID in the lock file makes it the holder.
    await writeFile(join(dir, 'base.qcow2.qcow86.lock'), JSON.stringify({ pid: process.pid, host: hostname(), start: '' }));
    const ours = await qcow86(['commit', 'top.qcow2'], { cwd: dir });
    expect(ours.exitCode).toBe(1);
    expect(ours.stderr).toContain('Failed to get "write" lock');
    expect(ours.stderr).toContain('base.qcow2.qcow86.lock');
    expect(Buffer.compare(Buffer.from(await contents(join(dir, 'base.qcow2'))), Buffer.from(before))).toBe(0);
    // The top was not emptied either.
    expect((await qemuMap(join(dir, 'top.qcow2')))[0]!.depth).toBe(0);
  });
});

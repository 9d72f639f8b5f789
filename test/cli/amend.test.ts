/**
 * amend against qemu-img 7.2: the same amend run by both tools on identical copies gives the same header
 * fields (info's format-specific data), the same guest contents (qemu-img compare), a clean qemu-img check and,
 * for these images, byte-identical files; round trips 1.1 -> 0.10 -> 1.1; refusals exit 1 with qemu-img's
 * message.
 */
import { describe, expect, it } from 'vitest';
import { copyFile, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { makeImage, qemuImg, run, tempDir, type ImageOptions, type ImageWrite } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

const K = 1024;

async function formatSpecific(path: string): Promise<unknown> {
  const info = JSON.parse(await qemuImg(['info', '--output=json', path]));
  return { ...info['format-specific'], 'virtual-size': info['virtual-size'], snapshots: info.snapshots?.length ?? 0 };
}

async function expectClean(path: string): Promise<void> {
  const check = await run('qemu-img', ['check', path]);
  expect(check.exitCode, check.stdout + check.stderr).toBe(0);
  expect(check.stdout).toContain('No errors were found on the image.');
}

/** Runs `amend OPTIONS` with both tools on copies and compares everything. */
async function amendBoth(ours: string, theirs: string, options: string, identical = true): Promise<void> {
  const result = await qcow86(['amend', '-o', options, ours]);
  expect(result.exitCode, result.stderr).toBe(0);
  await qemuImg(['amend', '-o', options, theirs]);
  await expectClean(ours);
  expect(await formatSpecific(ours)).toEqual(await formatSpecific(theirs));
  expect((await run('qemu-img', ['compare', ours, theirs])).exitCode).toBe(0);
  if (identical) expect(Buffer.compare(await readFile(ours), await readFile(theirs)), `${options}: files differ`).toBe(0);
}

/** Both tools refuse `amend -o OPTIONS` with the same message, exit 1, and leave the file as it was. */
async function expectSameRefusal(ours: string, theirs: string, options: string, cwd?: string): Promise<void> {
  const before = await readFile(ours);
  const a = await qcow86(['amend', '-o', options, ours]);
  const b = await run('qemu-img', ['amend', '-o', options, theirs], cwd === undefined ? {} : { cwd });
  expect(b.exitCode, options).toBe(1);
  expect(a.exitCode, options).toBe(1);
  expect(a.stderr.replace(/^qcow86 amend: /gm, 'qemu-img: '), options).toBe(b.stderr);
  expect(Buffer.compare(await readFile(ours), before), `${options}: refused, yet the file changed`).toBe(0);
}

async function pair(options: ImageOptions, writes: ImageWrite[], prepare?: (path: string) => Promise<void>): Promise<[string, string]> {
  const ours = await makeImage(options, writes);
  if (prepare) await prepare(ours);
  const theirs = `${ours}.theirs`;
  await copyFile(ours, theirs);
  return [ours, theirs];
}

const WRITES: ImageWrite[] = [
  { offset: 0, length: 96 * K, pattern: 1 },
  { offset: 256 * K, length: 64 * K, zero: true },
  { offset: 512 * K, length: 64 * K, pattern: 2 },
  // Zero flag on an allocated cluster (zero-alloc): stays allocated, written with zeros.
  { offset: 512 * K, length: 64 * K, zero: true },
  { offset: 1024 * K, length: 64 * K, pattern: 3, compressed: true },
];

describe('amend', () => {
  it('1.1 -> 0.10 -> 1.1 with zero clusters; lazy_refcounts on and off', async () => {
    const [ours, theirs] = await pair({ size: '4M' }, WRITES);
    await amendBoth(ours, theirs, 'compat=0.10');
    expect((await formatSpecific(ours)) as object).toMatchObject({ data: { compat: '0.10' } });
    await amendBoth(ours, theirs, 'compat=1.1');
    await amendBoth(ours, theirs, 'lazy_refcounts=on');
    await amendBoth(ours, theirs, 'lazy_refcounts=off');
    await amendBoth(ours, theirs, 'compat=1.1,lazy_refcounts=on');
    await amendBoth(ours, theirs, 'lazy_refcounts=off,compat=0.10');
  });

  it('zero clusters shared with a snapshot: expanded in every table, COPIED only where the refcount is 1', async () => {
    const [ours, theirs] = await pair({ size: '4M' }, WRITES, async (path) => {
      await qemuImg(['snapshot', '-c', 'one', path]);
      await run('qemu-io', ['-c', 'write -z 64k 64k', '-c', 'write -z 2M 128k', path]);
    });
    const original = `${ours}.original`;
    await copyFile(ours, original);
    // qemu-img 7.2 sets COPIED on zeroed clusters whose L2 table has refcount 1 even when the cluster itself is
    // shared with the snapshot, which its own check then reports as errors: the files cannot be identical.
    await amendBoth(ours, theirs, 'compat=0.10', false);
    const ourSnapshot = await run('qemu-img', ['convert', '-l', 'one', '-O', 'raw', ours, `${ours}.snap.raw`]);
    const origSnapshot = await run('qemu-img', ['convert', '-l', 'one', '-O', 'raw', original, `${original}.snap.raw`]);
    expect(ourSnapshot.exitCode + origSnapshot.exitCode).toBe(0);
    expect(Buffer.compare(await readFile(`${ours}.snap.raw`), await readFile(`${original}.snap.raw`))).toBe(0);
    const back = await qcow86(['amend', '-o', 'compat=1.1', ours]);
    expect(back.exitCode, back.stderr).toBe(0);
    await expectClean(ours);
    expect((await run('qemu-img', ['compare', ours, original])).exitCode).toBe(0);
  });

  it('0.10 -> 1.1 (small clusters) and back; zero clusters over a backing file get zeroed clusters', async () => {
    const dir = tempDir();
    const base = await makeImage({ path: join(dir, 'base.qcow2'), size: '2M', clusterSize: 4096 }, [{ offset: 0, length: 2 * 1024 * K, pattern: 9 }]);
    const [ours, theirs] = await pair({ path: join(dir, 'top.qcow2'), size: '2M', clusterSize: 4096, backing: base, backingFormat: 'qcow2' }, [
      { offset: 8 * K, length: 8 * K, zero: true },
      { offset: 100 * K, length: 4 * K, pattern: 4 },
      { offset: 100 * K, length: 4 * K, zero: true },
      { offset: 1024 * K, length: 40 * K, pattern: 5 },
    ]);
    await amendBoth(ours, theirs, 'compat=0.10');
    // Zero clusters must still hide the backing file's data after the downgrade.
    const read = await run('qemu-io', ['-c', 'read -P 0 8k 8k', '-c', 'read -P 0 100k 4k', ours]);
    expect(read.stdout).not.toContain('Pattern verification failed');
    await amendBoth(ours, theirs, 'compat=1.1');
    const [v2ours, v2theirs] = await pair({ size: '1M', clusterSize: 512, compat: '0.10' }, [{ offset: 0, length: 3000, pattern: 6 }], async (path) => {
      await qemuImg(['snapshot', '-c', 's', path]);
    });
    await amendBoth(v2ours, v2theirs, 'compat=1.1');
    await amendBoth(v2ours, v2theirs, 'compat=0.10');
  });

  it('a dirty lazy-refcounts image gets its refcounts rebuilt before it is amended', async () => {
    const [ours, theirs] = await pair({ size: '2M', lazyRefcounts: true }, [], async (path) => {
      // qemu-io's abort leaves the dirty bit set and the refcounts not written.
      await run('qemu-io', ['-c', 'write -P 7 0 300k', '-c', 'abort', path]).catch(() => undefined);
    });
    expect(JSON.parse(await qemuImg(['info', '--output=json', ours]))['dirty-flag']).toBe(true);
    const result = await qcow86(['amend', '-o', 'compat=0.10,lazy_refcounts=off', ours]);
    expect(result.exitCode, result.stderr).toBe(0);
    await qemuImg(['amend', '-o', 'compat=0.10,lazy_refcounts=off', theirs]);
    await expectClean(ours);
    expect(await formatSpecific(ours)).toEqual(await formatSpecific(theirs));
    expect((await run('qemu-img', ['compare', ours, theirs])).exitCode).toBe(0);
  });

  it('refcount_bits: every width up and down, with a snapshot sharing clusters; with compat; refusals as qemu-img', { timeout: 180_000 }, async () => {
    // The counts are carried over into new structures where qemu-img puts its own elsewhere: compared through
    // info, check, the guest contents of the disk and of the snapshot, not byte for byte.
    const withSnapshot = async (options: ImageOptions): Promise<[string, string]> =>
      pair(options, WRITES, async (path) => {
        await qemuImg(['snapshot', '-c', 's1', path]);
        await run('qemu-io', ['-c', 'write -P 9 32k 64k', path]);
      });
    const sameSnapshot = async (ours: string, theirs: string) => {
      const dir = tempDir();
      await qemuImg(['convert', '-l', 's1', '-O', 'raw', ours, join(dir, 'o.raw')]);
      await qemuImg(['convert', '-l', 's1', '-O', 'raw', theirs, join(dir, 't.raw')]);
      expect(Buffer.compare(await readFile(join(dir, 'o.raw')), await readFile(join(dir, 't.raw')))).toBe(0);
    };
    const [ours, theirs] = await withSnapshot({ size: '2M' });
    for (const bits of [64, 2, 8, 32, 4, 16]) {
      await amendBoth(ours, theirs, `refcount_bits=${bits}`, false);
      await sameSnapshot(ours, theirs);
    }
    // Without snapshots and compressed clusters (several share a host cluster) every count is 1: one bit fits.
    const [o1, t1] = await pair({ size: '2M', clusterSize: 4096 }, WRITES.filter((write) => !('compressed' in write && write.compressed)));
    await amendBoth(o1, t1, 'refcount_bits=1', false);
    await amendBoth(o1, t1, 'refcount_bits=16', false);
    // With compat: version 2 up to 1.1 and a new width at once; 8 bits back to 16 and down to 0.10 at once.
    const [o2, t2] = await withSnapshot({ size: '2M', compat: '0.10' });
    await amendBoth(o2, t2, 'compat=1.1,refcount_bits=8', false);
    await amendBoth(o2, t2, 'refcount_bits=16,compat=0.10', false);
    await sameSnapshot(o2, t2);
    // A lazy-refcounts image: the counts held back are written before they are carried over.
    const [o3, t3] = await pair({ size: '2M', lazyRefcounts: true }, WRITES);
    await amendBoth(o3, t3, 'refcount_bits=4', false);

    const refused: [ImageOptions, string][] = [
      [{ size: '1M', compat: '0.10' }, 'refcount_bits=8'],
      [{ size: '1M' }, 'refcount_bits=8,compat=0.10'],
      [{ size: '1M' }, 'refcount_bits=3'],
      [{ size: '1M' }, 'refcount_bits=128'],
      [{ size: '1M' }, 'refcount_bits=0'],
      [{ size: '1M' }, 'refcount_bits=abc'],
    ];
    for (const [options, amend] of refused) {
      const [a, b] = await pair(options, []);
      await expectSameRefusal(a, b, amend);
    }
    // Two references to a cluster do not fit in one bit: refused before anything is written.
    const [o4, t4] = await withSnapshot({ size: '2M' });
    await expectSameRefusal(o4, t4, 'refcount_bits=1');
  });

  it('data_file renames the recorded external data file (or drops the name), data_file_raw=off clears the flag: byte-identical to qemu-img', async () => {
    const dir = tempDir();
    const withData = async (name: string, raw: boolean) => {
      const ours = await makeImage({ path: join(dir, `${name}.qcow2`), size: '1M', dataFile: `${name}.raw`, dataFileRaw: raw }, [{ offset: 0, length: 64 * K, pattern: 3 }]);
      await copyFile(ours, `${ours}.theirs`);
      return [ours, `${ours}.theirs`] as const;
    };
    for (const [name, raw, options] of [['rename', false, 'data_file=other.raw'], ['unname', false, 'data_file='], ['unraw', true, 'data_file_raw=off'], ['keepraw', true, 'data_file_raw=on'], ['both', true, 'data_file=other.raw,data_file_raw=off']] as const) {
      const [ours, theirs] = await withData(name, raw);
      const result = await qcow86(['amend', '-o', options, ours]);
      expect(result.exitCode, result.stderr).toBe(0);
      // qemu-img 7.2 opens a relative data file name from its working directory.
      const theirResult = await run('qemu-img', ['amend', '-o', options, theirs], { cwd: dir });
      expect(theirResult.exitCode, theirResult.stderr).toBe(0);
      expect(Buffer.compare(await readFile(ours), await readFile(theirs)), `${options}: files differ`).toBe(0);
    }
    // info reads an image whose data file lost its name, as qemu-img does (its data cannot be read).
    const unnamed = join(dir, 'unname.qcow2');
    const info = await qcow86(['info', '--output=json', unnamed]);
    expect(info.exitCode, info.stderr).toBe(0);
    const theirInfo = JSON.parse((await run('qemu-img', ['info', '--output=json', unnamed], { cwd: dir })).stdout);
    const ourInfo = JSON.parse(info.stdout);
    delete theirInfo['actual-size'];
    delete ourInfo['actual-size'];
    expect(ourInfo).toEqual(theirInfo);
    expect((await qcow86(['convert', '-O', 'raw', unnamed, join(dir, 'x.raw')])).exitCode).toBe(1);

    const [rawOurs, rawTheirs] = await withData('refused-raw', false);
    await expectSameRefusal(rawOurs, rawTheirs, 'data_file_raw=on', dir);
    await expectSameRefusal(rawOurs, rawTheirs, 'data_file_raw=maybe', dir);
    const [plainOurs, plainTheirs] = await pair({ size: '1M' }, []);
    await expectSameRefusal(plainOurs, plainTheirs, 'data_file=x.raw');
  });

  it('zstd without compressed clusters downgrades; refusals match qemu-img', async () => {
    const [zOurs, zTheirs] = await pair({ size: '1M', compressionType: 'zstd' }, [{ offset: 0, length: 64 * K, pattern: 1 }]);
    await amendBoth(zOurs, zTheirs, 'compat=0.10');

    const refused: [ImageOptions, ImageWrite[], string][] = [
      [{ size: '1M', compressionType: 'zstd' }, [{ offset: 0, length: 64 * K, pattern: 1, compressed: true }], 'compat=0.10'],
      [{ size: '1M', extendedL2: true }, [], 'compat=0.10'],
      [{ size: '1M', refcountBits: 8 }, [], 'compat=0.10'],
      [{ size: '1M' }, [], 'compat=0.10,lazy_refcounts=on'],
      [{ size: '1M' }, [], 'compat=2'],
      [{ size: '1M' }, [], 'lazy_refcounts=maybe'],
      [{ size: '1M' }, [], 'cluster_size=4k'],
      [{ size: '1M' }, [], 'extended_l2=on'],
      [{ size: '1M' }, [], 'foo=1'],
    ];
    for (const [options, writes, amend] of refused) {
      const [ours, theirs] = await pair(options, writes);
      const before = await readFile(ours);
      const a = await qcow86(['amend', '-o', amend, ours]);
      const b = await run('qemu-img', ['amend', '-o', amend, theirs]);
      expect(a.exitCode, amend).toBe(1);
      expect(b.exitCode, amend).toBe(1);
      expect(a.stderr.replace(/^qcow86 amend: /gm, 'qemu-img: '), amend).toBe(b.stderr);
      // Refused before anything was written.
      expect(Buffer.compare(await readFile(ours), before)).toBe(0);
    }
    const dir = tempDir();
    const withData = await makeImage({ path: join(dir, 'd.qcow2'), size: '1M', dataFile: 'd.raw' });
    const a = await qcow86(['amend', '-o', 'compat=0.10', withData]);
    expect(a.exitCode).toBe(1);
    expect(a.stderr).toContain('Cannot downgrade an image with a data file');
    const noOptions = await qcow86(['amend', withData]);
    expect(noOptions.exitCode).toBe(1);
    expect(noOptions.stderr).toContain('Must specify options (-o)');
    const backing = await qcow86(['amend', '-o', 'backing_file=x', withData]);
    expect(backing.stderr).toContain('Cannot amend the backing file');
    const raw = await qcow86(['amend', '-f', 'raw', '-o', 'size=1', withData]);
    expect(raw.stderr).toContain("Format driver 'raw' does not support option amendment");
  });
});

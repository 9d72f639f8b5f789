/**
 * create and convert -O qcow2 against qemu-img: the same command run by both tools on the same input must give
 * images qemu-img describes identically (info) and, for convert, the same guest contents and a size within 2 %.
 * Every image we write must pass qemu-img check with no errors and no leaks.
 */
import { describe, expect, it } from 'vitest';
import { writeFile } from 'node:fs/promises';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { makeImage, qemuImg, qemuIo, run, tempDir } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

const MiB = 1024 * 1024;

/** qemu-img info JSON minus what names or measures the file itself. */
async function infoOf(path: string, cwd: string): Promise<any> {
  const info = JSON.parse(await qemuImg(['info', '--output=json', path], { cwd }));
  delete info.filename;
  delete info['actual-size'];
  if (info['format-specific']?.data?.['data-file']) info['format-specific'].data['data-file'] = '(name)';
  return info;
}

async function expectClean(path: string, cwd?: string): Promise<void> {
  const result = await run('qemu-img', ['check', '--output=json', path], cwd ? { cwd } : {});
  expect(result.exitCode, result.stdout + result.stderr).toBe(0);
  const check = JSON.parse(result.stdout);
  expect(check['corruptions'] ?? 0).toBe(0);
  expect(check['leaks'] ?? 0).toBe(0);
}

const CREATE_CASES: string[][] = [
  ['1G'],
  ['1.5k'],
  ['-o', 'compat=0.10,cluster_size=4k', '10M'],
  ['-o', 'compat=v2', '3M'],
  ['-o', 'cluster_size=512,refcount_bits=1', '5M'],
  ['-o', 'cluster_size=2M,refcount_bits=64', '100G'],
  ['-o', 'extended_l2=on,compression_type=zstd,preallocation=metadata,lazy_refcounts=on,refcount_bits=64', '1M'],
  ['-o', 'preallocation=metadata,cluster_size=4096', '20M'],
  ['-o', 'lazy_refcounts=on,refcount_bits=8', '64M'],
  ['-o', 'data_file=data.bin,data_file_raw=on', '1M'],
  ['-o', 'data_file=data.bin', '2M'],
  ['-b', 'base.qcow2', '-F', 'qcow2'],
  ['-b', 'base.qcow2', '-F', 'qcow2', '-o', 'compat=0.10', '32M'],
  ['-u', '-b', 'missing.raw', '-F', 'raw', '1M'],
];

describe('create', () => {
  for (const args of CREATE_CASES) {
    it(`create -f qcow2 ${args.join(' ')}`, async () => {
      const ours = tempDir();
      const theirs = tempDir();
      for (const dir of [ours, theirs]) await qemuImg(['create', '-q', '-f', 'qcow2', 'base.qcow2', '7M'], { cwd: dir });
      const size = args.at(-1)!.match(/^\d/) ? [args.at(-1)!] : [];
      const options = size.length ? args.slice(0, -1) : args;
      const expected = await qemuImg(['create', '-f', 'qcow2', ...options, 'image.qcow2', ...size], { cwd: theirs });
      const result = await qcow86(['create', '-f', 'qcow2', ...options, 'image.qcow2', ...size], { cwd: ours });
      expect(result.stderr).toBe('');
      expect(result.exitCode).toBe(0);
      expect(result.stdout).toBe(expected);
      expect(await infoOf('image.qcow2', ours)).toEqual(await infoOf('image.qcow2', theirs));
      if (!args.includes('-u')) await expectClean('image.qcow2', ours);
      expect(statSync(join(ours, 'image.qcow2')).size).toBe(statSync(join(theirs, 'image.qcow2')).size);
    });
  }

  it('create -f raw makes a sparse file of the size', async () => {
    const dir = tempDir();
    const result = await qcow86(['create', '-f', 'raw', 'disk.img', '3M'], { cwd: dir });
    expect(result.stdout).toBe(await qemuImg(['create', '-f', 'raw', 'other.img', '3M'], { cwd: dir }).then((s) => s.replace('other.img', 'disk.img')));
    expect(statSync(join(dir, 'disk.img')).size).toBe(3 * MiB);
  });

  it('refuses a bad size and a missing backing file like qemu-img (exit 1)', async () => {
    const dir = tempDir();
    expect((await qcow86(['create', '-f', 'qcow2', 'x.qcow2', '12Q'], { cwd: dir })).exitCode).toBe(1);
    expect((await run('qemu-img', ['create', '-f', 'qcow2', 'x.qcow2', '12Q'], { cwd: dir })).exitCode).toBe(1);
    expect((await qcow86(['create', '-f', 'qcow2', '-b', 'nope', '-F', 'raw', 'y.qcow2'], { cwd: dir })).exitCode).toBe(1);
  });

  it('an image we create and qemu-io then writes into stays clean', async () => {
    const dir = tempDir();
    await qcow86(['create', '-f', 'qcow2', '-o', 'cluster_size=4k', 'image.qcow2', '16M'], { cwd: dir });
    await qemuIo(['-c', 'write -P 7 0 5M', '-c', 'write -z 1M 64k', 'image.qcow2'], { cwd: dir });
    await expectClean('image.qcow2', dir);
  });
});

/** A mixed source: random, zero and text megabytes, with some partial clusters. */
async function mixedRaw(dir: string, megabytes: number): Promise<string> {
  const path = join(dir, 'source.raw');
  const data = new Uint8Array(megabytes * MiB);
  let seed = 12345;
  for (let mb = 0; mb < megabytes; mb++) {
    const chunk = data.subarray(mb * MiB, (mb + 1) * MiB);
    if (mb % 3 === 0) for (let i = 0; i < chunk.length; i++) chunk[i] = (seed = (seed * 1103515245 + 12345) >>> 0) >>> 24;
    else if (mb % 3 === 2) chunk.set(new TextEncoder().encode(`line ${mb} of some text that compresses well\n`.repeat(20000)).subarray(0, MiB));
  }
  data.fill(0x5a, 5 * MiB + 4096, 5 * MiB + 8192);
  await writeFile(path, data);
  return path;
}

describe('convert -O qcow2', () => {
  const variants: string[][] = [[], ['-c'], ['-c', '-o', 'compression_type=zstd'], ['-o', 'cluster_size=4k'], ['-c', '-o', 'cluster_size=512'], ['-o', 'compat=0.10'], ['-c', '-o', 'extended_l2=on']];
  for (const options of variants) {
    it(`convert -O qcow2 ${options.join(' ')}: contents, size within 2 %, clean`, async () => {
      const dir = tempDir();
      await mixedRaw(dir, 12);
      await qemuImg(['convert', '-O', 'qcow2', ...options, 'source.raw', 'theirs.qcow2'], { cwd: dir });
      const result = await qcow86(['convert', '-O', 'qcow2', ...options, 'source.raw', 'ours.qcow2'], { cwd: dir });
      expect(result.stderr).toBe('');
      expect(result.exitCode).toBe(0);
      await expectClean('ours.qcow2', dir);
      expect((await run('qemu-img', ['compare', 'source.raw', 'ours.qcow2'], { cwd: dir })).exitCode).toBe(0);
      const ourSize = statSync(join(dir, 'ours.qcow2')).size;
      const theirSize = statSync(join(dir, 'theirs.qcow2')).size;
      expect(Math.abs(ourSize / theirSize - 1)).toBeLessThanOrEqual(0.02);
      expect(await infoOf('ours.qcow2', dir)).toEqual(await infoOf('theirs.qcow2', dir));
    });
  }

  it('converts a qcow2 with a backing chain (zstd compressed clusters in the source) into one image', async () => {
    const base = await makeImage({ size: '8M' }, [{ offset: 0, length: 2 * MiB, pattern: 1 }, { offset: 4 * MiB, length: MiB, pattern: 2 }]);
    const dir = join(base, '..');
    await makeImage({ path: join(dir, 'top.qcow2'), size: '8M', backing: 'image.qcow2', backingFormat: 'qcow2', compressionType: 'zstd' }, [
      { offset: 0, length: 65536, pattern: 3, compressed: true },
      { offset: 4 * MiB, length: 65536, zero: true },
    ]);
    const result = await qcow86(['convert', '-O', 'qcow2', '-c', 'top.qcow2', 'out.qcow2'], { cwd: dir });
    expect(result.exitCode, result.stderr).toBe(0);
    await expectClean('out.qcow2', dir);
    expect((await run('qemu-img', ['compare', 'top.qcow2', 'out.qcow2'], { cwd: dir })).exitCode).toBe(0);
    // And qemu-io can keep writing into what we wrote.
    await qemuIo(['-c', 'write -P 9 64k 64k', 'out.qcow2'], { cwd: dir });
    await expectClean('out.qcow2', dir);
  });

  it('-B writes only what differs from the new backing file; zeros over backing data become zero clusters', async () => {
    const base = await makeImage({ size: '8M' }, [{ offset: 0, length: 2 * MiB, pattern: 1 }, { offset: 4 * MiB, length: MiB, pattern: 2 }]);
    const dir = join(base, '..');
    await makeImage({ path: join(dir, 'top.qcow2'), size: '8M', backing: 'image.qcow2', backingFormat: 'qcow2' }, [
      { offset: 0, length: 65536, pattern: 1 },
      { offset: MiB, length: 65536, pattern: 3 },
      { offset: 4 * MiB, length: 65536, zero: true },
      { offset: 6 * MiB, length: 65536, pattern: 5 },
    ]);
    await qemuImg(['convert', '-O', 'qcow2', '-B', 'image.qcow2', '-F', 'qcow2', 'top.qcow2', 'theirs.qcow2'], { cwd: dir });
    const result = await qcow86(['convert', '-O', 'qcow2', '-B', 'image.qcow2', '-F', 'qcow2', 'top.qcow2', 'ours.qcow2'], { cwd: dir });
    expect(result.exitCode, result.stderr).toBe(0);
    await expectClean('ours.qcow2', dir);
    expect((await run('qemu-img', ['compare', 'top.qcow2', 'ours.qcow2'], { cwd: dir })).exitCode).toBe(0);
    expect(await infoOf('ours.qcow2', dir)).toEqual(await infoOf('theirs.qcow2', dir));
    const map = JSON.parse(await qemuImg(['map', '--output=json', 'ours.qcow2'], { cwd: dir }));
    const top = map.filter((e: any) => e.depth === 0).map((e: any) => [e.start, e.length, e.zero]);
    expect(top).toEqual([[MiB, 65536, false], [4 * MiB, 65536, true], [6 * MiB, 65536, false]]);
    expect(statSync(join(dir, 'ours.qcow2')).size).toBeLessThanOrEqual(statSync(join(dir, 'theirs.qcow2')).size);
  });
});

/**
 * measure against qemu-img 7.2: for many sources (qcow2 v2/v3 with data, compressed, zero and sparse clusters,
 * extended L2, a backing chain, an internal snapshot, persistent bitmaps; raw sparse and full; --size) and many
 * target options, our stdout and exit code equal qemu-img's exactly, in both output formats. Refused option
 * sets give qemu-img's message.
 */
import { describe, expect, it, beforeAll } from 'vitest';
import { join } from 'node:path';
import { makeImage, qemuImg, run, tempDir, type ImageWrite } from '../helpers/qemu.js';
import { qcow86, qcow86InProcess } from './cli.js';

const MiB = 1024 * 1024;

async function expectSame(args: string[], outputs = ['json']): Promise<void> {
  for (const output of outputs) {
    const full = [`--output=${output}`, ...args];
    const theirs = await run('qemu-img', ['measure', ...full]);
    const ours = await qcow86InProcess(['measure', ...full]);
    expect(ours.stdout, `measure ${full.join(' ')}\n${ours.stderr}`).toBe(theirs.stdout);
    expect(ours.exitCode, full.join(' ')).toBe(theirs.exitCode);
    if (theirs.exitCode !== 0) {
      // Same message lines, with our program name in place of qemu-img's.
      expect(ours.stderr.replace(/^qcow86 measure: /gm, 'qemu-img: ')).toBe(theirs.stderr);
    }
  }
}

/**
 * Writes aligned to the source's allocation unit (cluster, or subcluster with extended L2): QEMU fills the rest
 * of a partly written cluster with zero-range requests whose holes its block status sees only for a while
 * (timing-dependent on ext4), so partial clusters would make qemu-img's own answer unstable.
 */
function writes(unit: number, compressedCluster?: number): ImageWrite[] {
  const list: ImageWrite[] = [
    { offset: 0, length: 2 * unit, pattern: 1 },
    { offset: 3 * MiB + unit, length: unit, pattern: 2 },
    { offset: 7 * MiB, length: 64 * 1024, zero: true },
    { offset: 9 * MiB + 3 * unit, length: 5 * unit, pattern: 4 },
  ];
  if (compressedCluster) list.push({ offset: 5 * MiB, length: 2 * compressedCluster, pattern: 3, compressed: true });
  return list;
}

const TARGETS: string[][] = [
  [],
  ['-O', 'raw'],
  ['-O', 'qcow2'],
  ['-O', 'qcow2', '-o', 'compat=0.10'],
  ['-O', 'qcow2', '-o', 'cluster_size=512'],
  ['-O', 'qcow2', '-o', 'cluster_size=4k,refcount_bits=1'],
  ['-O', 'qcow2', '-o', 'cluster_size=2M,refcount_bits=64'],
  ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k'],
  ['-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=16k,refcount_bits=8'],
  ['-O', 'qcow2', '-o', 'preallocation=metadata'],
  ['-O', 'qcow2', '-o', 'preallocation=falloc'],
  ['-O', 'qcow2', '-o', 'preallocation=full,cluster_size=8k'],
  ['-O', 'qcow2', '-o', 'compression_type=zstd,lazy_refcounts=on'],
  ['-O', 'qcow2', '-o', 'backing_file=whatever.qcow2'],
  ['-O', 'qcow2', '-o', 'compat=v2,cluster_size=1k', '-o', 'data_file=x.raw'],
];

describe('measure', () => {
  const sources: Record<string, { file: string; format?: string; extra?: string[] }> = {};

  beforeAll(async () => {
    const dir = tempDir();
    const k = 1024;
    sources.v3 = { file: await makeImage({ path: join(dir, 'v3.qcow2'), size: '20M' }, writes(64 * k, 64 * k)) };
    sources.v2small = { file: await makeImage({ path: join(dir, 'v2.qcow2'), size: '20M', compat: '0.10', clusterSize: 4096 }, writes(4 * k, 4 * k)) };
    sources.extl2 = { file: await makeImage({ path: join(dir, 'ext.qcow2'), size: '20M', extendedL2: true, clusterSize: 128 * k }, writes(4 * k, 128 * k)) };
    sources.empty = { file: await makeImage({ path: join(dir, 'empty.qcow2'), size: '1G' }) };
    sources.oddSize = { file: await makeImage({ path: join(dir, 'odd.qcow2'), size: 1000 * 1000 + 512, clusterSize: 512 }, [{ offset: 512, length: 4096, pattern: 7 }]) };
    // Raw files have no clusters: unaligned writes leave file-system holes around them (zero writes would not:
    // whether they punch holes depends on the file system).
    const rawWrites: ImageWrite[] = [
      { offset: 0, length: 100 * k, pattern: 1 },
      { offset: 3 * MiB + 512, length: 4096, pattern: 2 },
      { offset: 9 * MiB + 12345, length: 70000, pattern: 4 },
    ];
    sources.raw = { file: await makeImage({ path: join(dir, 'sparse.raw'), format: 'raw', size: '20M' }, rawWrites), format: 'raw' };
    sources.rawFull = { file: join(dir, 'full.raw'), format: 'raw' };
    await qemuImg(['create', '-q', '-f', 'raw', '-o', 'preallocation=full', sources.rawFull.file, '3M']);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 9 0 3M', sources.rawFull.file]);
    const base = await makeImage({ path: join(dir, 'base.qcow2'), size: '20M' }, [{ offset: 0, length: 6 * MiB, pattern: 5 }]);
    sources.overlay = { file: await makeImage({ path: join(dir, 'overlay.qcow2'), size: '24M', backing: base, backingFormat: 'qcow2' }, [{ offset: 10 * MiB, length: MiB, pattern: 6 }]) };
    // A snapshot whose contents differ from the active layer's, and a smaller disk at the time it was taken.
    const snap = await makeImage({ path: join(dir, 'snap.qcow2'), size: '8M' }, [{ offset: 0, length: 2 * MiB, pattern: 1 }]);
    await qemuImg(['snapshot', '-c', 'one', snap]);
    await qemuImg(['resize', '-q', snap, '16M']);
    await run('qemu-io', ['-c', 'write -P 2 10M 3M', '-c', 'discard 0 2M', snap]);
    sources.snapshot = { file: snap, extra: ['-l', 'one'] };
    sources.snapshotById = { file: snap, extra: ['-l', '1'] };
    const bitmaps = await makeImage({ path: join(dir, 'bitmaps.qcow2'), size: '1G' }, [{ offset: 0, length: MiB, pattern: 1 }]);
    await qemuImg(['bitmap', '--add', bitmaps, 'b0']);
    await qemuImg(['bitmap', '--add', '-g', '4096', bitmaps, 'a-longer-bitmap-name']);
    sources.bitmaps = { file: bitmaps };
  });

  for (const target of TARGETS) {
    it(`sources → ${target.join(' ') || '(default raw)'}`, async () => {
      for (const [name, { file, format, extra }] of Object.entries(sources)) {
        const args = [...target, ...(format ? ['-f', format] : []), ...(extra ?? []), file];
        await expectSame(args).catch((error) => {
          throw new Error(`source ${name}: ${(error as Error).message}`);
        });
      }
    });
  }

  it('--size, alone and with target options', async () => {
    for (const size of ['0', '1', '1.5k', '1G', '3T', '123456789']) {
      for (const target of TARGETS) await expectSame(['--size', size, ...target]);
    }
    await expectSame(['--size', '1G', '-O', 'qcow2', '-o', 'size=5G']);
  });

  it('the CLI binary prints both formats like qemu-img', async () => {
    for (const args of [['-O', 'qcow2', sources.bitmaps!.file], ['--size', '10G', '-O', 'qcow2', '-o', 'cluster_size=4k'], [sources.raw!.file]]) {
      for (const output of ['human', 'json']) {
        const theirs = await run('qemu-img', ['measure', `--output=${output}`, ...args]);
        const ours = await qcow86(['measure', `--output=${output}`, ...args]);
        expect(ours.stdout).toBe(theirs.stdout);
        expect(ours.exitCode).toBe(0);
      }
    }
    await expectSame(['-O', 'qcow2', '-o', 'cluster_size=512', sources.v3!.file], ['human']);
  });

  it('refuses what qemu-img refuses, with its message', async () => {
    const base = ['--size', '1G', '-O', 'qcow2', '-o'];
    for (const options of [
      'compat=2', 'cluster_size=1000', 'cluster_size=4M', 'cluster_size=abc', 'preallocation=bogus', 'refcount_bits=3',
      'refcount_bits=128', 'compat=0.10,refcount_bits=8', 'extended_l2=maybe', 'extended_l2=on,cluster_size=4k', 'foo=1',
    ]) {
      await expectSame([...base, options]);
    }
    await expectSame(['--size', '1G', '-O', 'raw', '-o', 'cluster_size=4k']);
    await expectSame(['--size', '64T', '-O', 'qcow2', '-o', 'cluster_size=512']);
    await expectSame(['-O', 'qcow2']);
    await expectSame(['-O', 'qcow2', '-o', 'size=1G']);
    await expectSame(['--size', '1G', '-O', 'bogus']);
    await expectSame(['--size', '1G', '-O', 'qcow2', sources.v3!.file]);
    await expectSame(['-O', 'qcow2', '-l', 'nosuch', sources.snapshot!.file]);
  });
});

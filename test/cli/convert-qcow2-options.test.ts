/**
 * convert -O qcow2 with -l (an internal snapshot, read at the image's current size as qemu-img does) and -p
 * (qemu-img's progress lines on stdout), against qemu-img convert on the same sources.
 */
import { describe, expect, it } from 'vitest';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { makeImage, qemuImg, run, tempDir } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

const MiB = 1024 * 1024;

async function expectSameConversion(args: string[], src: string, dir: string, label: string): Promise<void> {
  const ours = join(dir, `${label}.ours.qcow2`);
  const theirs = join(dir, `${label}.theirs.qcow2`);
  const result = await qcow86(['convert', ...args, src, ours]);
  expect(result.exitCode, result.stderr).toBe(0);
  await qemuImg(['convert', ...args, src, theirs]);
  const check = await run('qemu-img', ['check', ours]);
  expect(check.exitCode, check.stdout).toBe(0);
  expect((await run('qemu-img', ['compare', '-s', ours, theirs])).exitCode, label).toBe(0);
  const [a, b] = [JSON.parse(await qemuImg(['info', '--output=json', ours])), JSON.parse(await qemuImg(['info', '--output=json', theirs]))];
  expect(a['virtual-size']).toBe(b['virtual-size']);
  // Without compression the layout is deterministic: the same file size as qemu-img's.
  if (!args.includes('-c')) expect((await stat(ours)).size, label).toBe((await stat(theirs)).size);
}

describe('convert -O qcow2 -l / -p', () => {
  it('-l NAME and -l ID: the snapshot at the current disk size, plain and compressed', async () => {
    const dir = tempDir();
    const src = await makeImage({ path: join(dir, 'src.qcow2'), size: '8M' }, [{ offset: 0, length: 2 * MiB, pattern: 1 }, { offset: 6 * MiB, length: 4096, pattern: 5 }]);
    await qemuImg(['snapshot', '-c', 'one', src]);
    await qemuImg(['resize', '-q', src, '16M']);
    await run('qemu-io', ['-c', 'write -P 2 10M 3M', '-c', 'discard 0 1M', '-c', 'write -z 6M 64k', src]);
    await qemuImg(['snapshot', '-c', 'two', src]);
    await run('qemu-io', ['-c', 'write -P 3 0 64k', src]);
    await expectSameConversion(['-O', 'qcow2', '-l', 'one'], src, dir, 'one');
    await expectSameConversion(['-O', 'qcow2', '-l', '2'], src, dir, 'two');
    await expectSameConversion(['-O', 'qcow2', '-c', '-l', 'one'], src, dir, 'one-c');
    await expectSameConversion(['-O', 'qcow2', '-o', 'cluster_size=4k', '-l', 'two'], src, dir, 'two-4k');
    const missing = await qcow86(['convert', '-O', 'qcow2', '-l', 'nosuch', src, join(dir, 'x.qcow2')]);
    expect(missing.exitCode).toBe(1);
    expect(missing.stderr).toContain("Can't find snapshot");
  });

  it('-l on an overlay: past the snapshot disk end the backing file shows through', async () => {
    const dir = tempDir();
    const base = await makeImage({ path: join(dir, 'base.qcow2'), size: '8M' }, [{ offset: 0, length: 8 * MiB, pattern: 7 }]);
    const top = await makeImage({ path: join(dir, 'top.qcow2'), size: '4M', backing: base, backingFormat: 'qcow2' }, [{ offset: MiB, length: MiB, pattern: 8 }]);
    await qemuImg(['snapshot', '-c', 'small', top]);
    await qemuImg(['resize', '-q', top, '8M']);
    await run('qemu-io', ['-c', 'write -P 9 0 512k', top]);
    await expectSameConversion(['-O', 'qcow2', '-l', 'small'], top, dir, 'overlay');
  });

  it('-p prints qemu-img progress lines on stdout, from 0.00 to 100.00; -q silences them', async () => {
    const dir = tempDir();
    const src = await makeImage({ path: join(dir, 'src.qcow2'), size: '24M' }, [{ offset: 0, length: 20 * MiB, pattern: 1 }]);
    for (const format of ['qcow2', 'raw']) {
      const result = await qcow86(['convert', '-p', '-O', format, src, join(dir, `p.${format}`)]);
      expect(result.exitCode, result.stderr).toBe(0);
      const theirs = await qemuImg(['convert', '-p', '-O', format, src, join(dir, `q.${format}`)]);
      for (const out of [result.stdout, theirs]) {
        expect(out).toMatch(/^( {4}\(\d{1,3}\.\d\d\/100%\)\r)+\n$/);
        expect(out.startsWith('    (0.00/100%)\r')).toBe(true);
        expect(out.endsWith('    (100.00/100%)\r\n')).toBe(true);
      }
      const values = [...result.stdout.matchAll(/\((\d+\.\d\d)\//g)].map((m) => Number(m[1]));
      expect(values).toEqual([...values].sort((a, b) => a - b));
      expect(values.length).toBeGreaterThan(2);
      const quiet = await qcow86(['convert', '-p', '-q', '-O', format, src, join(dir, `quiet.${format}`)]);
      expect(quiet.stdout).toBe('');
    }
  });
});

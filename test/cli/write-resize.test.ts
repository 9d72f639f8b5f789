/**
 * resize against qemu-img: the same resize run by both tools on copies of one image gives the same guest
 * contents and virtual size, and our result passes qemu-img check; shrinking needs --shrink, as in qemu-img.
 */
import { describe, expect, it } from 'vitest';
import { copyFile, stat } from 'node:fs/promises';
import { makeImage, qemuImg, run } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

const MiB = 1024 * 1024;

async function same(ours: string, theirs: string): Promise<void> {
  const check = await run('qemu-img', ['check', '--output=json', ours]);
  expect(check.exitCode, check.stdout + check.stderr).toBe(0);
  expect((await run('qemu-img', ['compare', '-s', ours, theirs])).exitCode).toBe(0);
  const a = JSON.parse(await qemuImg(['info', '--output=json', ours]));
  const b = JSON.parse(await qemuImg(['info', '--output=json', theirs]));
  expect(a['virtual-size']).toBe(b['virtual-size']);
}

describe('resize', () => {
  const cases: { options: Partial<Parameters<typeof makeImage>[0]>; steps: string[][] }[] = [
    { options: { clusterSize: 512 }, steps: [['+64M'], ['--shrink', '3M'], ['+5M']] },
    { options: {}, steps: [['--shrink', '1500k'], ['100G']] },
    { options: { extendedL2: true, clusterSize: 65536 }, steps: [['--shrink', '2M'], ['+64k']] },
    { options: { compat: '0.10', clusterSize: 4096 }, steps: [['--shrink', '5000k'], ['+8M']] },
  ];
  for (const { options, steps } of cases) {
    it(`${JSON.stringify(options)}: ${steps.map((s) => s.join(' ')).join(', ')}`, async () => {
      const ours = await makeImage({ size: '8M', ...options }, [
        { offset: 0, length: 3 * MiB, pattern: 1 },
        { offset: 6 * MiB, length: MiB, pattern: 2 },
        { offset: 7 * MiB, length: 65536, zero: true },
      ]);
      const theirs = `${ours}.theirs`;
      await copyFile(ours, theirs);
      for (const step of steps) {
        const result = await qcow86(['resize', ...step.slice(0, -1), ours, step.at(-1)!]);
        expect(result.exitCode, result.stderr).toBe(0);
        expect(result.stdout).toBe('Image resized.\n');
        await qemuImg(['resize', '-q', ...step.slice(0, -1), theirs, step.at(-1)!]);
        await same(ours, theirs);
      }
    });
  }

  it('with internal snapshots (shared clusters stay counted right)', async () => {
    const ours = await makeImage({ size: '8M', clusterSize: 4096 }, [{ offset: 0, length: 8 * MiB, pattern: 3 }]);
    await qemuImg(['snapshot', '-c', 'snap', ours]);
    const theirs = `${ours}.theirs`;
    await copyFile(ours, theirs);
    expect((await qcow86(['resize', '--shrink', ours, '1M'])).exitCode).toBe(0);
    await qemuImg(['resize', '-q', '--shrink', theirs, '1M']);
    await same(ours, theirs);
    expect((await qcow86(['resize', ours, '+20M'])).exitCode).toBe(0);
    await qemuImg(['resize', '-q', theirs, '+20M']);
    await same(ours, theirs);
  });

  it('refuses to shrink without --shrink (exit 1), like qemu-img', async () => {
    const path = await makeImage({ size: '8M' });
    expect((await qcow86(['resize', path, '-1M'])).exitCode).toBe(1);
    expect((await run('qemu-img', ['resize', path, '-1M'])).exitCode).toBe(1);
    expect(JSON.parse(await qemuImg(['info', '--output=json', path]))['virtual-size']).toBe(8 * MiB);
  });

  it('raw images', async () => {
    const path = await makeImage({ size: '8M', format: 'raw' });
    expect((await qcow86(['resize', '-f', 'raw', path, '+1M'])).exitCode).toBe(0);
    expect(JSON.parse(await qemuImg(['info', '--output=json', path]))['virtual-size']).toBe(9 * MiB);
  });

  it('--shrink drops refcount blocks left counting nothing and truncates behind them: file size and check output as qemu-img', async () => {
    // 512 B clusters: a refcount block covers 128 KiB; 4 KiB clusters: 8 MiB, so 16 MiB of data spans both.
    for (const clusterSize of [512, 4096]) {
      const ours = await makeImage({ size: '16M', clusterSize }, [{ offset: 0, length: 16 * MiB, pattern: 1 }]);
      const theirs = `${ours}.theirs`;
      await copyFile(ours, theirs);
      expect((await qcow86(['resize', '-q', '--shrink', ours, '256k'])).exitCode).toBe(0);
      await qemuImg(['resize', '-q', '--shrink', theirs, '256k']);
      await same(ours, theirs);
      expect((await stat(ours)).size, `cluster_size ${clusterSize}`).toBe((await stat(theirs)).size);
      const [a, b] = [await run('qemu-img', ['check', ours]), await run('qemu-img', ['check', theirs])];
      expect(a.stdout).toBe(b.stdout);
      // With 4 KiB clusters the data's refcount block ends the file: only dropping it lets the file shrink.
      if (clusterSize === 4096) expect((await stat(ours)).size).toBeLessThan(2 * MiB);
    }
  }, 240_000);
});

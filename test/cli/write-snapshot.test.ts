/**
 * snapshot -l/-c/-a/-d against qemu-img: our listing equals qemu-img's for the same file, snapshots we create
 * are visible to qemu-img (and the other way round), apply restores what qemu-io reads back, and every image
 * stays clean under qemu-img check.
 */
import { describe, expect, it } from 'vitest';
import { makeImage, qemuImg, qemuIo, run } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

async function expectClean(path: string): Promise<void> {
  const result = await run('qemu-img', ['check', '--output=json', path]);
  expect(result.exitCode, result.stdout + result.stderr).toBe(0);
}

describe('snapshot', () => {
  it('-c, -l, -a, -d interoperate with qemu-img', async () => {
    const path = await makeImage({ size: '4M', clusterSize: 4096 }, [{ offset: 0, length: 1024 * 1024, pattern: 1 }]);
    expect((await qcow86(['snapshot', '-c', 'one', path])).exitCode).toBe(0);
    await qemuIo(['-c', 'write -P 2 0 64k', path]);
    await qemuImg(['snapshot', '-c', 'two', path]);
    await expectClean(path);
    // Every column, ICOUNT included: snapshot -c stores icount 0, as qemu-img does.
    const ours = await qcow86(['snapshot', '-l', path]);
    expect(ours.exitCode).toBe(0);
    expect(ours.stdout).toBe(await qemuImg(['snapshot', '-l', path]));
    expect((await qcow86(['snapshot', '-a', 'one', path])).exitCode).toBe(0);
    await qemuIo(['-c', 'read -P 1 0 1M', path]);
    await expectClean(path);
    expect((await qcow86(['snapshot', '-a', 'two', path])).exitCode).toBe(0);
    await qemuIo(['-c', 'read -P 2 0 64k', '-c', 'read -P 1 64k 960k', path]);
    expect((await qcow86(['snapshot', '-d', 'one', path])).exitCode).toBe(0);
    await expectClean(path);
    const info = JSON.parse(await qemuImg(['info', '--output=json', path]));
    expect(info.snapshots.map((s: any) => s.name)).toEqual(['two']);
    await qemuImg(['snapshot', '-d', 'two', path]);
    expect((await qcow86(['snapshot', '-l', path])).stdout).toBe('');
    await expectClean(path);
  });

  it('a missing snapshot is an error (exit 1) for -a and -d, as in qemu-img', async () => {
    const path = await makeImage({ size: '1M' });
    expect((await qcow86(['snapshot', '-a', 'nope', path])).exitCode).toBe(1);
    expect((await qcow86(['snapshot', '-d', 'nope', path])).exitCode).toBe(1);
    expect((await run('qemu-img', ['snapshot', '-d', 'nope', path])).exitCode).toBe(1);
    await expectClean(path);
  });
});

/**
 * A raw file whose length is not a multiple of 512: QEMU's block layer sees it rounded up to whole sectors (a
 * 1000-byte file is a 1024-byte disk whose last 24 bytes read as zeros, reported as zero at their file offset).
 * Every command must say what qemu-img 7.2 says about such a file. This is also what a qcow2 image whose magic
 * was destroyed looks like (probed as raw), as the damaged-image differential found. A qcow2 size field that is
 * not a multiple of 512 is rounded DOWN to whole sectors (QEMU keeps total_sectors = size / 512).
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImg, qemuIo, run, sha256, tempDir } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';
import { statSync } from 'node:fs';

let dir: string;
let file: string;

beforeAll(async () => {
  dir = tempDir('qcow86-raw-sector-');
  file = join(dir, 'r1000.img');
  const bytes = Buffer.alloc(1000);
  for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + 1) & 0xff;
  await writeFile(file, bytes);
});

/** stdout, stderr (less the tool's name) and exit code of both tools for the same arguments. */
async function both(args: string[]): Promise<void> {
  const theirs = await run('qemu-img', args);
  const ours = await qcow86(args);
  const clean = (text: string) => text.replace(/^(qemu-img|qcow86 \w+): /gm, '');
  expect({ stdout: ours.stdout, stderr: clean(ours.stderr), exitCode: ours.exitCode }).toEqual({ stdout: theirs.stdout, stderr: clean(theirs.stderr), exitCode: theirs.exitCode });
}

describe('a 1000-byte raw file is a 1024-byte disk, as qemu-img sees it', () => {
  it('info (human and JSON) shows 1024 bytes', async () => {
    await both(['info', file]);
    await both(['info', '--output=json', file]);
    expect(JSON.parse((await qcow86(['info', '--output=json', file])).stdout)['virtual-size']).toBe(1024);
  });

  it('map: 1000 bytes of data, then 24 bytes of zeros at their file offset', async () => {
    await both(['map', file]);
    await both(['map', '--output=json', file]);
  });

  it('convert -O raw pads the output to the sector, byte for byte as qemu-img', async () => {
    const theirs = join(dir, 'theirs.raw');
    const ours = join(dir, 'ours.raw');
    await qemuImg(['convert', '-O', 'raw', file, theirs]);
    expect((await qcow86(['convert', '-O', 'raw', file, ours])).exitCode).toBe(0);
    expect(statSync(ours).size).toBe(1024);
    expect(await sha256(ours)).toBe(await sha256(theirs));
  });

  it('convert -O qcow2 makes a 1024-byte disk with the same contents', async () => {
    const ours = join(dir, 'ours.qcow2');
    expect((await qcow86(['convert', '-O', 'qcow2', file, ours])).exitCode).toBe(0);
    expect(JSON.parse(await qemuImg(['info', '--output=json', ours]))['virtual-size']).toBe(1024);
    expect((await run('qemu-img', ['compare', ours, file])).exitCode).toBe(0);
  });

  it('compare: equal to its padded copy without a size warning; a change in the last bytes is found at its sector', async () => {
    const padded = join(dir, 'padded.raw');
    await qemuImg(['convert', '-O', 'raw', file, padded]);
    await both(['compare', file, padded]);
    const changed = join(dir, 'changed.img');
    const bytes = Buffer.alloc(1000);
    for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + 1) & 0xff;
    bytes[999] ^= 0xff;
    await writeFile(changed, bytes);
    await both(['compare', file, changed]);
  });

  it('check (no checks for raw, exit 63) and measure agree', async () => {
    await both(['check', file]);
    await both(['measure', '-O', 'qcow2', file]);
    await both(['measure', '--output=json', '-O', 'raw', file]);
  });
});

describe('a qcow2 size field of 4 MiB + 128 bytes is a 4 MiB disk, as qemu-img sees it', () => {
  it('info, map, check, measure and convert agree with qemu-img', async () => {
    const image = join(dir, 'odd-size.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', image, '4M']);
    await qemuIo(['-c', 'write -P 5 0 192k', '-c', 'write -P 6 4032k 64k', image]);
    const bytes = await readFile(image);
    bytes.writeBigUInt64BE(4n * 1024n * 1024n + 128n, 24);
    await writeFile(image, bytes);
    for (const args of [['info', '--output=json'], ['map', '--output=json'], ['check'], ['measure', '-O', 'qcow2']]) await both([...args, image]);
    const theirs = join(dir, 'odd-theirs.raw');
    const ours = join(dir, 'odd-ours.raw');
    await qemuImg(['convert', '-O', 'raw', image, theirs]);
    expect((await qcow86(['convert', '-O', 'raw', image, ours])).exitCode).toBe(0);
    expect(statSync(ours).size).toBe(4 * 1024 * 1024);
    expect(await sha256(ours)).toBe(await sha256(theirs));
  });
});

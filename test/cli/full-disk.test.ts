/**
 * Commands writing to a full file system (a real one: a 1 MiB tmpfs, machines here run as root) end with one line
 * naming the file, what failed and "no space left on device", exit 1, and no stack trace; an image that ran out
 * of room keeps no corruption (qemu-img check).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { makeImage, qemuCheck, tempDir } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

const mount = join(tempDir('qcow86-full-'), 'small');
let source: string;

beforeAll(async () => {
  mkdirSync(mount);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', mount]);
  source = await makeImage({ path: join(tempDir(), 'source.qcow2'), size: '8M' }, [{ offset: 0, length: 4 * 1024 * 1024, pattern: 0x21 }]);
});
afterAll(() => {
  execFileSync('umount', [mount]);
});

function expectOneLine(result: { exitCode: number; stderr: string }, file: string): void {
  expect(result.exitCode, result.stderr).toBe(1);
  const lines = result.stderr.trim().split('\n');
  expect(lines, result.stderr).toHaveLength(1);
  expect(lines[0]).toContain(file);
  expect(lines[0]).toContain('no space left on device');
}

describe('a full file system', () => {
  it('convert -O raw and -O qcow2 say so in one line', async () => {
    for (const format of ['raw', 'qcow2']) {
      const out = join(mount, `out.${format}`);
      expectOneLine(await qcow86(['convert', '-O', format, source, out]), out);
      rmSync(out, { force: true });
    }
  });

  it('io writing into an image that cannot grow: the write fails in words, the image keeps no corruption', async () => {
    const image = join(mount, 'image.qcow2');
    await makeImage({ path: image, size: '8M' });
    const result = await qcow86(['io', '-c', 'write -P 0x33 0 4M', image]);
    expect(result.exitCode).toBe(1);
    expect(result.stdout).toMatch(/write failed: .*image\.qcow2: writing \d+ bytes at offset \d+ failed: no space left on device \(ENOSPC\)/);
    expect(result.stderr).not.toMatch(/\n\s+at /);
    const copy = join(tempDir(), 'image.qcow2');
    copyFileSync(image, copy);
    const { exitCode, result: check } = await qemuCheck(copy);
    expect({ exitCode: exitCode === 3 ? 0 : exitCode, corruptions: check.corruptions ?? 0 }).toEqual({ exitCode: 0, corruptions: 0 });
  });
});

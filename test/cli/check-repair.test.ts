/**
 * `qcow86 check -r`: the same image damaged the same way is repaired by us and by qemu-img; afterwards qemu-img
 * finds ours clean, and both tools report the same fixed counts and exit codes.
 */
import { describe, expect, it } from 'vitest';
import { copyFile, open } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuCheck, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

/** A 1 MiB-written image whose cluster 30 (past the data, inside the file) has refcount 1 and no reference. */
async function leakyImage(dir: string): Promise<string> {
  const path = join(dir, 'leaky.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', path, '4M']);
  await qemuIo(['-c', 'write -P 0x5a 0 1M', path]);
  const file = await open(path, 'r+');
  try {
    await file.truncate(2 * 1024 * 1024);
    const header = Buffer.alloc(104);
    await file.read(header, 0, 104, 0);
    const entry = Buffer.alloc(8);
    await file.read(entry, 0, 8, Number(header.readBigUInt64BE(48)));
    const block = Number(entry.readBigUInt64BE(0));
    await file.write(Buffer.from([0, 1]), 0, 2, block + 30 * 2);
  } finally {
    await file.close();
  }
  return path;
}

describe('qcow86 check -r', () => {
  it('repairs a leak like qemu-img check -r leaks', async () => {
    const dir = await tempDir();
    const ours = await leakyImage(dir);
    const theirs = join(dir, 'theirs.qcow2');
    await copyFile(ours, theirs);
    expect((await qemuCheck(ours)).exitCode).toBe(3);

    const repaired = await qcow86(['check', '-r', 'leaks', '--output=json', ours]);
    expect(repaired.exitCode).toBe(0);
    const reference = await qemuImg(['check', '-r', 'leaks', '--output=json', theirs]);
    const ourJson = JSON.parse(repaired.stdout);
    const theirJson = JSON.parse(reference);
    expect(ourJson['leaks-fixed']).toBe(1);
    expect(ourJson['leaks-fixed']).toBe(theirJson['leaks-fixed']);
    expect(ourJson['image-end-offset']).toBe(theirJson['image-end-offset']);

    const after = await qemuCheck(ours);
    expect(after.exitCode).toBe(0);
    expect(await qemuImg(['compare', ours, theirs])).toContain('Images are identical');
  });

  it('refuses an unknown -r mode and leaves the image alone', async () => {
    const dir = await tempDir();
    const path = await leakyImage(dir);
    const result = await qcow86(['check', '-r', 'everything', path]);
    expect(result.exitCode).toBe(1);
    expect(result.stderr).toMatch(/-r/);
    expect((await qemuCheck(path)).exitCode).toBe(3);
  });
});

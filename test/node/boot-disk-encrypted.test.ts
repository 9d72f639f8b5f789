/**
 * The disk `qcow86 boot --key-secret ID` opens, without booting, on an encrypted base (the case the boot test
 * does not cover: there the base is plain): the one password unlocks every encrypted image of the chain, the new
 * overlay is LUKS too, and qemu-img reads the chain with the same secret for both layers and finds the overlay
 * clean. A wrong or missing password is refused with QEMU's words before anything is created or written.
 */
import { describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { run, qemuImg, sha256, tempDir, type ImageWrite } from '../helpers/qemu.js';
import { PASSWORD_BYTES, SECRET, applyWrites, firstDifference, imageOpts, qemuContents, qemuLuks } from '../helpers/luks.js';
import { openBootDisk } from '../../src/node/boot-disk.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const BASE_WRITES: ImageWrite[] = [
  { offset: 0, length: MiB, pattern: 0x1b },
  { offset: 3 * MiB, length: 70_000, pattern: 0x2b },
];

describe('boot disk on an encrypted base', () => {
  it('one password unlocks base and overlay; the new overlay is LUKS; qemu-img reads the chain; wrong and missing passwords are refused', async () => {
    const dir = tempDir('qcow86-boot-disk-encrypted-');
    const base = await qemuLuks(join(dir, 'base.qcow2'), SIZE, undefined, BASE_WRITES);
    const overlay = join(dir, 'overlay.qcow2');

    // Refused before the overlay is created.
    await expect(openBootDisk({ base, overlay, password: new TextEncoder().encode('not it') })).rejects.toThrow('Invalid password, cannot unlock any keyslot');
    await expect(openBootDisk({ base, overlay })).rejects.toThrow("Parameter 'encrypt.key-secret' is required for cipher");
    expect(existsSync(overlay)).toBe(false);

    const expected = new Uint8Array(SIZE);
    applyWrites(expected, BASE_WRITES);
    const disk = await openBootDisk({ base, overlay, password: PASSWORD_BYTES });
    try {
      expect(firstDifference(await disk.device.read(0, SIZE), expected)).toBe(-1);
      await disk.device.write(MiB - 4096, new Uint8Array(8192).fill(0x3c));
      await disk.device.flush();
    } finally {
      await disk.device.close();
    }
    expected.fill(0x3c, MiB - 4096, MiB + 4096);

    const info = JSON.parse(await qemuImg(['info', '--output=json', overlay]));
    expect(info['format-specific'].data.encrypt).toMatchObject({ format: 'luks', 'cipher-alg': 'aes-256', 'cipher-mode': 'xts', 'ivgen-alg': 'plain64', 'hash-alg': 'sha256' });
    const chain = `,backing.encrypt.key-secret=sec0`;
    expect(firstDifference(await qemuContents(overlay, { extra: chain }), expected)).toBe(-1);
    const check = await run('qemu-img', ['check', ...SECRET, '--image-opts', imageOpts(overlay, chain)]);
    expect(check.exitCode, check.stdout + check.stderr).toBe(0);

    // Reopened (the overlay exists now): the same password for both layers; a wrong one changes nothing.
    const before = await sha256(overlay);
    await expect(openBootDisk({ overlay, password: new TextEncoder().encode('not it') })).rejects.toThrow('Invalid password, cannot unlock any keyslot');
    expect(await sha256(overlay)).toBe(before);
    const again = await openBootDisk({ overlay, password: PASSWORD_BYTES });
    try {
      expect(firstDifference(await again.device.read(0, SIZE), expected)).toBe(-1);
    } finally {
      await again.device.close();
    }
  });
});

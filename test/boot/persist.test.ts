/**
 * The default guest on a fresh qcow2 overlay: files written in one boot are there, with the same checksums
 * (computed by the guest), in the next boot; qemu-img finds the overlay clean and the base untouched. Then the
 * overlay is committed with our CLI into a copy of the (compressed) base, and that copy boots on its own, without
 * an overlay, with the files in it. Three boots in total: each is shared by several assertions.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { tempDir } from '../helpers/qemu.js';
import { qcow86 } from '../cli/cli.js';
import { POWERED_OFF, type Machine } from '../../src/v86/machine.js';
import { bootGuest, shell, BOOT_TIMEOUT_MS, DEFAULT_BASE } from './guest.js';

const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');
const SUMS = /([0-9a-f]{64})\s+(\S+)/g;

function parseSums(text: string): Map<string, string> {
  return new Map([...text.matchAll(SUMS)].map((m) => [m[2]!, m[1]!]));
}

describe('default guest on a qcow2 overlay', { timeout: BOOT_TIMEOUT_MS + 300_000 }, () => {
  const dir = tempDir('qcow86-boot-');
  const overlay = join(dir, 'guest.qcow2');
  let baseHash: string;
  let machine: Machine | undefined;
  let written: Map<string, string>;

  beforeAll(async () => {
    machine = await bootGuest({ overlay });
    baseHash = sha256(DEFAULT_BASE);
  }, BOOT_TIMEOUT_MS + 60_000);

  afterAll(async () => {
    await machine?.close().catch(() => {});
  });

  test('first boot: the shell runs commands and sees the ext4 root read-write on the virtio disk (the default bus)', async () => {
    const mounts = await shell(machine!, 'cat /proc/mounts');
    expect(mounts).toMatch(/^\/dev\/vda2 \/ ext4 rw/m);
    expect(await shell(machine!, 'echo $((6 * 7))')).toBe('42\n');
  });

  test('first boot: the overlay is locked while the guest runs: a second writer is refused', async () => {
    for (const args of [['io', '-c', 'write -P 0x77 0 4k', overlay], ['boot', '--overlay', overlay, '--expect', 'never']]) {
      const result = await qcow86(args);
      expect(result.exitCode, result.stderr).toBe(1);
      expect(result.stderr).toContain(`Failed to get "write" lock: the image is in use by process ${process.pid}`);
    }
  });

  test('first boot: small and multi-MiB files written, synced, powered off', async () => {
    await shell(machine!, 'echo hello-from-qcow86 > /root/small.txt');
    // 6 MiB of guest randomness: more than one write-back batch, several qcow2 clusters and L2 entries.
    await shell(machine!, 'dd if=/dev/urandom of=/root/big.bin bs=1M count=6 2>/dev/null');
    await shell(machine!, 'dd if=/dev/urandom of=/root/odd.bin bs=4097 count=3 2>/dev/null');
    await shell(machine!, 'sha256sum /root/small.txt /root/big.bin /root/odd.bin > /root/sums; sync');
    written = parseSums(await shell(machine!, 'cat /root/sums'));
    expect([...written.keys()].sort()).toEqual(['/root/big.bin', '/root/odd.bin', '/root/small.txt']);
    expect(written.get('/root/small.txt')).toBe(createHash('sha256').update('hello-from-qcow86\n').digest('hex'));
    await machine!.powerOff({ timeout: 120_000 });
    await machine!.close();
    machine = undefined;
  });

  test('after the first boot: qemu-img finds the overlay clean, backed by the base, and the base unchanged', () => {
    execFileSync('qemu-img', ['check', overlay]);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', overlay]).toString());
    expect(info['backing-filename']).toBe(DEFAULT_BASE);
    expect(info.format).toBe('qcow2');
    expect(sha256(DEFAULT_BASE)).toBe(baseHash);
    // qemu-io reads the overlay independently of our engine: the 6 MiB file made it into allocated clusters.
    const map = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', overlay]).toString()) as Array<{ depth: number; length: number; data: boolean }>;
    const inOverlay = map.filter((e) => e.depth === 0 && e.data).reduce((sum, e) => sum + e.length, 0);
    expect(inOverlay).toBeGreaterThan(6 * 1024 * 1024);
  });

  test('second boot on the same overlay: the files are there with the same checksums', async () => {
    machine = await bootGuest({ overlay });
    const check = await shell(machine, 'sha256sum -c /root/sums');
    expect(check).toMatch(/\/root\/big.bin: OK/);
    expect(check).toMatch(/\/root\/small.txt: OK/);
    expect(check).toMatch(/\/root\/odd.bin: OK/);
    const again = parseSums(await shell(machine, 'sha256sum /root/small.txt /root/big.bin /root/odd.bin'));
    expect(again).toEqual(written);
    expect(await shell(machine, 'cat /root/small.txt')).toBe('hello-from-qcow86\n');
    await machine.send('poweroff\n').expect(POWERED_OFF, { timeout: 120_000 });
    await machine.close();
    machine = undefined;
    execFileSync('qemu-img', ['check', overlay]);
    expect(sha256(DEFAULT_BASE)).toBe(baseHash);
  });

  test('commit into a copy of the base with qcow86 commit, then boot the copy alone: files present', async () => {
    const baseCopy = join(dir, 'base-copy.qcow2');
    const top = join(dir, 'commit-top.qcow2');
    copyFileSync(DEFAULT_BASE, baseCopy);
    copyFileSync(overlay, top);
    // The copy of the overlay is pointed at the copy of the base (same bytes, so -u is right), then committed.
    const rebased = await qcow86(['rebase', '-u', '-b', 'base-copy.qcow2', '-F', 'qcow2', 'commit-top.qcow2'], { cwd: dir });
    expect(rebased.exitCode, rebased.stderr).toBe(0);
    const committed = await qcow86(['commit', 'commit-top.qcow2'], { cwd: dir });
    expect(committed.exitCode, committed.stderr).toBe(0);
    expect(committed.stdout).toBe('Image committed.\n');
    execFileSync('qemu-img', ['check', baseCopy]);
    execFileSync('qemu-img', ['check', top]);
    // qemu-img sees the same disk in the committed base as in the original overlay on the untouched base.
    execFileSync('qemu-img', ['compare', overlay, baseCopy]);
    expect(JSON.parse(execFileSync('qemu-img', ['info', '--output=json', baseCopy]).toString())['backing-filename']).toBeUndefined();
    expect(sha256(DEFAULT_BASE)).toBe(baseHash);

    // The committed base is the guest's only disk: opened read-write as the top, no overlay, no backing file.
    machine = await bootGuest({ overlay: baseCopy });
    const check = await shell(machine, 'sha256sum -c /root/sums');
    expect(check).toMatch(/\/root\/big.bin: OK/);
    expect(check).toMatch(/\/root\/small.txt: OK/);
    expect(check).toMatch(/\/root\/odd.bin: OK/);
    expect(parseSums(await shell(machine, 'sha256sum /root/small.txt /root/big.bin /root/odd.bin'))).toEqual(written);
    await machine.send('poweroff\n').expect(POWERED_OFF, { timeout: 120_000 });
    await machine.close();
    machine = undefined;
    execFileSync('qemu-img', ['check', baseCopy]);
  });
});

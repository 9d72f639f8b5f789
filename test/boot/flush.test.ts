/**
 * The guest's flush is a barrier, on both buses: `qcow86 boot` runs `echo ... > /f; sync; echo SYNCED` and is
 * killed with SIGKILL the moment SYNCED shows on its console; qemu-img finds no corruption and the next boot has
 * /f. Each bus's second boot is shared with that bus's own checks:
 * - virtio (the default bus): /dev/vda with a write-back cache and discard; after an 8 MiB file is deleted,
 *   `fstrim -v /` frees at least 6 MiB of the overlay's data clusters (qemu-img map is the truth).
 * - IDE: /dev/sda now reports a write-back cache (the FLUSH CACHE hook); a session saved as sessions were before
 *   buses were recorded resumes on IDE in a new `qcow86 boot`, and asking for it on --disk-bus virtio is refused.
 * Sessions saved on virtio resuming on virtio are test/boot/session.test.ts (its boots use the default bus).
 */
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, symlinkSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ensureImages } from '../../images/build.mjs';
import { buildEngine } from '../helpers/build.js';
import { qemuCheck, run, tempDir } from '../helpers/qemu.js';
import { nodeCodecs } from '../../src/io/node.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { POWERED_OFF, type Machine } from '../../src/v86/machine.js';
import { storeSession } from '../../src/v86/session.js';
import type { DiskBus } from '../../src/v86/disk-bus.js';
import { bootGuest, shell, BOOT_TIMEOUT_MS } from './guest.js';

const root = resolve(import.meta.dirname, '../..');
const MiB = 1024 * 1024;
const clean = (text: string) => text.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '').replace(/\r/g, '');

/** The CLI from a private build (a concurrent `npm run build` cannot interfere): the command line to run it. */
function cliArgs(args: string[]): string[] {
  const dist = buildEngine();
  // machine-assets.ts finds the BIOS in ../../public/images relative to the compiled file.
  const publicDir = resolve(dist, '../public');
  if (!existsSync(publicDir)) symlinkSync(join(root, 'public'), publicDir);
  return ['--input-type=module', '-e', 'const { main } = await import(process.argv[1]); process.exitCode = await main(process.argv.slice(2));', join(dist, 'node/cli.js'), ...args];
}

/**
 * Boots on a new overlay, writes /f, syncs, and SIGKILLs `qcow86 boot` as soon as the guest says the sync
 * returned. Resolves with the console once the process is gone.
 */
function killAfterSync(overlay: string, bus: DiskBus): Promise<string> {
  const child = spawn(process.execPath, cliArgs([
    'boot', '--overlay', overlay, '--disk-bus', bus, '--timeout', String(BOOT_TIMEOUT_MS / 1000),
    '--expect', '# ', '--send', `echo flushed-on-${bus}-$((40 + 2)) > /f; sync; echo SYNCED$((1 + 1))\n`, '--expect', 'the process is killed before this',
  ]), { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  let killed = false;
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
    if (!killed && clean(stdout).includes('SYNCED2')) {
      killed = true;
      child.kill('SIGKILL');
    }
  });
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  return new Promise((done, fail) => {
    child.on('error', fail);
    child.on('close', (code, signal) => {
      if (!killed || signal !== 'SIGKILL') fail(new Error(`qcow86 boot ended (${code ?? signal}) before the guest's sync returned:\n${stderr}\n${clean(stdout).slice(-2000)}`));
      else done(clean(stdout));
    });
  });
}

/** The overlay's own data (qemu-img map: depth 0, data), in bytes; -U because the guest may have it open. */
function overlayData(overlay: string): number {
  const map = JSON.parse(execFileSync('qemu-img', ['map', '-U', '--output=json', overlay]).toString()) as Array<{ depth: number; data: boolean; length: number }>;
  return map.filter((e) => e.depth === 0 && e.data).reduce((sum, e) => sum + e.length, 0);
}

async function expectNoCorruption(overlay: string): Promise<void> {
  const check = await qemuCheck(overlay);
  // A kill may leave leaked clusters (exit 3, harmless); never a corruption.
  expect([0, 3], JSON.stringify(check.result)).toContain(check.exitCode);
  expect(check.result.corruptions ?? 0).toBe(0);
}

describe.each(['virtio', 'ide'] as const)('kill -9 right after the guest\'s sync, disk on %s', { timeout: 2 * BOOT_TIMEOUT_MS + 300_000 }, (bus) => {
  const dir = tempDir(`qcow86-flush-${bus}-`);
  const overlay = join(dir, 'guest.qcow2');
  let machine: Machine | undefined;

  beforeAll(async () => {
    await ensureImages();
    await killAfterSync(overlay, bus);
  }, BOOT_TIMEOUT_MS + 60_000);

  afterAll(async () => {
    await machine?.close().catch(() => {});
  });

  test('qemu-img check finds no corruption; the next boot has the file', async () => {
    await expectNoCorruption(overlay);
    machine = await bootGuest({ overlay, diskBus: bus });
    expect(await shell(machine, 'cat /f')).toBe(`flushed-on-${bus}-42\n`);
  }, BOOT_TIMEOUT_MS + 60_000);

  if (bus === 'virtio') {
    test('the guest sees /dev/vda with a write-back cache and discard', async () => {
      expect(await shell(machine!, 'grep " / " /proc/mounts')).toMatch(/^\/dev\/vda2 \/ ext4 rw/);
      expect(await shell(machine!, 'cat /sys/block/vda/queue/write_cache')).toBe('write back\n');
      expect(Number(await shell(machine!, 'cat /sys/block/vda/queue/discard_max_bytes'))).toBeGreaterThan(0);
    });

    test('after an 8 MiB file is deleted, fstrim -v / frees at least 6 MiB of the overlay\'s data clusters', async () => {
      await shell(machine!, 'dd if=/dev/urandom of=/root/eight.bin bs=1M count=8 2>/dev/null; sync');
      const written = overlayData(overlay);
      expect(written).toBeGreaterThanOrEqual(8 * MiB);
      const trimmed = await shell(machine!, 'rm /root/eight.bin; sync; fstrim -v /');
      expect(trimmed).toMatch(/^\/: \d+ bytes trimmed/);
      // fstrim's discards reach the overlay with the guest's next flush (the device caches them like writes).
      await shell(machine!, 'sync');
      const after = overlayData(overlay);
      console.log(`fstrim: overlay data ${(written / MiB).toFixed(2)} MiB -> ${(after / MiB).toFixed(2)} MiB (${trimmed.trim()})`);
      expect(written - after).toBeGreaterThanOrEqual(6 * MiB);
      expect(machine!.disk.stats.discards).toBeGreaterThan(0);
      await machine!.powerOff({ timeout: 120_000 });
      await machine!.close();
      machine = undefined;
      await expectNoCorruption(overlay);
      execFileSync('qemu-img', ['check', overlay]);
    });
  } else {
    test('/dev/sda reports a write-back cache (FLUSH CACHE reaches the disk)', async () => {
      expect(await shell(machine!, 'grep " / " /proc/mounts')).toMatch(/^\/dev\/sda2 \/ ext4 rw/);
      expect(await shell(machine!, 'cat /sys/block/sda/queue/write_cache')).toBe('write back\n');
      expect(machine!.disk.stats.guestFlushes).toBeGreaterThan(0);
    });

    test('a session saved before buses were recorded resumes on IDE; --disk-bus virtio is refused for it', async () => {
      // What sessions were before: v86's state only, with no machine record.
      await machine!.send('i=0; while true; do i=$((i+1)); echo T=$i; sleep 1; done &\n').expect('T=2\n');
      await machine!.emulator.stop();
      await machine!.disk.settle();
      await machine!.disk.flush();
      const state = new Uint8Array(await machine!.emulator.save_state());
      await storeSession(machine!.disk.device as Qcow2Image, 'before-buses', state, nodeCodecs());
      machine!.emulator.run();
      await machine!.close();
      machine = undefined;

      const refused = await run(process.execPath, cliArgs(['boot', '--overlay', overlay, '--resume', 'before-buses', '--disk-bus', 'virtio', '--expect', 'T=']));
      expect(refused.exitCode).toBe(1);
      expect(refused.stderr).toMatch(/session 'before-buses' was saved with its disk on ide: it resumes on ide, not on --disk-bus virtio/);

      const resumed = await run(process.execPath, cliArgs(['boot', '--overlay', overlay, '--resume', 'before-buses', '--timeout', '300', '--expect', 'T=', '--send', 'cat /f\n', '--expect', 'flushed-on-ide-42']));
      expect(resumed.exitCode, resumed.stderr).toBe(0);
      expect(resumed.stderr).toMatch(/resumed session 'before-buses' \(disk on ide\)/);
      expect(clean(resumed.stdout)).not.toMatch(/SYSLINUX|Linux version/);
      await expectNoCorruption(overlay);
    }, BOOT_TIMEOUT_MS);
  }
});

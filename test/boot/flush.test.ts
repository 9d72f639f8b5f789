/**
 * The guest's flush is a barrier, on both buses: `qcow86 boot` runs `echo ... > /f; sync; echo SYNCED` and is
 * killed with SIGKILL the moment SYNCED shows on its console; qemu-img finds no corruption and the next boot has
 * /f. Each bus's second boot is shared with that bus's own checks:
 * - virtio (the default bus): /dev/vda with a write-back cache and discard; after an 8 MiB file is deleted,
 *   `fstrim -v /` frees at least 6 MiB of the overlay's data clusters (qemu-img map is the truth); a session saved
 *   while the guest writes and fsyncs in a loop resumes on virtio in a new `qcow86 boot` and the loop goes on
 *   without an I/O error. The counter sessions of test/boot/session.test.ts run on virtio too.
 * - IDE: the killed boot starts the kernel directly (--cmdline) with its root named by UUID rather than by label;
 *   /dev/sda now reports a write-back cache (the FLUSH CACHE hook); a session saved as sessions were before
 *   buses were recorded resumes on IDE in a new `qcow86 boot`, and asking for it on --disk-bus virtio is refused;
 *   `qcow86 boot` ending on --timeout or on SIGINT while the guest writes keeps every write the guest saw
 *   acknowledged (its final flush, which does not depend on the bus).
 */
import { spawn, execFileSync } from 'node:child_process';
import { existsSync, symlinkSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ensureImages, EXT4_UUID, KERNEL_CMDLINE } from '../../images/build.mjs';
import { buildEngine } from '../helpers/build.js';
import { qemuCheck, run, tempDir } from '../helpers/qemu.js';
import { nodeCodecs } from '../../src/io/node.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { POWERED_OFF, type Machine } from '../../src/v86/machine.js';
import { saveSession, storeSession } from '../../src/v86/session.js';
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
 * returned. Resolves with the console once the process is gone. On IDE the kernel is booted directly
 * (--cmdline) with its root named by UUID instead of the default label: the initramfs finds it either way.
 */
function killAfterSync(overlay: string, bus: DiskBus): Promise<string> {
  const byUuid = bus === 'ide' ? ['--cmdline', KERNEL_CMDLINE.replace(/root=LABEL=\S+/, `root=UUID=${EXT4_UUID}`)] : [];
  const child = spawn(process.execPath, cliArgs([
    'boot', '--overlay', overlay, '--disk-bus', bus, '--timeout', String(BOOT_TIMEOUT_MS / 1000), ...byUuid,
    '--expect', '# ', '--send', `grep -o 'root=[^ ]*' /proc/cmdline; grep ' / ' /proc/mounts; echo flushed-on-${bus}-$((40 + 2)) > /f; sync; echo SYNCED$((1 + 1))\n`,
    '--expect', 'the process is killed before this',
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
  let killedConsole = '';

  beforeAll(async () => {
    await ensureImages();
    killedConsole = await killAfterSync(overlay, bus);
  }, BOOT_TIMEOUT_MS + 60_000);

  afterAll(async () => {
    await machine?.close().catch(() => {});
  });

  test('qemu-img check finds no corruption; the next boot has the file', async () => {
    // The killed boot's root, by label through SYSLINUX (virtio) or by UUID on a direct kernel boot (IDE).
    expect(killedConsole).toMatch(bus === 'ide' ? new RegExp(`^root=UUID=${EXT4_UUID}$`, 'm') : /^root=LABEL=qcow86-root$/m);
    expect(killedConsole).toMatch(new RegExp(`^/dev/${bus === 'ide' ? 'sda' : 'vda'}2 / ext4 rw`, 'm'));
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
    });

    test('a session saved while the guest writes and fsyncs on virtio without pause', async () => {
      // 2 MiB written and fsynced per round, without pause: the save stops the machine in the middle of that I/O.
      await machine!.send('n=0; while true; do dd if=/dev/urandom of=/root/io.bin bs=64k count=32 conv=fsync 2>/dev/null || echo IOFAIL; n=$((n+1)); echo IO=$n; done &\n').expect('IO=2\n');
      const saved = await saveSession(machine!, machine!.disk.device as Qcow2Image, 'mid-io', nodeCodecs());
      expect(saved.name).toBe('mid-io');
      await machine!.expect(/IO=\d+\n/);
      expect(await shell(machine!, 'kill $!; wait; echo stopped')).toMatch(/stopped\n$/);
      await shell(machine!, 'rm -f /root/io.bin; sync');
      await machine!.powerOff({ timeout: 120_000 });
      await machine!.close();
      machine = undefined;
      await expectNoCorruption(overlay);
      execFileSync('qemu-img', ['check', overlay]);
    });

    test('the session saved mid-I/O resumes on virtio in a new qcow86 boot: the writes go on, no I/O error', async () => {
      const resumed = await run(process.execPath, cliArgs(['boot', '--overlay', overlay, '--resume', 'mid-io', '--timeout', '300',
        '--expect', 'IO=', '--send', 'kill $!; wait; echo ERRORS=$(dmesg | grep -ciE "i/o error|ext4-fs error|buffer i/o"); echo CACHE=$(cat /sys/block/vda/queue/write_cache); echo ENDED$((1+1))\n', '--expect', 'ENDED2']));
      expect(resumed.exitCode, resumed.stderr).toBe(0);
      expect(resumed.stderr).toMatch(/resumed session 'mid-io' \(disk on virtio\)/);
      const out = clean(resumed.stdout);
      expect(out).not.toMatch(/SYSLINUX|Linux version|^IOFAIL$/m);
      expect(out).toMatch(/^ERRORS=0$/m);
      expect(out).toMatch(/^CACHE=write back$/m);
      await expectNoCorruption(overlay);
    }, BOOT_TIMEOUT_MS);
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

    test.each(['timeout', 'sigint'] as const)("qcow86 boot's final flush when it ends on %s keeps every write the guest saw acknowledged", async (ending) => {
      const { lastSeen, onDisk, exitCode, stderr } = await endWhileWriting(overlay, ending);
      expect(exitCode, stderr).toBe(ending === 'timeout' ? 1 : 130);
      expect(stderr).toMatch(ending === 'timeout' ? /step \d+ \(expect "not before the end"\) from argument \d+ timed out/ : /interrupted, flushing the disk/);
      // Acknowledged (the guest printed it after dd returned) means on the disk once qcow86 boot has ended; the
      // adapter holds acknowledged writes up to a second before its own write-back, so without the final flush
      // the disk lags behind the console.
      console.log(`${ending}: the console showed W=${lastSeen} last, the overlay holds W=${onDisk}`);
      expect(lastSeen).toBeGreaterThanOrEqual(20);
      expect(onDisk).toBeGreaterThanOrEqual(lastSeen);
      await expectNoCorruption(overlay);
    }, BOOT_TIMEOUT_MS);
  }
});

/** Where the writer below writes: 512 KiB into the disk, in the gap before the first partition (sector 2048). */
const WRITER_OFFSET = 512 * 1024;

/**
 * Resumes the IDE session 'before-buses' in `qcow86 boot`, starts a guest loop writing `W=<n>` straight to the
 * disk (O_DIRECT, no flush: acknowledged from the adapter's cache) and printing W=<n> once each write returned,
 * and ends the process on the step timeout or on SIGINT while the loop runs. Returns the last W the console
 * showed and the W the overlay holds afterwards (read by qemu-io).
 */
function endWhileWriting(overlay: string, ending: 'timeout' | 'sigint'): Promise<{ lastSeen: number; onDisk: number; exitCode: number | null; stderr: string }> {
  const writer = `i=0; while true; do i=$((i+1)); printf 'W=%08d\\n' $i | dd of=/dev/sda bs=4096 seek=${WRITER_OFFSET / 4096} count=1 conv=sync oflag=direct 2>/dev/null && echo W=$i; done &\n`;
  const child = spawn(process.execPath, cliArgs([
    'boot', '--overlay', overlay, '--resume', 'before-buses', '--timeout', ending === 'timeout' ? '20' : '300',
    '--expect', 'T=', '--send', writer, '--expect', 'W=20\n', '--expect', 'not before the end',
  ]), { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  let signalled = false;
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
    if (ending === 'sigint' && !signalled && /^W=25$/m.test(clean(stdout))) {
      signalled = true;
      child.kill('SIGINT');
    }
  });
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  return new Promise((done, fail) => {
    child.on('error', fail);
    child.on('close', (exitCode) => {
      const seen = [...clean(stdout).matchAll(/^W=(\d+)$/gm)].map((m) => Number(m[1]));
      const dump = execFileSync('qemu-io', ['-U', '-r', '-f', 'qcow2', '-c', `read -v ${WRITER_OFFSET} 16`, overlay]).toString();
      const bytes = /^[0-9a-f]+:\s+((?:[0-9a-f]{2} ){16})/m.exec(dump);
      if (!bytes) return fail(new Error(`no hex dump from qemu-io: ${dump}`));
      const text = Buffer.from(bytes[1]!.trim().split(' ').map((h) => parseInt(h, 16))).toString('latin1');
      const onDisk = /^W=(\d{8})\n/.exec(text);
      if (!onDisk) return fail(new Error(`the disk holds no W=<n> at ${WRITER_OFFSET}: ${JSON.stringify(text)}\n${stderr}`));
      done({ lastSeen: seen.at(-1) ?? 0, onDisk: Number(onDisk[1]), exitCode, stderr });
    });
  });
}

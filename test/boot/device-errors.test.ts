/**
 * `qcow86 boot` on a failing device ends the run: exit 1, one line saying what failed ("no space left" for a
 * full disk), no stack trace and no unhandled rejection, and the overlay left without corruption.
 *
 * Two boots of the default guest through the real CLI: one whose overlay lives on a 2 MiB tmpfs that the guest
 * fills (a real full file system: machines here run as root), one whose HTTP base goes away mid-run.
 */
import { execFileSync, spawn } from 'node:child_process';
import { copyFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ensureImages } from '../../images/build.mjs';
import { buildEngine } from '../helpers/build.js';
import { startNginx, type NginxServer } from '../helpers/nginx.js';
import { qemuCheck, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { BOOT_TIMEOUT_MS, DEFAULT_BASE } from './guest.js';

const clean = (text: string) => text.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '').replace(/\r/g, '');
const mounts: string[] = [];
let nginx: NginxServer | undefined;

afterAll(async () => {
  await nginx?.close();
  for (const mount of mounts) execFileSync('umount', [mount]);
});

/** Runs the CLI as bin/qcow86.js does; `onOutput` sees the console as it arrives. */
function boot(args: string[], onOutput?: (console: string) => void): Promise<{ exitCode: number | null; stdout: string; stderr: string }> {
  const cli = join(buildEngine(), 'cli/cli.js');
  const script = 'const { main, exitOnStrayErrors } = await import(process.argv[1]); exitOnStrayErrors(process.argv[2]); process.exitCode = await main(process.argv.slice(2));';
  const child = spawn(process.execPath, ['--input-type=module', '-e', script, cli, 'boot', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
    onOutput?.(clean(stdout));
  });
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  return new Promise((done, fail) => {
    child.on('error', fail);
    child.on('close', (exitCode) => done({ exitCode, stdout: clean(stdout), stderr }));
  });
}

/** The run failed in one line naming the failure, without a stack trace or an unhandled rejection. */
function expectOneLineFailure(result: { exitCode: number | null; stdout: string; stderr: string }, words: RegExp): void {
  expect(result.exitCode, result.stderr).toBe(1);
  const failures = result.stderr.split('\n').filter((line) => /the disk failed/.test(line));
  expect(failures, result.stderr).toHaveLength(1);
  expect(failures[0]).toMatch(words);
  expect(result.stderr).not.toMatch(/\n\s+at |Unhandled|unhandled|TypeError|RangeError/);
}

describe('boot on a failing device', () => {
  it('a full file system under the overlay: exit 1, "no space left", the overlay without corruption', { timeout: BOOT_TIMEOUT_MS + 120_000 }, async () => {
    await ensureImages();
    const mount = join(tempDir('qcow86-full-'), 'small');
    mkdirSync(mount);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', mount]);
    mounts.push(mount);
    const overlay = join(mount, 'guest.qcow2');
    const result = await boot([
      '--overlay', overlay, '--timeout', String(BOOT_TIMEOUT_MS / 1000),
      '--expect', '# ',
      '--send', 'dd if=/dev/urandom of=/filler bs=1M count=4; sync; echo filled-$((6*7))\n',
      '--expect', 'filled-42',
    ]);
    expectOneLineFailure(result, /no space left on device/);
    // The overlay as the failure left it: leaks at most.
    const copy = join(tempDir(), 'guest.qcow2');
    copyFileSync(overlay, copy);
    const { exitCode, result: check } = await qemuCheck(copy);
    expect({ exitCode: exitCode === 3 ? 0 : exitCode, corruptions: check.corruptions ?? 0 }).toEqual({ exitCode: 0, corruptions: 0 });
  });

  it('an HTTP base that goes away: exit 1, one line naming the base', { timeout: BOOT_TIMEOUT_MS + 120_000 }, async () => {
    await ensureImages();
    const root = tempDir('qcow86-gone-');
    // The default base is small enough to be fetched whole while booting: 16 MiB more at its end are not.
    const base = join(root, 'base.qcow2');
    copyFileSync(DEFAULT_BASE, base);
    const size = Number((await qemuImg(['info', '--output=json', base])).match(/"virtual-size": (\d+)/)![1]);
    await qemuImg(['resize', '-q', base, String(size + 16 * 1024 * 1024)]);
    await qemuIo(['-c', `write -P 0x5a ${size} 16M`, base]);
    nginx = await startNginx(root);
    const url = `${nginx.url}base.qcow2`;
    let stopped = false;
    const result = await boot([
      '--base', url, '--timeout', String(BOOT_TIMEOUT_MS / 1000),
      '--expect', '# ',
      // The server goes when the guest says so; then the guest reads the whole disk, most of it never fetched.
      '--send', 'echo server-$((1+1))-go; sleep 3; cat /dev/[sv]da > /dev/null; echo read-$((2+2))\n',
      '--expect', 'read-4',
    ], (text) => {
      if (!stopped && text.includes('server-2-go')) {
        stopped = true;
        void nginx!.close();
      }
    });
    expect(stopped).toBe(true);
    expectOneLineFailure(result, new RegExp(url.replace(/[.]/g, '\\.')));
  });
});

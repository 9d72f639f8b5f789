/**
 * The Debian guest (`npm run images -- debian`), built once for the suite (ensureDebian reuses public/images and
 * the cached downloads in .cache/) and booted twice at the same time (one per core), through the library:
 *
 * - from the file, on a qcow2 overlay file: bash's prompt (ending in '# ') on the serial console within 240 s
 *   and on tty1 (typed into through the keyboard), python3 running a script file and `-c` within 60 s, the tools
 *   the issue names, a disk of at least 2 GiB with free space; qemu-img finds the overlay clean afterwards;
 * - over HTTP from nginx, cold: the prompt plus `python3 -c 'print(1)'` in at most 40 requests to the base.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { ensureImages } from '../../images/build.mjs';
import { ensureDebian } from '../../images/debian.mjs';
import { bootMachine, type BootedMachine } from '../../src/node/machine.js';
import { startNginx, type NginxServer } from '../helpers/nginx.js';
import { qemuCheck, tempDir } from '../helpers/qemu.js';
import { shell } from './guest.js';

const root = join(import.meta.dirname, '../..');
const DEBIAN = join(root, 'public/images/debian.qcow2');
/** The limits: the prompt within 240 s, python3 within 60 s (errors instead of hangs, not benchmarks). */
const PROMPT_MS = 240_000;
const PYTHON_MS = 60_000;
const PROMPT = /root@qcow86:~# $/;

describe('the Debian guest', { timeout: 1_200_000 }, () => {
  const dir = tempDir('qcow86-debian-');
  const overlay = join(dir, 'debian-overlay.qcow2');
  let nginx: NginxServer;
  let local: BootedMachine;
  let remote: BootedMachine;
  /** nginx's log of the base when the remote guest had answered python3 -c 'print(1)'. */
  let remoteRequests: number;
  let remoteBytes: number;

  beforeAll(async () => {
    await ensureImages();
    await ensureDebian();
    nginx = await startNginx('public/images');
    // Both boots at once: each v86 runs on one core.
    [local, remote] = await Promise.all([
      (async () => {
        const machine = await bootMachine({ base: DEBIAN, overlay, timeout: PYTHON_MS });
        await machine.expect(PROMPT, { timeout: PROMPT_MS });
        return machine;
      })(),
      (async () => {
        const machine = await bootMachine({ base: `${nginx.url}debian.qcow2`, timeout: PYTHON_MS });
        await machine.expect(PROMPT, { timeout: PROMPT_MS });
        await machine.send("python3 -c 'print(6*7)'\n").expect(/^42$/m, { timeout: PYTHON_MS });
        const log = nginx.requests().filter((request) => request.uri === '/debian.qcow2');
        remoteRequests = log.length;
        remoteBytes = log.reduce((sum, request) => sum + request.bytes, 0);
        return machine;
      })(),
    ]);
  }, 1_200_000);

  afterAll(async () => {
    await Promise.all([local?.close(), remote?.close()]);
    await nginx?.close();
  });

  test('over HTTP: a cold boot to the prompt plus python3 -c takes at most 40 requests to the base', async () => {
    console.log(`Debian over HTTP, cold, to the prompt and python3 -c: ${remoteRequests} requests, ${(remoteBytes / 1048576).toFixed(1)} MiB`);
    expect(remoteRequests).toBeGreaterThan(0);
    expect(remoteRequests).toBeLessThanOrEqual(40);
    // The client's own count agrees with nginx's.
    expect(remote.http!.stats().requests).toBeGreaterThanOrEqual(remoteRequests);
    expect(await shell(remote, 'cat /etc/debian_version')).toMatch(/^12\.\d+\n$/);
  });

  test('from the file: bash on the serial console, python3 from a script file and -c', async () => {
    expect(await shell(local, 'echo $BASH_VERSION; id -u; echo $HOME')).toMatch(/^5\.2\.\d+.*\n0\n\/root\n$/);
    await local.send("printf 'import sys, json\\nprint(json.dumps({\"sum\": sum(range(10)), \"v\": sys.version_info[:2]}))\\n' > /root/t.py\n");
    expect(await shell(local, 'python3 /root/t.py', PYTHON_MS)).toBe('{"sum": 45, "v": [3, 11]}\n');
    expect(await shell(local, "python3 -c 'print(1)'", PYTHON_MS)).toBe('1\n');
  });

  test('the tools the issue names are Debian\'s, and the disk is 2 GiB with free space', async () => {
    const versions = await shell(local, 'bash --version | head -1; ls --version | head -1; mount --version; ps --version; less --version | head -1; nano --version | head -1; mke2fs -V 2>&1 | head -1; python3 --version');
    expect(versions).toMatch(/GNU bash, version 5\.2/);
    expect(versions).toMatch(/ls \(GNU coreutils\) 9\.1/);
    expect(versions).toMatch(/mount from util-linux 2\.38/);
    expect(versions).toMatch(/ps from procps-ng 4\.0/);
    expect(versions).toMatch(/less 590/);
    expect(versions).toMatch(/GNU nano, version 7\.2/);
    expect(versions).toMatch(/mke2fs 1\.47\.0/);
    expect(versions).toMatch(/Python 3\.11/);
    expect(await shell(local, 'dpkg-query -W -f \'${Package} ${Status}\\n\' python3 e2fsprogs')).toBe('e2fsprogs install ok installed\npython3 install ok installed\n');
    const [sectors, size, avail] = (await shell(local, 'cat /sys/block/vda/size; df -B1 --output=size,avail / | tail -1')).trim().split(/\s+/).map(Number);
    expect(sectors! * 512).toBeGreaterThanOrEqual(2 * 1024 ** 3);
    expect(size).toBeGreaterThan(1.9 * 1024 ** 3);
    expect(avail).toBeGreaterThan(1.5 * 1024 ** 3);
  });

  test('tty1 has a root shell too: typed into through the keyboard, answered on the screen', async () => {
    await local.expect(/root@qcow86:~# *$/m, { on: 'screen' });
    await local.sendKeys('echo tty1-$((6*7)) "$(tty)"\n').expect(/^tty1-42 \/dev\/tty1 *$/m, { on: 'screen' });
  });

  test('the overlay holds the writes and qemu-img finds it clean', async () => {
    await shell(local, 'sync');
    await local.close();
    const check = await qemuCheck(overlay);
    expect(check.exitCode, JSON.stringify(check.result)).toBe(0);
  });
});

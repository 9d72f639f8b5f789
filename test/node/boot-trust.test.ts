/**
 * `qcow86 boot` gives the guest only what the user named. A downloaded overlay whose backing file or data file
 * points elsewhere on the host, or at a link-local address (cloud metadata services), is refused before the
 * guest starts, naming the field, the value and --trust-image; names inside the overlay's directory, the --base
 * given and the default guest's base are opened. The link-local cases run inside `unshare -n` (a network
 * namespace without routes), so that even a wrong implementation sends nothing off the machine.
 */
import { describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { makeImage, qemuImg, sha256, tempDir, type RunResult } from '../helpers/qemu.js';
import { buildEngine } from '../helpers/build.js';
import { qcow86 } from '../cli/cli.js';
import { openBootDisk } from '../../src/node/boot-disk.js';
import { isLinkLocalAddress } from '../../src/io/node-fetch.js';

const dir = tempDir('qcow86-boot-trust-');
const guestDir = join(dir, 'guest');
const elsewhere = join(dir, 'elsewhere');
mkdirSync(guestDir);
mkdirSync(elsewhere);

/** An overlay in guestDir recording `backing` (format `format`), made with -u so nothing is opened. */
async function overlayOn(name: string, backing: string, format = 'qcow2'): Promise<string> {
  const path = join(guestDir, name);
  await qemuImg(['create', '-q', '-u', '-f', 'qcow2', '-b', backing, '-F', format, path, '4M']);
  return path;
}

/** `qcow86 boot` that must be refused before the guest starts. */
async function refusedBoot(args: string[], field: string, value: string): Promise<RunResult> {
  const result = await qcow86(['boot', ...args, '--timeout', '5', '--expect', 'never'], { timeoutMs: 60_000 });
  expect(result.exitCode, result.stderr).toBe(1);
  expect(result.stderr).toContain(`${field} '${value}'`);
  expect(result.stderr).toContain('--trust-image');
  // Refused before the machine was made: no console, no step ran.
  expect(result.stdout).toBe('');
  expect(result.stderr).not.toMatch(/step \d|last console lines/);
  return result;
}

describe('boot opens only what the user named', () => {
  it('refuses backing files outside the overlay\'s directory (also through a symlink) and host files', async () => {
    const outside = await makeImage({ path: join(elsewhere, 'base.qcow2'), size: '4M' });
    const overlay = await overlayOn('outside.qcow2', outside);
    const before = await sha256(overlay);
    await refusedBoot(['--overlay', overlay], 'backing file', outside);
    await refusedBoot(['--overlay', await overlayOn('passwd.qcow2', '/etc/passwd', 'raw')], 'backing file', '/etc/passwd');
    symlinkSync(outside, join(guestDir, 'link.qcow2'));
    await refusedBoot(['--overlay', await overlayOn('via-link.qcow2', 'link.qcow2')], 'backing file', 'link.qcow2');
    await refusedBoot(['--overlay', await overlayOn('dotdot.qcow2', '../elsewhere/base.qcow2')], 'backing file', '../elsewhere/base.qcow2');
    // A deeper layer counts as much as the first: a base inside the directory that itself names a host file.
    await qemuImg(['create', '-q', '-u', '-f', 'qcow2', '-b', '/etc/hostname', '-F', 'raw', join(guestDir, 'mid.qcow2'), '4M']);
    await refusedBoot(['--overlay', await overlayOn('deep.qcow2', 'mid.qcow2')], 'backing file', '/etc/hostname');
    expect(await sha256(overlay)).toBe(before);
  });

  it('refuses data files outside the overlay\'s directory, and any URL as a data file', async () => {
    const hostFile = join(elsewhere, 'secret.raw');
    writeFileSync(hostFile, Buffer.alloc(4 << 20, 0x5e));
    for (const [file, name] of [['d-host.qcow2', hostFile], ['d-url.qcow2', 'http://127.0.0.1:9/data.raw']] as const) {
      const path = join(guestDir, file);
      await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${path}.data`, path, '4M']);
      await qemuImg(['amend', '-o', `data_file=${name}`, path]);
      await refusedBoot(['--overlay', path], 'data file', name);
    }
  });

  it('opens names inside the overlay\'s directory, the --base given, the default base; anything with --trust-image', async () => {
    const inside = await makeImage({ path: join(guestDir, 'inside-base.qcow2'), size: '4M' }, [{ offset: 0, length: 4096, pattern: 0x42 }]);
    const outside = await makeImage({ path: join(elsewhere, 'named-base.qcow2'), size: '4M' }, [{ offset: 0, length: 4096, pattern: 0x43 }]);
    const opens = async (options: Parameters<typeof openBootDisk>[0], byte: number) => {
      const disk = await openBootDisk(options);
      expect((await disk.device.read(0, 4096))[0]).toBe(byte);
      await disk.device.close();
    };
    await opens({ overlay: await overlayOn('ok-inside.qcow2', 'inside-base.qcow2') }, 0x42);
    await opens({ overlay: await overlayOn('ok-inside-abs.qcow2', inside) }, 0x42);
    const named = await overlayOn('ok-named.qcow2', outside);
    await expect(openBootDisk({ overlay: named })).rejects.toThrow(/backing file .* refused \(boot with --trust-image/);
    await opens({ overlay: named, base: outside }, 0x43);
    await opens({ overlay: named, trustImage: true }, 0x43);
    // A new overlay on a --base elsewhere (it records the base's absolute path), and reopened with that --base.
    const fresh = join(guestDir, 'fresh.qcow2');
    await opens({ overlay: fresh, base: outside }, 0x43);
    await opens({ overlay: fresh, base: outside }, 0x43);
  });
});

describe('link-local addresses', () => {
  it('classifies addresses as the metadata guard must', () => {
    for (const address of ['169.254.169.254', '169.254.0.1', 'fe80::1', 'FE80::a:b', 'febf::1', '::ffff:169.254.169.254', '::ffff:a9fe:a9fe', '[::ffff:a9fe:1]', '::169.254.1.1', '64:ff9b::169.254.169.254', 'fe80::1%eth0']) {
      expect(isLinkLocalAddress(address), address).toBe(true);
    }
    for (const address of ['127.0.0.1', '10.0.0.1', '169.253.1.1', '170.254.1.1', '::1', 'fec0::1', '::ffff:127.0.0.1', '2001:db8::a9fe:a9fe', 'example.com', '']) {
      expect(isLinkLocalAddress(address), address).toBe(false);
    }
  });

  /** The CLI inside a new network namespace with no routes (and, with `hosts`, its own /etc/hosts). */
  function isolatedBoot(overlay: string, hosts?: string): Promise<RunResult> {
    const cli = pathToFileURL(join(buildEngine(), 'cli/cli.js')).href;
    const script = `import { main, exitOnStrayErrors } from ${JSON.stringify(cli)}; exitOnStrayErrors(process.argv[1]); process.exitCode = await main(process.argv.slice(1));`;
    const node = [process.execPath, '--input-type=module', '-e', script, 'boot', '--overlay', overlay, '--timeout', '5', '--expect', 'never'];
    const command = hosts
      ? ['unshare', '-n', '-m', 'sh', '-c', 'mount --bind "$0" /etc/hosts && exec "$@"', hosts, ...node]
      : ['unshare', '-n', ...node];
    return new Promise((done, reject) => {
      execFile(command[0]!, command.slice(1), { encoding: 'utf8', timeout: 60_000 }, (error, stdout, stderr) => {
        if (error && typeof error.code !== 'number') return reject(error);
        done({ stdout, stderr, exitCode: error ? (error.code as number) : 0 });
      });
    });
  }

  it('an overlay backed by a link-local URL (numeric forms, IPv6, a DNS name) is refused before any connection', async () => {
    const urls = [
      'http://169.254.169.254/latest/base.qcow2',
      'http://2852039166/base.qcow2',
      'http://0xa9.0xfe.0xa9.0xfe/base.qcow2',
      'http://169.254.43518/base.qcow2',
      'http://[::ffff:169.254.169.254]/base.qcow2',
      'http://[fe80::1]:8080/base.qcow2',
    ];
    for (const [index, url] of urls.entries()) {
      const overlay = await overlayOn(`ll-${index}.qcow2`, url);
      const result = await isolatedBoot(overlay);
      expect(result.exitCode, `${url}: ${result.stderr}`).toBe(1);
      expect(result.stderr, url).toMatch(/a link-local address \(the range of cloud metadata services\): refused/);
      expect(result.stderr, url).toContain('--trust-image');
    }
    // A name that resolves to a link-local address is judged on the address it resolves to.
    const hosts = join(dir, 'hosts');
    writeFileSync(hosts, '127.0.0.1 localhost\n169.254.169.254 metadata.test\n');
    const named = await overlayOn('ll-name.qcow2', 'http://metadata.test/base.qcow2');
    const result = await isolatedBoot(named, hosts);
    expect(result.exitCode, result.stderr).toBe(1);
    expect(result.stderr).toContain('host metadata.test resolves to 169.254.169.254, a link-local address');
  });
});

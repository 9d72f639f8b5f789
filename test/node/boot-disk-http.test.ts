/**
 * The disk `qcow86 boot --base URL --overlay FILE` opens, without booting: the base is opened once (one first
 * request, not two), the new overlay names the plain URL as its backing file (QEMU opens it through its curl
 * driver) and records the base's ETag in the 'q86v' header extension, QEMU keeps that extension when it
 * rewrites the header, and reopening the overlay after the base changed on the server is refused unless forced.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startNginx, type NginxServer } from '../helpers/nginx.js';
import { startFaultServer } from '../helpers/fault-server.js';
import { makeImage, qemuCheck, qemuImg, qemuInfo, qemuIo, tempDir } from '../helpers/qemu.js';
import { openBootDisk } from '../../src/node/boot-disk.js';
import { EXT_QCOW86_BACKING_VALIDATOR } from '../../src/qcow2/header.js';
import { main } from '../../src/node/cli.js';

const KiB = 1024;
const dir = tempDir('qcow86-boot-disk-http-');
const base = join(dir, 'base.qcow2');
let nginx: NginxServer;
let url: string;

beforeAll(async () => {
  await makeImage({ path: base, size: '8M' }, [{ offset: 0, length: 2048 * KiB, pattern: 0x5a }]);
  nginx = await startNginx(dir);
  url = `${nginx.url}base.qcow2`;
});
afterAll(async () => {
  await nginx?.close();
});

/** The 'q86v' extension found by walking the header extensions by hand (type, length, data padded to 8). */
function recordedValidator(path: string): string | undefined {
  const bytes = readFileSync(path);
  let at = bytes.readUInt32BE(100); // header_length (version 3)
  for (;;) {
    const type = bytes.readUInt32BE(at);
    const length = bytes.readUInt32BE(at + 4);
    if (type === 0) return undefined;
    if (type === EXT_QCOW86_BACKING_VALIDATOR) return bytes.subarray(at + 8, at + 8 + length).toString('utf8');
    at += 8 + Math.ceil(length / 8) * 8;
  }
}

async function etag(): Promise<string> {
  return (await fetch(url, { method: 'HEAD' })).headers.get('ETag')!;
}

describe('qcow86 boot disk over HTTP', () => {
  const overlay = join(dir, 'guest.qcow2');

  it('opens the base once, records the plain URL and the ETag, and QEMU reads the overlay over HTTP too', async () => {
    const before = nginx.requests().length;
    const disk = await openBootDisk({ base: url, overlay });
    expect(disk.description).toBe(`overlay ${overlay} (created) on ${url}`);
    expect(Buffer.from(await disk.device.read(1024 * KiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB, 0x5a))).toBe(true);
    await disk.device.write(4096 * KiB, new Uint8Array(64 * KiB).fill(0x77));
    const requests = nginx.requests().slice(before);
    expect(disk.http?.stats().requests).toBe(requests.length);
    await disk.device.close();
    // One first request: the overlay reuses the store that read the base's size and format.
    expect(requests.filter((r) => r.range.startsWith('bytes=0-'))).toHaveLength(1);
    expect(requests.every((r) => r.status === 206 && /^bytes=\d+-\d+$/.test(r.range))).toBe(true);

    expect(recordedValidator(overlay)).toBe(await etag());
    const info = await qemuInfo(overlay);
    expect(info['backing-filename']).toBe(url);
    expect(info['backing-filename-format']).toBe('qcow2');
    expect((await qemuCheck(overlay)).exitCode).toBe(0);
    // QEMU (its curl driver for the base) sees the base's data under the overlay's write. Small sequential reads:
    // QEMU 7.2's curl driver can hang on large parallel ones.
    const read = await qemuIo(['-r', '-f', 'qcow2', '-c', 'read -P 0x5a 1M 64k', '-c', 'read -P 0x77 4M 64k', '-c', 'read -P 0 6M 64k', overlay]);
    expect(read).not.toMatch(/verification failed|error/i);
    expect(read.match(/read 65536\/65536 bytes/g)).toHaveLength(3);
    // qemu-img amend rewrites the whole header: the unknown extension must survive it.
    await qemuImg(['amend', '-o', 'lazy_refcounts=on', overlay]);
    expect(recordedValidator(overlay)).toBe(await etag());
  });

  it('reopens on the same base, and refuses a changed base unless forced', async () => {
    const disk = await openBootDisk({ overlay });
    expect(Buffer.from(await disk.device.read(4096 * KiB, 512)).equals(Buffer.alloc(512, 0x77))).toBe(true);
    await disk.device.close();

    const recorded = await etag();
    // A new version of the base: other bytes, and a new mtime, so nginx's ETag changes.
    await makeImage({ path: base, size: '8M' }, [{ offset: 0, length: 2048 * KiB, pattern: 0x11 }]);
    const later = new Date(Date.now() + 10_000);
    utimesSync(base, later, later);
    const current = await etag();
    expect(current).not.toBe(recorded);
    await expect(openBootDisk({ overlay })).rejects.toThrow(
      `${overlay}: backing file '${url}' has changed since this overlay was made (recorded version ${recorded}, now ${current}); boot with --force-base-change to use it anyway`,
    );
    const forced = await openBootDisk({ overlay, forceBaseChange: true });
    expect(Buffer.from(await forced.device.read(0, 512)).equals(Buffer.alloc(512, 0x11))).toBe(true);
    await forced.device.close();
    // Forcing does not rewrite the record: the next plain open is refused again.
    expect(recordedValidator(overlay)).toBe(recorded);
  });

  it('the boot command line refuses the changed base with exit 1 and the flag to use', async () => {
    const errors: string[] = [];
    const original = console.error;
    console.error = (...args: unknown[]) => void errors.push(args.join(' '));
    try {
      expect(await main(['boot', '--overlay', overlay, '--expect', 'never'])).toBe(1);
    } finally {
      console.error = original;
    }
    expect(errors.join('\n')).toMatch(/qcow86 boot: .*guest\.qcow2: backing file '.*' has changed since this overlay was made .*--force-base-change/);
  });

  it('a base served without a strong ETag is pinned by its content: a changed one is refused', async () => {
    const bytes = readFileSync(base);
    const server = await startFaultServer(bytes, { etag: 'none', lastModified: false });
    try {
      const top = join(dir, 'pinned-top.qcow2');
      const disk = await openBootDisk({ base: server.url, overlay: top });
      await disk.device.write(4096 * KiB, new Uint8Array(64 * KiB).fill(0x66));
      await disk.device.close();
      const recorded = recordedValidator(top)!;
      expect(recorded).toMatch(/^pin:\d+:[0-9a-f]{16}$/);
      // The same bytes again (a new upload of the same file): accepted.
      server.setFile(bytes);
      await (await openBootDisk({ overlay: top })).device.close();
      // Other bytes of the same size: refused, naming both versions.
      const changed = Buffer.from(bytes);
      changed[0x10000] = changed[0x10000]! ^ 0xff;
      server.setFile(changed);
      await expect(openBootDisk({ overlay: top })).rejects.toThrow(new RegExp(`backing file '.*' has changed since this overlay was made \\(recorded version ${recorded}, now pin:`));
    } finally {
      await server.close();
    }
  });

  it('a raw base records its validator too', async () => {
    const raw = join(dir, 'base.raw');
    writeFileSync(raw, Buffer.alloc(1024 * KiB, 0x42));
    const top = join(dir, 'raw-top.qcow2');
    const disk = await openBootDisk({ base: `${nginx.url}base.raw`, overlay: top });
    expect(Buffer.from(await disk.device.read(512 * KiB, 512)).equals(Buffer.alloc(512, 0x42))).toBe(true);
    await disk.device.close();
    expect(recordedValidator(top)).toBe((await fetch(`${nginx.url}base.raw`, { method: 'HEAD' })).headers.get('ETag'));
    expect((await qemuInfo(top))['backing-filename-format']).toBe('raw');
    expect((await qemuCheck(top)).exitCode).toBe(0);
  });
});

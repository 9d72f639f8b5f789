/**
 * `qcow86 boot --object secret,id=ID,file=PATH --key-secret ID` on an encrypted overlay over the plain default
 * guest (the common case): the guest writes a file and the running machine is saved as a session. The file never
 * holds the guest's bytes in the clear, qemu-img (with the same secret) reads them, finds the image clean and lists
 * the session, whose VM state decrypts and decodes (written through the encryption, as QEMU's savevm does). A
 * wrong password stops the boot before anything runs.
 */
import { existsSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { expect, test } from 'vitest';
import { ensureImages } from '../../images/build.mjs';
import { buildEngine } from '../helpers/build.js';
import { qemuImg, run, sha256, tempDir } from '../helpers/qemu.js';
import { FileStore, nodeCodecs, nodeCrypto, nodeResolver } from '../../src/io/node.js';
import { openImage } from '../../src/qcow2/open.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { listSessions, loadSession } from '../../src/v86/session.js';
import { DEFAULT_BASE, BOOT_TIMEOUT_MS } from './guest.js';

const root = resolve(import.meta.dirname, '../..');

async function qcow86(args: string[]) {
  const dist = buildEngine();
  const publicDir = resolve(dist, '../public');
  if (!existsSync(publicDir)) symlinkSync(join(root, 'public'), publicDir);
  return run(process.execPath, ['--input-type=module', '-e', 'const { main } = await import(process.argv[1]); process.exitCode = await main(process.argv.slice(2));', join(dist, 'cli/cli.js'), ...args]);
}

test(
  'boot on an encrypted overlay: data and VM state encrypted at rest, readable by qemu-img with the same secret',
  async () => {
    await ensureImages();
    const dir = tempDir('qcow86-boot-encrypted-');
    const overlay = join(dir, 'encrypted.qcow2');
    const secretFile = join(dir, 'passphrase');
    writeFileSync(secretFile, 'guest disk passphrase');
    const secret = ['--object', `secret,id=disk,file=${secretFile}`];
    const created = await qcow86(['create', '-q', ...secret, '-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=disk,encrypt.iter-time=10', '-b', DEFAULT_BASE, '-F', 'qcow2', overlay]);
    expect(created.exitCode, created.stderr).toBe(0);

    const before = await sha256(overlay);
    const wrong = await qcow86(['boot', '--overlay', overlay, '--object', 'secret,id=disk,data=not it', '--key-secret', 'disk', '--expect', '# ']);
    expect(wrong.exitCode).toBe(1);
    expect(wrong.stderr).toContain('Invalid password, cannot unlock any keyslot');
    expect(await sha256(overlay)).toBe(before);

    const marker = 'MARK-$((6*7))-ENCRYPTED';
    const booted = await qcow86([
      'boot', '--overlay', overlay, ...secret, '--key-secret', 'disk', '--timeout', String(BOOT_TIMEOUT_MS / 1000),
      '--expect', '# ', '--send', `for i in $(seq 200); do echo ${marker}; done > /m; sync; echo SYNC$((1+1))\n`, '--expect', 'SYNC2',
      '--save-on-exit', 'encrypted-session',
    ]);
    expect(booted.exitCode, booted.stderr.slice(-2000)).toBe(0);

    const plain = 'MARK-42-ENCRYPTED';
    expect(readFileSync(overlay).includes(plain)).toBe(false);
    const raw = join(dir, 'disk.raw');
    await qemuImg(['convert', ...secret, '--image-opts', `driver=qcow2,file.filename=${overlay},encrypt.key-secret=disk`, '-O', 'raw', raw]);
    expect(readFileSync(raw).includes(plain)).toBe(true);
    const check = await run('qemu-img', ['check', ...secret, '--image-opts', `driver=qcow2,file.filename=${overlay},encrypt.key-secret=disk`]);
    expect(check.exitCode, check.stdout + check.stderr).toBe(0);
    const listed = await qemuImg(['snapshot', ...secret, '--image-opts', `driver=qcow2,file.filename=${overlay},encrypt.key-secret=disk`, '-l']);
    expect(listed).toContain('encrypted-session');

    // The session's VM state reads back through the decryption and decodes (its checksum holds).
    const store = await FileStore.open(overlay, { readOnly: true });
    const password = new Uint8Array(readFileSync(secretFile));
    const image = await openImage(store, { readOnly: true, resolver: nodeResolver(), codecs: nodeCodecs(), crypto: nodeCrypto(), passwords: () => password });
    try {
      if (!(image instanceof Qcow2Image)) throw new Error('not qcow2');
      expect(listSessions(image).map((s) => s.name)).toContain('encrypted-session');
      const session = await loadSession(image, 'encrypted-session', nodeCodecs());
      expect(session.state.byteLength).toBeGreaterThan(1024 * 1024);
    } finally {
      await image.close();
    }
  },
  BOOT_TIMEOUT_MS * 2,
);

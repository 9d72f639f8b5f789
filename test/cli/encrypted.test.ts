/**
 * Encrypted images made by qemu-img, in qemu-img's spelling (--object secret,..., --image-opts):
 * - `info` shows them as qemu-img does without the key (JSON and human, every field of the LUKS header);
 * - with the key their data reads as qemu-img reads it; without it every other verb refuses with QEMU's words;
 * - a wrong password exits 1 with QEMU's message and writes nothing, whatever the verb;
 * - every field of a damaged LUKS header ends in the error qemu-img gives for it;
 * - any active key slot unlocks (slots added and removed by qemu-img amend);
 * - legacy AES images (qcow2 and qcow) read as in qemu-img and convert out to LUKS; writing them is refused.
 */
import { describe, expect, it } from 'vitest';
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ioCommand, qemuImg, qemuIo, run, sha256, tempDir, type ImageWrite } from '../helpers/qemu.js';
import { PASSWORD, SECRET, SECRET_ID, firstDifference, imageOpts, qemuContents, qemuLuks, qemuWrite } from '../helpers/luks.js';
import { qcow86, qcow86InProcess } from './cli.js';

const dir = tempDir('qcow86-encrypted-');
const MiB = 1024 * 1024;

const WRITES: ImageWrite[] = [
  { offset: 0, length: 65536, pattern: 0x5a },
  { offset: 70_000, length: 1000, pattern: 0x21 },
  { offset: 3 * MiB + 100, length: 200_000, pattern: 0x42 },
];

async function encrypted(name: string, options: string): Promise<string> {
  const path = join(dir, name);
  await qemuImg(['create', '-q', ...SECRET, '-f', 'qcow2', '-o', `${options},encrypt.key-secret=${SECRET_ID}`, path, '4M']);
  return path;
}

const withoutActualSize = (json: string) => {
  const info = JSON.parse(json);
  delete info['actual-size'];
  return info;
};

/** What qemu-img said after "Could not open '...': ". */
function qemuReason(stderr: string): string {
  return stderr.trim().replace(/^qemu-img: (Could not open '[^']*': )?/, '');
}

describe('encrypted images', () => {
  const cases: [string, string][] = [
    ['luks.qcow2', 'encrypt.format=luks,encrypt.iter-time=10'],
    ['luks-cbc.qcow2', 'encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.iter-time=10'],
    ['aes.qcow2', 'encrypt.format=aes'],
  ];
  for (const [name, options] of cases) {
    it(`${options}: info as qemu-img's; data with the key as qemu-img reads it, refused without`, async () => {
      const path = await encrypted(name, options);
      await qemuWrite(path, WRITES);
      const theirs = await qemuImg(['info', '--output=json', path]);
      const ours = await qcow86(['info', '--output=json', path]);
      expect(ours.exitCode, ours.stderr).toBe(0);
      expect(withoutActualSize(ours.stdout)).toEqual(withoutActualSize(theirs));
      expect(JSON.parse(ours.stdout).encrypted).toBe(true);
      const human = await qcow86(['info', path]);
      const theirHuman = await qemuImg(['info', path]);
      const noDiskSize = (text: string) => text.replace(/^disk size: .*$/m, '');
      expect(noDiskSize(human.stdout)).toBe(noDiskSize(theirHuman));
      // The image-opts spelling works for info too.
      const opts = await qcow86(['info', ...SECRET, '--image-opts', imageOpts(path), '--output=json']);
      expect(withoutActualSize(opts.stdout)).toEqual(withoutActualSize(theirs));

      const out = join(dir, `${name}.raw`);
      const converted = await qcow86(['convert', ...SECRET, '--image-opts', imageOpts(path), '-O', 'raw', out]);
      expect(converted.exitCode, converted.stderr).toBe(0);
      expect(firstDifference(new Uint8Array(readFileSync(out)), await qemuContents(path))).toBe(-1);

      for (const command of [['convert', '-O', 'raw', path, join(dir, 'out.raw')], ['map', path], ['compare', path, path], ['io', '-c', 'read 0 64k', path], ['check', path], ['snapshot', '-l', path]]) {
        const result = await qcow86(command);
        // compare's error code is 2, as qemu-img's (1 means 'different').
        expect(result.exitCode, `${command[0]}: ${result.stdout}`).toBe(command[0] === 'compare' ? 2 : 1);
        expect(result.stderr).toContain("Parameter 'encrypt.key-secret' is required for cipher");
      }
      // qemu-img cannot read the data without the secret either.
      expect((await run('qemu-img', ['convert', '-O', 'raw', path, join(dir, 'theirs.raw')])).exitCode).toBe(1);
    });
  }

  it('a wrong password: exit 1 with QEMU\'s words, and no verb writes anything', async () => {
    const path = await qemuLuks(join(dir, 'wrong.qcow2'), '4M', undefined, WRITES);
    const theirs = await run('qemu-img', ['convert', '--object', 'secret,id=sec0,data=nope', '--image-opts', imageOpts(path), '-O', 'raw', join(dir, 'x.raw')]);
    expect(qemuReason(theirs.stderr)).toBe('Invalid password, cannot unlock any keyslot');
    const before = await sha256(path);
    const wrong = ['--object', 'secret,id=sec0,data=nope', '--image-opts', imageOpts(path)];
    const verbs = [
      ['convert', ...wrong, '-O', 'raw', join(dir, 'x.raw')],
      ['io', ...wrong, '-c', 'write -P 1 0 4k'],
      ['snapshot', ...wrong, '-c', 'snap'],
      ['resize', ...wrong, '8M'],
      ['amend', ...wrong, '-o', 'lazy_refcounts=on'],
      ['check', ...wrong, '-r', 'all'],
      ['commit', ...wrong],
      ['rebase', ...wrong, '-u', '-b', ''],
      ['map', ...wrong],
    ];
    for (const args of verbs) {
      const result = await qcow86(args);
      expect(result.exitCode, `${args[0]}: ${result.stdout}`).toBe(1);
      expect(result.stderr).toContain('Invalid password, cannot unlock any keyslot');
    }
    expect(await sha256(path)).toBe(before);
    expect(existsSync(`${path}.qcow86.lock`)).toBe(false);
    // encrypt.format must match the header, as in qemu-img.
    const mismatch = await qcow86(['map', ...SECRET, '--image-opts', imageOpts(path, ',encrypt.format=aes')]);
    expect(mismatch.exitCode).toBe(1);
    expect(mismatch.stderr).toContain("Header reported 'luks' encryption format but options specify 'aes'");
  });

  it('secrets as qemu-img takes them: data=, file= (as it is, newline included), format=base64; unknown ids and non-UTF-8 refused', async () => {
    const secretFile = join(dir, 'secret.txt');
    writeFileSync(secretFile, 'from a file\n');
    const path = join(dir, 'file-secret.qcow2');
    await qemuImg(['create', '-q', '--object', `secret,id=s1,file=${secretFile}`, '-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=s1,encrypt.iter-time=10', path, '1M']);
    await qemuIo(['--object', `secret,id=s1,file=${secretFile}`, '--image-opts', `driver=qcow2,file.filename=${path},encrypt.key-secret=s1`, '-c', ioCommand({ offset: 4096, length: 4096, pattern: 7 })]);
    const read = ['-c', 'read -P 7 4k 4k'];
    const opts = `driver=qcow2,file.filename=${path},encrypt.key-secret=s1`;
    expect((await qcow86(['io', '--object', `secret,id=s1,file=${secretFile}`, '--image-opts', opts, ...read])).exitCode).toBe(0);
    expect((await qcow86(['io', '--object', `secret,id=s1,data=${Buffer.from('from a file\n').toString('base64')},format=base64`, '--image-opts', opts, ...read])).exitCode).toBe(0);
    // Without the newline it is another password.
    const trimmed = await qcow86(['io', '--object', 'secret,id=s1,data=from a file', '--image-opts', opts, ...read]);
    expect(trimmed.stderr).toContain('Invalid password, cannot unlock any keyslot');
    const missing = await qcow86(['io', ...SECRET, '--image-opts', opts, ...read]);
    expect(missing.exitCode).toBe(1);
    expect(missing.stderr).toContain("No secret with id 's1'");
    writeFileSync(secretFile, Buffer.from([0xff, 0xfe]));
    const binary = await qcow86(['io', '--object', `secret,id=s1,file=${secretFile}`, '--image-opts', opts, ...read]);
    expect(binary.stderr).toContain('Data from secret s1 is not valid UTF-8');
    const badObject = await qcow86(['io', '--object', 'secret,id=s1', '--image-opts', opts, ...read]);
    expect(badObject.stderr).toContain("Either 'file' or 'data' must be provided");
  });

  it('any active key slot unlocks: slots added and erased by qemu-img amend', async () => {
    const path = await qemuLuks(join(dir, 'slots.qcow2'), '1M', undefined, [{ offset: 0, length: 4096, pattern: 9 }]);
    const second = ['--object', 'secret,id=sec1,data=second password'];
    await qemuImg(['amend', ...SECRET, ...second, '--image-opts', imageOpts(path), '-o', 'encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10']);
    await qemuImg(['amend', ...SECRET, ...second, '--image-opts', `driver=qcow2,file.filename=${path},encrypt.key-secret=sec1`, '-o', 'encrypt.state=inactive,encrypt.keyslot=0']);
    const info = JSON.parse(await qemuImg(['info', '--output=json', path]));
    expect(info['format-specific'].data.encrypt.slots.map((s: { active: boolean }) => s.active)).toEqual([false, true, false, false, false, false, false, false]);
    const withSecond = await qcow86(['io', ...second, '--image-opts', `driver=qcow2,file.filename=${path},encrypt.key-secret=sec1`, '-c', 'read -P 9 0 4k']);
    expect(withSecond.exitCode, withSecond.stderr + withSecond.stdout).toBe(0);
    const withFirst = await qcow86(['io', ...SECRET, '--image-opts', imageOpts(path), '-c', 'read -P 9 0 4k']);
    expect(withFirst.stderr).toContain('Invalid password, cannot unlock any keyslot');
  });

  it('new images: aes-192-cbc is refused (qemu-img 7.2 aborts on it), unknown ciphers and hashes by name', async () => {
    const create = (options: string) => qcow86(['create', ...SECRET, '-f', 'qcow2', '-o', `encrypt.format=luks,encrypt.key-secret=${SECRET_ID},${options}`, join(dir, 'refused.qcow2'), '1M']);
    expect((await create('encrypt.cipher-alg=aes-192,encrypt.cipher-mode=cbc')).stderr).toContain('aes-192 in cbc mode is not supported for new images');
    expect((await create('encrypt.cipher-alg=twofish-128')).stderr).toContain("cipher 'twofish-128' is not supported by qcow86");
    expect((await create('encrypt.cipher-alg=aes-999')).stderr).toContain("Parameter 'cipher-alg' does not accept value 'aes-999'");
    expect((await create('encrypt.hash-alg=sha3')).stderr).toContain("Parameter 'hash-alg' does not accept value 'sha3'");
    expect((await create('encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1')).stderr).toContain('No AES cipher with key size 20 available');
    expect((await create('encrypt.cipher-mode=ctr')).stderr).toContain("cipher mode 'ctr' is not supported by qcow86");
    const noKey = await qcow86(['create', '-f', 'qcow2', '-o', 'encrypt.format=luks', join(dir, 'refused.qcow2'), '1M']);
    expect(noKey.stderr).toContain("Parameter 'encrypt.key-secret' is required for cipher");
    const legacy = await qcow86(['create', ...SECRET, '-f', 'qcow2', '-o', `encrypt.format=aes,encrypt.key-secret=${SECRET_ID}`, join(dir, 'refused.qcow2'), '1M']);
    expect(legacy.stderr).toContain('use encrypt.format=luks');
  });
});

describe('a damaged LUKS header ends in the error qemu-img gives', () => {
  it('every field', async () => {
    const path = await qemuLuks(join(dir, 'damage.qcow2'), '1M', undefined, [{ offset: 0, length: 4096, pattern: 3 }]);
    const info = JSON.parse(await qemuImg(['info', '--output=json', path]));
    expect(info['format-specific'].data.encrypt['cipher-mode']).toBe('xts');
    const file = readFileSync(path);
    const headerLength = file.readUInt32BE(100);
    // The FDE extension comes first in qemu-img's header: its LUKS area offset and length.
    expect(file.readUInt32BE(headerLength)).toBe(0x0537be77);
    const area = Number(file.readBigUInt64BE(headerLength + 8));
    const slot = (i: number, field: number) => area + 208 + 48 * i + field;
    const u32 = (value: number) => {
      const b = Buffer.alloc(4);
      b.writeUInt32BE(value);
      return b;
    };
    const text = (value: string, pad = 0) => Buffer.concat([Buffer.from(value, 'latin1'), Buffer.alloc(pad)]);
    // [what, offset, bytes, our message when it differs from qemu-img's]
    const damages: [string, number, Buffer, string?][] = [
      ['magic', area, text('LUKX')],
      ['version', area + 6, Buffer.from([0, 2])],
      ['cipher name', area + 8, text('foo', 1)],
      ['cipher name, not terminated', area + 8, Buffer.alloc(32, 0x61)],
      ['cipher name serpent', area + 8, text('serpent', 1), "cipher 'serpent' is not supported by qcow86"],
      ['cipher mode, not terminated', area + 40, Buffer.alloc(32, 0x78)],
      ['cipher mode, no ivgen', area + 40, text('xts', 1)],
      ['cipher mode, unknown', area + 40, text('xxx-plain64', 1)],
      // ECB keys are not split in two: a 64-byte key is too long for it (as qemu-img says).
      ['cipher mode ecb', area + 40, text('ecb-plain64', 1)],
      ['ivgen', area + 40, text('xts-plain65', 1)],
      ['essiv without hash', area + 40, text('xts-essiv', 1)],
      ['essiv with sha1', area + 40, text('xts-essiv:sha1', 1)],
      ['ivgen hash', area + 40, text('xts-plain64:foo', 1)],
      ['hash spec', area + 72, text('sha2566', 1)],
      ['hash spec, not terminated', area + 72, Buffer.alloc(32, 0x68)],
      ['payload offset', area + 104, u32(2)],
      ['key bytes 0', area + 108, u32(0)],
      ['key bytes 1000', area + 108, u32(1000)],
      ['key bytes 48', area + 108, u32(48)],
      ['master key digest', area + 112, Buffer.alloc(20)],
      ['master key salt', area + 132, Buffer.alloc(4)],
      ['master key iterations', area + 164, u32(0)],
      ['slot 0 state', slot(0, 0), u32(1)],
      ['slot 0 inactive', slot(0, 0), u32(0xdead)],
      ['slot 0 iterations', slot(0, 4), u32(0)],
      ['slot 0 salt', slot(0, 8), Buffer.from([1])],
      ['slot 0 key offset in the header', slot(0, 40), u32(2)],
      ['slot 0 key offset on slot 1', slot(0, 40), u32(512)],
      ['slot 0 key offset past the payload', slot(0, 40), u32(5000)],
      ['slot 0 stripes', slot(0, 44), u32(3999)],
      ['slot 3 stripes', slot(3, 44), u32(0)],
      ['slot 3 state', slot(3, 0), u32(5)],
      ['key material', area + 4096 + 100, Buffer.from([1, 2, 3])],
      ['extension offset unaligned', headerLength + 8, Buffer.from([0, 0, 0, 0, 0, 4, 2, 0])],
      ['extension length', headerLength + 16, Buffer.from([0, 0, 0, 0, 0, 0, 16, 0])],
      ['extension size', headerLength + 4, u32(8)],
    ];
    for (const [what, offset, bytes, ours] of damages) {
      const damaged = join(dir, `damaged ${what.replace(/,/g, '')}.qcow2`);
      copyFileSync(path, damaged);
      const copy = readFileSync(damaged);
      bytes.copy(copy, offset);
      writeFileSync(damaged, copy);
      const theirs = await run('qemu-img', ['convert', ...SECRET, '--image-opts', imageOpts(damaged), '-O', 'raw', join(dir, 'damaged.raw')]);
      expect(theirs.exitCode, what).toBe(1);
      const result = await qcow86InProcess(['convert', ...SECRET, '--image-opts', imageOpts(damaged), '-O', 'raw', join(dir, 'damaged.raw')]);
      expect(result.exitCode, what).toBe(1);
      expect(result.stderr, what).toContain(ours ?? qemuReason(theirs.stderr));
    }
    // The real binary once, for the exit code and the line it prints.
    const magic = join(dir, 'damaged magic.qcow2');
    const result = await qcow86(['convert', ...SECRET, '--image-opts', imageOpts(magic), '-O', 'raw', join(dir, 'damaged.raw')]);
    expect(result.exitCode).toBe(1);
    expect(result.stderr).toMatch(/^qcow86 convert: .*damaged magic\.qcow2: Volume is not in LUKS format \(LUKS header field magic at offset \d+\)\n$/);
  });
});

describe('legacy AES (qcow2 and qcow version 1)', () => {
  for (const format of ['qcow2', 'qcow'] as const) {
    it(`${format}: reads as qemu-img reads it, converts out to LUKS; writes are refused`, async () => {
      const path = join(dir, `legacy.${format}`);
      await qemuImg(['create', '-q', ...SECRET, '-f', format, '-o', `encrypt.format=aes,encrypt.key-secret=${SECRET_ID}`, path, '4M']);
      await qemuWrite(path, WRITES, format);
      const theirs = await qemuContents(path, { driver: format });
      const out = join(dir, `legacy-${format}.raw`);
      const converted = await qcow86(['convert', ...SECRET, '--image-opts', imageOpts(path, '', format), '-O', 'raw', out]);
      expect(converted.exitCode, converted.stderr).toBe(0);
      expect(firstDifference(new Uint8Array(readFileSync(out)), theirs)).toBe(-1);
      // Unaligned reads decrypt whole sectors and return the part asked for.
      const io = await qcow86(['io', ...SECRET, '--image-opts', imageOpts(path, '', format), '-c', 'read -P 33 70000 1000']);
      expect(io.exitCode, io.stdout + io.stderr).toBe(0);

      const before = await sha256(path);
      const write = await qcow86(['io', ...SECRET, '--image-opts', imageOpts(path, '', format), '-c', 'write -P 1 0 512']);
      expect(write.exitCode).toBe(1);
      // qemu-io's way: the failed command's message on stdout, exit 1.
      expect(write.stdout + write.stderr).toMatch(format === 'qcow2' ? /convert it to LUKS/ : /read-only/);
      expect(await sha256(path)).toBe(before);

      const luks = join(dir, `from-legacy-${format}.qcow2`);
      const out2 = await qcow86(['convert', ...SECRET, '--image-opts', imageOpts(path, '', format), '-O', 'qcow2', '-o', `encrypt.format=luks,encrypt.key-secret=${SECRET_ID},encrypt.iter-time=10`, luks]);
      expect(out2.exitCode, out2.stderr).toBe(0);
      expect(firstDifference(await qemuContents(luks), theirs)).toBe(-1);
      const check = await run('qemu-img', ['check', ...SECRET, '--image-opts', imageOpts(luks)]);
      expect(check.exitCode, check.stdout + check.stderr).toBe(0);
    });
  }
  it('the password of a legacy image is its first 16 bytes, unchecked (as in QEMU): a wrong one reads other bytes', async () => {
    const path = join(dir, 'legacy-long.qcow2');
    const long = ['--object', `secret,id=${SECRET_ID},data=${PASSWORD}-and-more-than-16`];
    await qemuImg(['create', '-q', ...long, '-f', 'qcow2', '-o', `encrypt.format=aes,encrypt.key-secret=${SECRET_ID}`, path, '1M']);
    await qemuIo([...long, '--image-opts', imageOpts(path), '-c', 'write -P 5 0 4k']);
    // Only the first 16 bytes count: PASSWORD and its longer form are the same key.
    expect((await qcow86(['io', ...SECRET, '--image-opts', imageOpts(path), '-c', 'read -P 5 0 4k'])).exitCode).toBe(0);
    expect((await qcow86(['io', '--object', `secret,id=${SECRET_ID},data=other`, '--image-opts', imageOpts(path), '-c', 'read -P 5 0 4k'])).exitCode).toBe(1);
  });
});

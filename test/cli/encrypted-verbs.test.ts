/**
 * Every verb on encrypted images, side by side with qemu-img in its spelling (--object, --image-opts,
 * backing.encrypt.key-secret for an encrypted backing file): convert in, out and plain to encrypted, map,
 * compare, check and check -r, commit, rebase, snapshot, resize, measure, amend. The common case is an encrypted
 * overlay on a plain base. What qcow86 writes reads back in qemu-img and passes qemu-img check. Work done on
 * worker threads (encryption, decryption, compression) gives the bytes the calling thread would.
 */
import { describe, expect, it } from 'vitest';
import { copyFileSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeImage, qemuConvertToRaw, qemuImg, qemuIo, run, sha256, tempDir, type ImageWrite } from '../helpers/qemu.js';
import { SECRET, SECRET_ID, applyWrites, firstDifference, imageOpts, qemuContents, qemuLuks, qemuWrite } from '../helpers/luks.js';
import { qcow86 } from './cli.js';

const MiB = 1024 * 1024;
const LUKS = `encrypt.format=luks,encrypt.key-secret=${SECRET_ID},encrypt.iter-time=10`;

async function ok(args: string[], options: { cwd?: string; env?: Record<string, string> } = {}): Promise<string> {
  const result = await qcow86(args, options);
  expect(result.exitCode, `qcow86 ${args.join(' ')}\n${result.stderr}${result.stdout}`).toBe(0);
  return result.stdout;
}

async function qemuCheckClean(path: string, extra = ''): Promise<void> {
  const check = await run('qemu-img', ['check', ...SECRET, '--image-opts', imageOpts(path, extra)]);
  expect(check.exitCode, check.stdout + check.stderr).toBe(0);
}

/** A plain base with data, and an encrypted overlay on it written by qemu-io: the common case. */
async function overlayOnPlainBase(dir: string): Promise<{ base: string; overlay: string; expected: Uint8Array }> {
  const baseWrites: ImageWrite[] = [
    { offset: 0, length: 2 * MiB, pattern: 0x10 },
    { offset: 3 * MiB, length: 100_000, pattern: 0x20 },
  ];
  const base = await makeImage({ path: join(dir, 'base.qcow2'), size: '4M' }, baseWrites);
  const overlayWrites: ImageWrite[] = [
    { offset: 1000, length: 3000, pattern: 0x31 },
    { offset: MiB + 512, length: 65536, pattern: 0x32 },
    { offset: 3 * MiB + 50_000, length: 4096, zero: true },
  ];
  const overlay = await qemuLuks(join(dir, 'overlay.qcow2'), '4M', LUKS, overlayWrites, ['-b', 'base.qcow2', '-F', 'qcow2']);
  const expected = new Uint8Array(4 * MiB);
  applyWrites(expected, baseWrites);
  applyWrites(expected, overlayWrites);
  return { base, overlay, expected };
}

describe('verbs on encrypted images', () => {
  it('convert: an encrypted overlay on a plain base out to raw and to plain qcow2; plain to encrypted; encrypted to encrypted; -l SNAPSHOT', async () => {
    const dir = tempDir();
    const { overlay, expected } = await overlayOnPlainBase(dir);
    expect(firstDifference(await qemuContents(overlay), expected)).toBe(-1);
    await ok(['convert', ...SECRET, '--image-opts', imageOpts(overlay), '-O', 'raw', join(dir, 'out.raw')]);
    expect(firstDifference(new Uint8Array(readFileSync(join(dir, 'out.raw'))), expected)).toBe(-1);
    await ok(['convert', ...SECRET, '--image-opts', imageOpts(overlay), '-O', 'qcow2', join(dir, 'plain.qcow2')]);
    expect((await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', join(dir, 'out.raw'), join(dir, 'plain.qcow2')])).exitCode).toBe(0);
    // Plain to encrypted, with QEMU's defaults (aes-256-xts-plain64, sha256).
    await ok(['convert', ...SECRET, '-f', 'raw', join(dir, 'out.raw'), '-O', 'qcow2', '-o', LUKS, join(dir, 'encrypted.qcow2')]);
    expect(firstDifference(await qemuContents(join(dir, 'encrypted.qcow2')), expected)).toBe(-1);
    await qemuCheckClean(join(dir, 'encrypted.qcow2'));
    const info = JSON.parse(await qemuImg(['info', '--output=json', join(dir, 'encrypted.qcow2')]));
    expect(info['format-specific'].data.encrypt).toMatchObject({ format: 'luks', 'cipher-alg': 'aes-256', 'cipher-mode': 'xts', 'ivgen-alg': 'plain64', 'hash-alg': 'sha256' });
    // Encrypted to encrypted (another cipher), with a snapshot taken by qemu-img in between.
    await qemuImg(['snapshot', ...SECRET, '--image-opts', imageOpts(overlay), '-c', 'before']);
    await qemuWrite(overlay, [{ offset: 0, length: MiB, pattern: 0x77 }]);
    const cbc = `${LUKS},encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv`;
    await ok(['convert', ...SECRET, '--image-opts', imageOpts(overlay), '-l', 'before', '-O', 'qcow2', '-o', cbc, join(dir, 'snap.qcow2')]);
    expect(firstDifference(await qemuContents(join(dir, 'snap.qcow2')), await qemuContents(overlay, { snapshot: 'before' }))).toBe(-1);
    await qemuCheckClean(join(dir, 'snap.qcow2'));
    // -c cannot be combined with encryption (qemu-img's words).
    const compressed = await qcow86(['convert', ...SECRET, '-c', '-f', 'raw', join(dir, 'out.raw'), '-O', 'qcow2', '-o', LUKS, join(dir, 'c.qcow2')]);
    expect(compressed.stderr).toContain('Compression and encryption not supported at the same time');
  });

  it('map, compare and check as qemu-img gives them; check -r leaks repairs an encrypted image', async () => {
    const dir = tempDir();
    const { overlay } = await overlayOnPlainBase(dir);
    const opts = ['--image-opts', imageOpts(overlay)];
    const theirMap = await qemuImg(['map', ...SECRET, '--output=json', ...opts]);
    expect(await ok(['map', ...SECRET, '--output=json', ...opts])).toBe(theirMap);
    // Encrypted clusters have no offset a reader could use: qemu-img's human map refuses them.
    const human = await qcow86(['map', ...SECRET, ...opts]);
    expect(human.exitCode).toBe(1);
    expect(human.stderr).toContain('File contains external, encrypted or compressed clusters.');
    await ok(['convert', ...SECRET, ...opts, '-O', 'raw', join(dir, 'same.raw')]);
    // With --image-opts both images are option lists.
    expect(await ok(['compare', ...SECRET, ...opts, `driver=raw,file.filename=${join(dir, 'same.raw')}`])).toBe('Images are identical.\n');
    const changed = readFileSync(join(dir, 'same.raw'));
    changed[MiB + 70_000] ^= 1;
    writeFileSync(join(dir, 'changed.raw'), changed);
    const theirs = await run('qemu-img', ['compare', ...SECRET, ...opts, `driver=raw,file.filename=${join(dir, 'changed.raw')}`]);
    const ours = await qcow86(['compare', ...SECRET, ...opts, `driver=raw,file.filename=${join(dir, 'changed.raw')}`]);
    expect({ code: ours.exitCode, out: ours.stdout }).toEqual({ code: theirs.exitCode, out: theirs.stdout });

    // A leaked cluster: one more cluster at the end of the file, counted in the first refcount block (cluster
    // 2, 16-bit entries) but used by nothing.
    const file = readFileSync(overlay);
    const leaked = Math.ceil(file.length / 65536);
    const grown = Buffer.concat([file, Buffer.alloc(leaked * 65536 + 65536 - file.length)]);
    grown.writeUInt16BE(1, 2 * 65536 + 2 * leaked);
    writeFileSync(overlay, grown);
    const theirCheck = await run('qemu-img', ['check', ...SECRET, '--output=json', ...opts]);
    const ourCheck = await qcow86(['check', ...SECRET, '--output=json', ...opts]);
    expect({ code: ourCheck.exitCode, json: JSON.parse(ourCheck.stdout) }).toEqual({ code: theirCheck.exitCode, json: JSON.parse(theirCheck.stdout) });
    expect(ourCheck.exitCode).toBe(3);
    await ok(['check', ...SECRET, ...opts, '-r', 'leaks']);
    await qemuCheckClean(overlay);
  });

  it('commit: an encrypted overlay into its plain base, and a plain overlay into an encrypted base (backing.encrypt.key-secret)', async () => {
    const dir = tempDir();
    const { base, overlay, expected } = await overlayOnPlainBase(dir);
    await ok(['commit', ...SECRET, '--image-opts', imageOpts(overlay)]);
    expect(firstDifference(await qemuConvertToRaw(base), expected)).toBe(-1);
    expect((await run('qemu-img', ['compare', ...SECRET, '--image-opts', imageOpts(overlay), `driver=qcow2,file.filename=${base}`])).exitCode).toBe(0);

    // Encrypted base, plain top: QEMU's spelling names the base's secret with backing.
    const encBase = await qemuLuks(join(dir, 'enc-base.qcow2'), '4M', LUKS, [{ offset: 0, length: 4 * MiB, pattern: 0x41 }]);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'enc-base.qcow2', '-F', 'qcow2', join(dir, 'top.qcow2')]);
    const topOpts = `driver=qcow2,file.filename=${join(dir, 'top.qcow2')},backing.encrypt.key-secret=${SECRET_ID}`;
    await qemuIo([...SECRET, '--image-opts', topOpts, '-c', 'write -P 0x42 100000 300000']);
    const top = new Uint8Array(4 * MiB).fill(0x41);
    top.fill(0x42, 100_000, 400_000);
    await ok(['commit', ...SECRET, '--image-opts', topOpts]);
    expect(firstDifference(await qemuContents(encBase), top)).toBe(-1);
    await qemuCheckClean(encBase);
  });

  it('rebase, snapshot, resize and amend on an encrypted image; the results read back in qemu-img and pass its check', async () => {
    const dir = tempDir();
    const { overlay, expected } = await overlayOnPlainBase(dir);
    const opts = ['--image-opts', imageOpts(overlay)];
    // Safe rebase onto nothing: the base's data is copied in, encrypted.
    await ok(['rebase', ...SECRET, ...opts, '-b', '']);
    expect(firstDifference(await qemuContents(overlay), expected)).toBe(-1);
    await qemuCheckClean(overlay);

    await ok(['snapshot', ...SECRET, ...opts, '-c', 'first']);
    await ok(['io', ...SECRET, ...opts, '-c', 'write -P 0x99 4096 1M']);
    const list = await ok(['snapshot', ...SECRET, ...opts, '-l']);
    expect(list).toContain('first');
    const theirList = await qemuImg(['snapshot', ...SECRET, ...opts, '-l']);
    expect(theirList).toContain('first');
    expect(firstDifference(await qemuContents(overlay, { snapshot: 'first' }), expected)).toBe(-1);
    await ok(['snapshot', ...SECRET, ...opts, '-a', 'first']);
    expect(firstDifference(await qemuContents(overlay), expected)).toBe(-1);
    await ok(['snapshot', ...SECRET, ...opts, '-d', 'first']);
    await qemuCheckClean(overlay);

    await ok(['resize', ...SECRET, ...opts, '6M']);
    await ok(['io', ...SECRET, ...opts, '-c', 'write -P 0x66 5M 1M']);
    const grown = new Uint8Array(6 * MiB);
    grown.set(expected);
    grown.fill(0x66, 5 * MiB);
    expect(firstDifference(await qemuContents(overlay), grown)).toBe(-1);

    // Downgrading to version 2 turns zero clusters into clusters of zeros: encrypted zeros.
    await ok(['io', ...SECRET, ...opts, '-c', 'write -z 2M 64k']);
    grown.fill(0, 2 * MiB, 2 * MiB + 65536);
    await ok(['amend', ...SECRET, ...opts, '-o', 'compat=0.10']);
    expect(JSON.parse(await qemuImg(['info', '--output=json', overlay]))['format-specific'].data.compat).toBe('0.10');
    expect(firstDifference(await qemuContents(overlay), grown)).toBe(-1);
    await qemuCheckClean(overlay);
  });

  it('measure: a LUKS target adds its header area as qemu-img counts it; an encrypted source is measured with its key', async () => {
    const dir = tempDir();
    const { overlay } = await overlayOnPlainBase(dir);
    const cases = [
      ['-O', 'qcow2', '-o', LUKS, '--size', '1G'],
      ['-O', 'qcow2', '-o', `${LUKS},encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc`, '--size', '1G'],
      ['-O', 'qcow2', '--image-opts', imageOpts(overlay)],
      ['-O', 'qcow2', '-o', LUKS, '--image-opts', imageOpts(overlay)],
    ];
    for (const args of cases) {
      const theirs = await qemuImg(['measure', ...SECRET, '--output=json', ...args]);
      expect(JSON.parse(await ok(['measure', ...SECRET, '--output=json', ...args])), args.join(' ')).toEqual(JSON.parse(theirs));
    }
    const noKey = await qcow86(['measure', '-O', 'qcow2', '-o', 'encrypt.format=luks', '--size', '1G']);
    expect(noKey.stderr).toContain("Parameter 'encrypt.key-secret' is required for cipher");
  });

  it('create: the Formatting line and the image as qemu-img makes them (QEMU defaults); an encrypted overlay on a plain base', async () => {
    const dir = tempDir();
    await makeImage({ path: join(dir, 'base.qcow2'), size: '4M' }, [{ offset: 0, length: MiB, pattern: 5 }]);
    const args = ['create', ...SECRET, '-f', 'qcow2', '-o', `${LUKS},encrypt.cipher-mode=xts,encrypt.hash-alg=sha512`, '-b', 'base.qcow2', '-F', 'qcow2', 'ours.qcow2'];
    const ours = await ok(args, { cwd: dir });
    const theirs = await qemuImg([...args.slice(0, -1), 'theirs.qcow2'], { cwd: dir });
    expect(ours.replace('ours.qcow2', 'X')).toBe(theirs.replace('theirs.qcow2', 'X'));
    const infoOf = async (name: string) => {
      const info = JSON.parse(await qemuImg(['info', '--output=json', name], { cwd: dir }));
      const encrypt = info['format-specific'].data.encrypt;
      delete info.filename;
      delete info['actual-size'];
      delete encrypt.uuid;
      encrypt.slots[0].iters = typeof encrypt.slots[0].iters;
      encrypt['master-key-iters'] = typeof encrypt['master-key-iters'];
      return info;
    };
    expect(await infoOf('ours.qcow2')).toEqual(await infoOf('theirs.qcow2'));
    expect(statSync(join(dir, 'ours.qcow2')).size).toBe(statSync(join(dir, 'theirs.qcow2')).size);
    await ok(['io', ...SECRET, '--image-opts', imageOpts(join(dir, 'ours.qcow2')), '-c', 'write -P 9 512k 1M']);
    const expected = new Uint8Array(4 * MiB);
    expected.fill(5, 0, MiB);
    expected.fill(9, 512 * 1024, 512 * 1024 + MiB);
    expect(firstDifference(await qemuContents(join(dir, 'ours.qcow2')), expected)).toBe(-1);
    await qemuCheckClean(join(dir, 'ours.qcow2'));
  });

  it('work on worker threads gives the bytes the calling thread gives: decryption, encryption, compression', async () => {
    const dir = tempDir();
    const image = await qemuLuks(join(dir, 'w.qcow2'), '8M', LUKS);
    copyFileSync(image, join(dir, 'w0.qcow2'));
    const write = (path: string, workers: string) => ok(['io', ...SECRET, '--image-opts', imageOpts(path), '-c', 'write -P 0x3c 0 6M', '-c', 'write -P 0x3d 1000 3M'], { env: { QCOW86_WORKERS: workers } });
    await write(image, '2');
    await write(join(dir, 'w0.qcow2'), '0');
    // Same key, same data: the same file, bit for bit.
    expect(await sha256(image)).toBe(await sha256(join(dir, 'w0.qcow2')));
    const read = async (workers: string, out: string) => ok(['convert', ...SECRET, '--image-opts', imageOpts(image), '-O', 'raw', out], { env: { QCOW86_WORKERS: workers } });
    await read('2', join(dir, 'a.raw'));
    await read('0', join(dir, 'b.raw'));
    expect(await sha256(join(dir, 'a.raw'))).toBe(await sha256(join(dir, 'b.raw')));
    expect(firstDifference(new Uint8Array(readFileSync(join(dir, 'a.raw'))), await qemuContents(image))).toBe(-1);
    // convert -c: the same compressed image with and without workers, for both compression types.
    for (const type of ['zlib', 'zstd']) {
      const compress = (workers: string, out: string) => ok(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, join(dir, 'a.raw'), out], { env: { QCOW86_WORKERS: workers } });
      await compress('2', join(dir, `c2-${type}.qcow2`));
      await compress('0', join(dir, `c0-${type}.qcow2`));
      expect(await sha256(join(dir, `c2-${type}.qcow2`))).toBe(await sha256(join(dir, `c0-${type}.qcow2`)));
    }
  });
});

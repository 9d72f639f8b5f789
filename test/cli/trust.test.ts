/**
 * Files an image names (issue 13's trust model), tried with hostile images made by qemu-img and patched:
 * - inspection (info, check, snapshot -l; measure for data files) never opens, reads or fetches what an image
 *   names: a FIFO named as a data file cannot hang it, a URL named there gets no request;
 * - wherever named files are opened, a FIFO, device or directory is refused by name, never opened;
 * - `create -b` without `-F`, and `convert -B` without `-F`, are refused as qemu-img 7.2 refuses them;
 * - a raw image whose format was probed refuses a write that would make its first sector another format.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createServer, type Server } from 'node:http';
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeImage, qemuImg, run, runQemuImg, sha256, tempDir } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

const dir = tempDir('qcow86-trust-');
/** Loopback server that counts every request: a URL named by an image must get none from inspection. */
let server: Server;
let requests: string[] = [];
let origin = '';

beforeAll(async () => {
  server = createServer((req, res) => {
    requests.push(req.url ?? '');
    res.writeHead(404).end();
  });
  await new Promise<void>((done) => server.listen(0, '127.0.0.1', done));
  origin = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  execFileSync('mkfifo', [join(dir, 'fifo')]);
});
afterAll(() => new Promise<void>((done) => server.close(() => done())));

/** A 1 MiB qcow2 image keeping its data in an external data file, then renamed to `name` by qemu-img amend. */
async function withDataFile(file: string, name: string): Promise<string> {
  const path = join(dir, file);
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${path}.data`, path, '1M']);
  await qemuImg(['amend', '-o', `data_file=${name}`, path]);
  return path;
}

/** A qcow2 overlay whose recorded backing file is `name` (format raw), made with -u so nothing is opened. */
async function withBacking(file: string, name: string, format = 'raw'): Promise<string> {
  const path = join(dir, file);
  await qemuImg(['create', '-q', '-u', '-f', 'qcow2', '-b', name, '-F', format, path, '1M']);
  return path;
}

describe('inspection never opens a file an image names', () => {
  const dataNames = () => [
    ['a FIFO', join(dir, 'fifo')],
    ['a URL', `${origin}/data.raw`],
    ['a host file', '/etc/passwd'],
    ['a character device', '/dev/zero'],
  ];

  it('info, check, snapshot -l and measure show a data file name and never open it', async () => {
    requests = [];
    let index = 0;
    for (const [what, name] of dataNames()) {
      const image = await withDataFile(`d${index++}.qcow2`, name!);
      const before = await sha256(image);
      for (const args of [['info', image], ['info', '--output=json', image], ['check', image], ['snapshot', '-l', image], ['measure', '-O', 'qcow2', image]]) {
        // A FIFO opened for reading would wait for a writer: the timeout would end the command with a signal.
        const result = await qcow86(args, { timeoutMs: 20_000 });
        expect(result.exitCode, `${args[0]} with ${what} as data file: ${result.stderr}`).toBe(0);
      }
      const info = await qcow86(['info', '--output=json', image]);
      expect(JSON.parse(info.stdout)['format-specific'].data['data-file']).toBe(name);
      expect((await qcow86(['info', image])).stdout).toContain(`data file: ${name}\n`);
      expect(await sha256(image)).toBe(before);
    }
    expect(requests).toEqual([]);
  });

  it('info, check and snapshot -l show a backing file name and never open it; measure opens the chain', async () => {
    requests = [];
    const fifoBacked = await withBacking('b-fifo.qcow2', join(dir, 'fifo'));
    const urlBacked = await withBacking('b-url.qcow2', `${origin}/base.raw`);
    for (const image of [fifoBacked, urlBacked]) {
      for (const args of [['info', image], ['check', image], ['snapshot', '-l', image]]) {
        const result = await qcow86(args, { timeoutMs: 20_000 });
        expect(result.exitCode, `${args.join(' ')}: ${result.stderr}`).toBe(0);
      }
    }
    expect(requests).toEqual([]);
    // qemu-img 7.2 check opens the backing chain (and fails on a missing one); ours checks the image itself:
    // the damaged-image differential lists this as an intended difference.
    const missing = await withBacking('b-missing.qcow2', join(dir, 'nowhere.raw'));
    expect((await run('qemu-img', ['check', missing])).exitCode).toBe(1);
    expect((await qcow86(['check', missing])).exitCode).toBe(0);
    // measure needs the chain's contents: the FIFO is refused by name, not opened.
    const measured = await qcow86(['measure', '-O', 'qcow2', fifoBacked], { timeoutMs: 20_000 });
    expect(measured.exitCode).toBe(1);
    expect(measured.stderr).toContain(`backing file is a FIFO, not a regular file: refused`);
  });
});

describe('named files that are not regular files are refused by name', () => {
  it('a FIFO, a device or a directory as backing or data file: convert, map, compare, io refuse without opening', async () => {
    mkdirSync(join(dir, 'a-directory'), { recursive: true });
    const cases: [string, string, string][] = [
      [await withBacking('nr-b-fifo.qcow2', join(dir, 'fifo')), 'backing file', 'FIFO'],
      [await withBacking('nr-b-dev.qcow2', '/dev/zero'), 'backing file', 'character device'],
      [await withBacking('nr-b-dir.qcow2', join(dir, 'a-directory')), 'backing file', 'directory'],
      [await withDataFile('nr-d-fifo.qcow2', join(dir, 'fifo')), 'data file', 'FIFO'],
      [await withDataFile('nr-d-dev.qcow2', '/dev/urandom'), 'data file', 'character device'],
    ];
    // A symlink to a FIFO is judged by what it resolves to.
    symlinkSync(join(dir, 'fifo'), join(dir, 'fifo-link'));
    cases.push([await withBacking('nr-b-link.qcow2', 'fifo-link'), 'backing file', 'FIFO']);
    for (const [image, field, kind] of cases) {
      for (const args of [['convert', '-O', 'raw', image, join(dir, 'out.raw')], ['map', image], ['compare', image, image], ['io', '-c', 'read 0 4k', image]]) {
        const result = await qcow86(args, { timeoutMs: 20_000 });
        expect(result.exitCode, `${args[0]} ${image}: ${result.stderr}`).toBe(args[0] === 'compare' ? 2 : 1);
        expect(result.stderr).toContain(`${field} is a ${kind}, not a regular file: refused`);
      }
    }
  });
});

describe('formats are never left to a probe that an image author controls', () => {
  it('create -b without -F is refused as qemu-img 7.2 refuses it; convert -B without -F too', async () => {
    const base = await makeImage({ path: join(dir, 'cb-base.qcow2'), size: '1M' });
    const theirs = await runQemuImg(['create', '-f', 'qcow2', '-b', base, join(dir, 'cb-theirs.qcow2')]);
    const ours = await qcow86(['create', '-f', 'qcow2', '-b', base, join(dir, 'cb-ours.qcow2')]);
    expect(theirs.exitCode).toBe(1);
    expect(ours.exitCode).toBe(1);
    const words = (text: string) => text.replace(/^(qemu-img|qcow86 create): /, '').replace(/cb-(ours|theirs)/, 'cb').trim();
    expect(words(ours.stderr)).toBe(words(theirs.stderr));
    expect(ours.stderr).toContain('Backing file specified without backing format\nDetected format of qcow2.');
    const unsafe = await qcow86(['create', '-f', 'qcow2', '-u', '-b', 'missing.qcow2', join(dir, 'cb-u.qcow2'), '1M']);
    expect(unsafe.stderr.trim()).toBe(`qcow86 create: ${join(dir, 'cb-u.qcow2')}: Backing file specified without backing format`);
    const convert = await qcow86(['convert', '-O', 'qcow2', '-B', base, base, join(dir, 'cb-conv.qcow2')]);
    expect(convert.exitCode).toBe(1);
    expect(convert.stderr.trim()).toBe('qcow86 convert: Use of backing file requires explicit backing format');
    const theirConvert = await runQemuImg(['convert', '-O', 'qcow2', '-B', base, base, join(dir, 'cb-conv-theirs.qcow2')]);
    expect(theirConvert.stderr.trim()).toBe('qemu-img: Use of backing file requires explicit backing format');
  });

  it('a probed raw image refuses a write that makes its first sector another format, as qemu-io does', async () => {
    const image = join(dir, 'probed.raw');
    writeFileSync(image, Buffer.alloc(1024 * 1024));
    // Byte by byte towards a qcow2 header: 'QFI\xfb' with version 0 still probes as raw; version 3 would not.
    const steps = ['write -P 0x51 0 1', 'write -P 0x46 1 1', 'write -P 0x49 2 1', 'write -P 0xfb 3 1'];
    for (const step of steps) expect((await qcow86(['io', '-c', step, image])).exitCode).toBe(0);
    const theirs = join(dir, 'probed-theirs.raw');
    writeFileSync(theirs, readFileSync(image));
    const refused = await qcow86(['io', '-c', 'write -P 3 7 1', image]);
    expect(refused.exitCode).toBe(1);
    expect(refused.stdout).toContain('write failed: ')
    expect(refused.stdout).toContain('refusing to write a qcow2 header into the first sector of an image whose format was probed as raw');
    expect((await run('qemu-io', ['-c', 'write -P 3 7 1', theirs])).stdout).toContain('write failed: Operation not permitted');
    expect(readFileSync(image)).toEqual(readFileSync(theirs));
    // Another format's magic is refused the same way (VMDK's 'KDMV', written byte by byte).
    const other = join(dir, 'probed-vmdk.raw');
    writeFileSync(other, Buffer.alloc(64 * 1024));
    for (const step of ['write -P 0x4b 0 1', 'write -P 0x44 1 1', 'write -P 0x4d 2 1']) expect((await qcow86(['io', '-c', step, other])).exitCode).toBe(0);
    const vmdk = await qcow86(['io', '-c', 'write -P 0x56 3 1', other]);
    expect(vmdk.exitCode).toBe(1);
    expect(vmdk.stdout).toContain('refusing to write a vmdk header');
    // The format given explicitly lifts the guard.
    expect((await qcow86(['io', '-f', 'raw', '-c', 'write -P 3 7 1', image])).exitCode).toBe(0);
    expect(readFileSync(image).subarray(0, 8)).toEqual(Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]));
  });
});

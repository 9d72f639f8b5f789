import { describe, expect, it } from 'vitest';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { formatSize, hexDump, parseIoCommand, parsePattern, parseSize } from '../../src/node/io-commands.js';
import { parseIoArgs, runIo } from '../../src/node/commands/io.js';
import { main } from '../../src/node/cli.js';
import { makeImage, run, tempDir } from '../helpers/qemu.js';

describe('qemu-io argument syntax', () => {
  it.each([
    ['0', 0],
    ['512', 512],
    ['64k', 65536],
    ['64K', 65536],
    ['1M', 1048576],
    ['1.5k', 1536],
    ['4G', 4 * 2 ** 30],
    ['2T', 2 * 2 ** 40],
    ['0x1000', 4096],
    ['100b', 100],
  ])('size %s = %i', (text, value) => expect(parseSize(text)).toBe(value));

  it.each(['', 'abc', '-1', '1x', '0x', '1.5.5', 'k'])('size %j is refused', (text) => expect(parseSize(text)).toBeUndefined());

  it.each([
    ['0xab', 0xab],
    ['171', 171],
    ['0253', 171],
    ['0', 0],
    ['255', 255],
  ])('pattern %s = %i', (text, value) => expect(parsePattern(text)).toBe(value));

  it.each(['256', '300', '-1', 'ab', '09', ''])('pattern %j is refused', (text) => expect(parsePattern(text)).toBeUndefined());

  it.each([
    ['write -P 0xab 0 64k', { op: 'write', offset: 0, length: 65536, pattern: 0xab, zero: false, unmap: false, quiet: false }],
    ['write 1M 512', { op: 'write', offset: 1048576, length: 512, pattern: 0xcd, zero: false, unmap: false, quiet: false }],
    ['write -z -u 1M 4k', { op: 'write', offset: 1048576, length: 4096, pattern: 0xcd, zero: true, unmap: true, quiet: false }],
    ['w -zq 0 1', { op: 'write', offset: 0, length: 1, pattern: 0xcd, zero: true, unmap: false, quiet: true }],
    ['write -P0x11 0 1', { op: 'write', offset: 0, length: 1, pattern: 0x11, zero: false, unmap: false, quiet: false }],
    ['read -P 0xab -v 0 64k', { op: 'read', offset: 0, length: 65536, pattern: 0xab, verbose: true, quiet: false }],
    ['read  0  1', { op: 'read', offset: 0, length: 1, pattern: undefined, verbose: false, quiet: false }],
    ['discard 2M 64k', { op: 'discard', offset: 2097152, length: 65536, quiet: false }],
    ['flush', { op: 'flush' }],
  ])('%s', (text, expected) => expect(parseIoCommand(text)).toEqual(expected));

  it.each([
    ['bogus 0 1', 'command "bogus" not found'],
    ['write -P 300 0 1', '300 is not a valid pattern byte'],
    ['write -x 0 1', "write: invalid option -- 'x'"],
    ['write -z -P 1 0 1', '-z and -P cannot be specified at the same time'],
    ['write -u 0 1', '-u requires -z to be specified'],
    ['read 0', 'bad argument count 1 to read, expected 2 arguments'],
    ['read abc 1', 'non-numeric offset argument -- abc'],
    ['read 0 1q', 'non-numeric length argument -- 1q'],
    ['flush 1', 'bad argument count 1 to flush, expected 0 arguments'],
  ])('%s -> %s', (text, error) => expect(parseIoCommand(text)).toEqual({ error }));

  it('parses the command line', () => {
    expect(parseIoArgs(['-f', 'raw', '-c', 'read 0 1', '--cmd=flush', 'disk.img'])).toEqual({ format: 'raw', readOnly: false, commands: ['read 0 1', 'flush'], file: 'disk.img', objects: [], imageOpts: false });
    expect(parseIoArgs(['--format=qcow2', '-r', '-cflush', 'x'])).toEqual({ format: 'qcow2', readOnly: true, commands: ['flush'], file: 'x', objects: [], imageOpts: false });
    expect(parseIoArgs(['--object', 'secret,id=s,data=x', '--image-opts', '-c', 'flush', 'driver=qcow2,file.filename=x'])).toEqual({ format: undefined, readOnly: false, commands: ['flush'], file: 'driver=qcow2,file.filename=x', objects: ['secret,id=s,data=x'], imageOpts: true });
    expect(parseIoArgs(['-f', 'vmdk', '-c', 'flush', 'x'])).toEqual({ error: "unknown format 'vmdk' (raw, qcow2, qcow)" });
    expect(parseIoArgs(['-c', 'flush'])).toEqual({ error: 'no FILE given' });
    expect(parseIoArgs(['x'])).toEqual({ error: 'no commands given (use -c; there is no interactive mode)' });
    expect(parseIoArgs(['-c'])).toEqual({ error: 'option -c needs a command' });
  });

  it('formats sizes and dumps like qemu-io', () => {
    expect(formatSize(65536)).toBe('64 KiB');
    expect(formatSize(20)).toBe('20 bytes');
    expect(formatSize(1536)).toBe('1.500 KiB');
    expect(formatSize(778.970902)).toBe('778.970902 bytes');
    expect(hexDump(new Uint8Array([0x61, 0x62, 0, 0x7a, 0x20]), 0xfffa)).toEqual(['0000fffa:  61 62 00 7a 20  ab.z.']);
  });
});

const STATS = /^[\d.]+ (bytes|KiB|MiB|GiB|TiB), 1 ops; \d\d\.\d\d sec \([\d.]+ (bytes|KiB|MiB|GiB|TiB)\/sec and [\d.]+ ops\/sec\)$/;

/** Timing lines differ run to run and error texts carry our detail in parentheses: compare the rest exactly. */
function normalise(lines: string[]): string[] {
  return lines.map((line) => {
    if (STATS.test(line)) return '<stats>';
    return line.replace(/^(\w+ failed: Input\/output error).*$/, '$1');
  });
}

async function ours(args: string[]): Promise<{ exitCode: number; stdout: string[]; stderr: string[] }> {
  const stdout: string[] = [];
  const stderr: string[] = [];
  const exitCode = await runIo(args, { out: (line) => stdout.push(...line.split('\n')), err: (line) => stderr.push(line) });
  return { exitCode, stdout, stderr };
}

async function qemuIoResult(args: string[]): Promise<{ exitCode: number; stdout: string[] }> {
  const result = await run('qemu-io', args);
  return { exitCode: result.exitCode, stdout: result.stdout.split('\n').filter((line, i, all) => line !== '' || i < all.length - 1) };
}

describe('qcow86 io against qemu-io', () => {
  const scripts: Array<[string, string[]]> = [
    ['the issue example', ['write -P 0xab 0 64k', 'write -z 1M 4k', 'discard 2M 64k', 'read -P 0xab 0 64k', 'flush']],
    ['unaligned writes and a failing pattern check', ['write -P 0x11 100 3000', 'read -P 0x11 100 3000', 'read -P 0x12 100 3000', 'read -P 0 3100 1k', 'write -P 7 1.5k 1']],
    ['hex dumps', ['write -P 0x41 65530 20', 'read -v 65520 40', 'read -v -P 0x41 65530 20']],
    ['large requests in pieces', ['write -P 0x5a 0 3M', 'write -z 512k 1536k', 'read -P 0 512k 1536k', 'read -P 0x5a 2M 1M', 'read -q -P 0x5a 0 512k']],
    ['requests past the end', ['write -P 1 4M 1', 'read 3M 2M', 'discard 4095k 2k', 'read -P 0 0 1']],
  ];

  it.each(scripts)('%s: same output, exit code and bytes', async (_name, commands) => {
    const dir = tempDir();
    const initial = new Uint8Array(4 * 1024 * 1024);
    for (let i = 0; i < initial.length; i += 4096) initial[i] = i >> 12;
    await writeFile(join(dir, 'a.raw'), initial);
    await copyFile(join(dir, 'a.raw'), join(dir, 'b.raw'));
    const args = commands.flatMap((c) => ['-c', c]);
    const theirs = await qemuIoResult(['-f', 'raw', ...args, join(dir, 'a.raw')]);
    const mine = await ours(['-f', 'raw', ...args, join(dir, 'b.raw')]);
    expect(normalise(mine.stdout)).toEqual(normalise(theirs.stdout));
    expect(mine.exitCode).toBe(theirs.exitCode);
    expect(Buffer.from(await readFile(join(dir, 'b.raw'))).equals(await readFile(join(dir, 'a.raw')))).toBe(true);
  });

  it('names the first mismatching byte on stderr and exits 1', async () => {
    const dir = tempDir();
    await writeFile(join(dir, 'a.raw'), new Uint8Array(65536).fill(0xab).fill(0, 1000, 1001));
    const mine = await ours(['-f', 'raw', '-c', 'read -P 0xab 0 64k', join(dir, 'a.raw')]);
    expect(mine.exitCode).toBe(1);
    expect(mine.stdout[0]).toBe('Pattern verification failed at offset 0, 65536 bytes');
    expect(mine.stderr).toEqual(['first mismatch at offset 1000: expected 0xab, found 0x0']);
  });

  it('reads qcow2 and qcow images through the engine, matching qemu-io', async () => {
    for (const format of ['qcow2', 'qcow'] as const) {
      const path = await makeImage({ format, size: '8M' }, [
        { offset: 65536, length: 65536, pattern: 0x21 },
        { offset: 3 * 1024 * 1024 + 100, length: 5000, pattern: 0x22 },
      ]);
      const commands = ['read -P 0x21 64k 64k', 'read -P 0 0 64k', 'read -v 3145820 40', 'read -P 0x22 3M 4k', 'read -P 0 7M 1M'];
      const args = commands.flatMap((c) => ['-c', c]);
      const theirs = await qemuIoResult(['-r', '-f', format, ...args, path]);
      const before = await readFile(path);
      const mine = await ours(['-f', format, ...args, path]);
      expect(normalise(mine.stdout)).toEqual(normalise(theirs.stdout));
      expect(mine.exitCode).toBe(theirs.exitCode);
      expect(mine.exitCode).toBe(1);
      expect(Buffer.from(await readFile(path)).equals(before)).toBe(true);
    }
  });

  it('is registered as `qcow86 io`', async () => {
    const dir = tempDir();
    await writeFile(join(dir, 'a.raw'), new Uint8Array(4096));
    expect(await main(['io', '-f', 'raw', '-c', 'write -q -P 9 0 4k', join(dir, 'a.raw')])).toBe(0);
    expect((await readFile(join(dir, 'a.raw'))).every((b) => b === 9)).toBe(true);
    expect(await main(['io', '-f', 'raw', '-c', 'read -q -P 8 0 4k', join(dir, 'a.raw')])).toBe(1);
  });
});

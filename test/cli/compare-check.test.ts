/**
 * compare and check against qemu-img: same exit codes and the same stdout lines (qemu-img reports a mismatch at
 * the start of the first differing 512-byte sector, and warns before checking the larger image's extra bytes).
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { makeImage, run, tempDir } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

let dir: string;
const paths: Record<string, string> = {};

beforeAll(async () => {
  dir = tempDir();
  paths.a = await makeImage({ path: join(dir, 'a.qcow2'), size: '4M' }, [{ offset: 0, length: 65536, pattern: 1 }, { offset: 1048576, length: 4096, pattern: 2 }]);
  paths.same = await makeImage({ path: join(dir, 'same.qcow2'), size: '4M', clusterSize: 4096 }, [{ offset: 0, length: 65536, pattern: 1 }, { offset: 1048576, length: 4096, pattern: 2 }]);
  paths.differ = await makeImage({ path: join(dir, 'differ.qcow2'), size: '4M' }, [{ offset: 0, length: 65536, pattern: 1 }, { offset: 1048576 + 1000, length: 1, pattern: 3 }]);
  paths.larger = await makeImage({ path: join(dir, 'larger.qcow2'), size: '6M' }, [{ offset: 0, length: 65536, pattern: 1 }, { offset: 1048576, length: 4096, pattern: 2 }]);
  paths.largerDirty = await makeImage({ path: join(dir, 'larger-dirty.qcow2'), size: '6M' }, [{ offset: 0, length: 65536, pattern: 1 }, { offset: 1048576, length: 4096, pattern: 2 }, { offset: 5 * 1048576 + 777, length: 1, pattern: 9 }]);
  paths.raw = await makeImage({ path: join(dir, 'a.raw'), format: 'raw', size: '4M' }, [{ offset: 0, length: 65536, pattern: 1 }, { offset: 1048576, length: 4096, pattern: 2 }]);
  // A leak: a refcount for a cluster nothing references (16-bit refcounts, first refcount block).
  paths.leaky = await makeImage({ path: join(dir, 'leaky.qcow2'), size: '4M' }, [{ offset: 0, length: 65536, pattern: 1 }]);
  const bytes = await readFile(paths.leaky);
  const table = Number(bytes.readBigUInt64BE(48));
  const block = Number(bytes.readBigUInt64BE(table));
  bytes.writeUInt16BE(1, block + 2 * 40);
  await writeFile(paths.leaky, bytes);
});

const compareCases: [string, string, string, string[]][] = [
  ['identical images with different cluster sizes', 'a', 'same', []],
  ['a one-byte difference', 'a', 'differ', []],
  ['a larger image whose extra bytes are zero', 'a', 'larger', []],
  ['a larger image with data past the smaller one', 'a', 'largerDirty', []],
  ['qcow2 against raw', 'a', 'raw', ['-F', 'raw']],
];

describe('compare', () => {
  it.each(compareCases)('%s: same exit code and output as qemu-img', async (_name, x, y, extra) => {
    const theirs = await run('qemu-img', ['compare', ...extra, paths[x]!, paths[y]!]);
    const ours = await qcow86(['compare', ...extra, paths[x]!, paths[y]!]);
    expect({ code: ours.exitCode, out: ours.stdout }).toEqual({ code: theirs.exitCode, out: theirs.stdout });
  });

  it('exits 2 when an image cannot be opened, like qemu-img', async () => {
    const theirs = await run('qemu-img', ['compare', paths.a!, join(dir, 'missing.qcow2')]);
    const ours = await qcow86(['compare', paths.a!, join(dir, 'missing.qcow2')]);
    expect(theirs.exitCode).toBe(2);
    expect(ours.exitCode).toBe(2);
    expect(ours.stderr).toMatch(/missing\.qcow2/);
  });
});

describe('check', () => {
  it.each(['a', 'leaky'])('%s: same exit code and JSON as qemu-img check', async (name) => {
    const theirs = await run('qemu-img', ['check', '--output=json', paths[name]!]);
    const ours = await qcow86(['check', '--output=json', paths[name]!]);
    expect(ours.exitCode).toBe(theirs.exitCode);
    expect(JSON.parse(ours.stdout)).toEqual(JSON.parse(theirs.stdout));
  });

  it.each(['a', 'leaky'])('%s: human output equals qemu-img check', async (name) => {
    const theirs = await run('qemu-img', ['check', paths[name]!]);
    const ours = await qcow86(['check', paths[name]!]);
    expect({ code: ours.exitCode, out: ours.stdout }).toEqual({ code: theirs.exitCode, out: theirs.stdout });
  });

  it('raw images: no check, exit 63 like qemu-img', async () => {
    expect((await run('qemu-img', ['check', paths.raw!])).exitCode).toBe(63);
    expect((await qcow86(['check', '-f', 'raw', paths.raw!])).exitCode).toBe(63);
  });
});

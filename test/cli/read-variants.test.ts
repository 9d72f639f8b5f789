/**
 * info, map and convert -O raw against qemu-img on every image variant QEMU 7.2 makes: our JSON must equal
 * qemu-img's field by field, our raw output must be byte-identical to qemu-img's, and no input may change.
 *
 * QEMU 7.2 opens a relative external data file name relative to its working directory (and qemu-img create
 * writes it there), while we resolve it relative to the image like a backing name: the data-file variants run
 * both tools from the image's directory, where the two rules agree.
 *
 * Intended difference (not exercised here): QEMU asks the file system for holes (SEEK_HOLE) when it maps raw
 * files and metadata-preallocated qcow2 images; we treat all-zero 4 KiB blocks of a sparse file as holes, so
 * zeros WRITTEN into such a file map as "zero" for us and as "data" for QEMU.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { mkdirSync } from 'node:fs';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { makeImage, qemuImg, qemuIo, run, sha256, tempDir, type ImageOptions, type ImageWrite } from '../helpers/qemu.js';
import { qcow86, qcow86Json } from './cli.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** A mix of every cluster state, scaled to the cluster size. */
function mixedWrites(cs: number): ImageWrite[] {
  return [
    { offset: 0, length: 3 * cs, pattern: 0x11 },
    { offset: 5 * cs + 512, length: cs, pattern: 0x22 },
    { offset: 8 * cs, length: 2 * cs, zero: true },
    { offset: 12 * cs, length: 2 * cs, pattern: 0x33 },
    // Zero over allocated clusters: the host cluster stays (QEMU's ZERO_ALLOC) on v3 images.
    { offset: 12 * cs, length: cs, zero: true },
    { offset: 13 * cs, length: cs, zero: true, unmap: true },
    { offset: 20 * cs, length: 2 * cs, pattern: 0x44, compressed: true },
    { offset: 24 * cs, length: 3 * cs, pattern: 0x55 },
    { offset: 25 * cs, length: cs, discard: true },
  ];
}

interface Variant {
  name: string;
  /** Returns the path to open (absolute unless `cwd` is set) and the directory to run in. */
  make(): Promise<{ path: string; cwd?: string; format?: string; snapshots?: string[] }>;
}

async function qcow2(options: Partial<ImageOptions> & { size?: number | string }, writes: ImageWrite[]): Promise<{ path: string }> {
  return { path: await makeImage({ size: options.size ?? 28 * (options.clusterSize ?? 65536), ...options }, writes) };
}

/** Replaces the type of a header extension so the image no longer records that information. */
async function dropExtension(path: string, type: number): Promise<void> {
  const bytes = await readFile(path);
  let at = bytes.readUInt32BE(100);
  while (at + 8 <= bytes.length) {
    const t = bytes.readUInt32BE(at);
    const length = bytes.readUInt32BE(at + 4);
    if (t === 0) throw new Error(`extension ${type.toString(16)} not found`);
    if (t === type) {
      bytes.writeUInt32BE(0x7e570000, at); // an unknown extension type: skipped by QEMU and by us
      await writeFile(path, bytes);
      return;
    }
    at += 8 + Math.ceil(length / 8) * 8;
  }
}

const variants: Variant[] = [
  ...[512, 4096, 65536, 2 * MiB].map((cs) => ({ name: `v3 cluster ${cs}`, make: () => qcow2({ clusterSize: cs }, mixedWrites(cs)) })),
  { name: 'v2 (compat 0.10)', make: () => qcow2({ compat: '0.10' }, mixedWrites(65536)) },
  { name: 'v2 cluster 4096', make: () => qcow2({ compat: '0.10', clusterSize: 4096 }, mixedWrites(4096)) },
  ...[1, 2, 4, 8, 32, 64].map((bits) => ({ name: `refcount bits ${bits}`, make: () => qcow2({ refcountBits: bits, clusterSize: 4096 }, mixedWrites(4096)) })),
  { name: 'zstd compression', make: () => qcow2({ compressionType: 'zstd' }, mixedWrites(65536)) },
  { name: 'zstd, 2 MiB clusters', make: () => qcow2({ compressionType: 'zstd', clusterSize: 2 * MiB }, mixedWrites(2 * MiB)) },
  {
    name: 'extended L2 subclusters',
    make: () =>
      qcow2({ extendedL2: true, size: 8 * MiB }, [
        ...mixedWrites(65536),
        { offset: 30 * 65536 + 2048, length: 4096, pattern: 0x66 },
        { offset: 30 * 65536 + 16384, length: 2048, zero: true },
        { offset: 31 * 65536, length: 65536, pattern: 0x67 },
        { offset: 31 * 65536 + 8192, length: 6144, zero: true },
        { offset: 40 * 65536, length: 2048, zero: true },
      ]),
  },
  {
    name: 'extended L2 over a backing file',
    make: async () => {
      const dir = tempDir();
      await makeImage({ path: join(dir, 'base.qcow2'), size: 4 * MiB }, [{ offset: 0, length: 4 * MiB, pattern: 0x70 }]);
      const path = await makeImage({ path: join(dir, 'top.qcow2'), size: 4 * MiB, extendedL2: true, clusterSize: 32768, backing: 'base.qcow2', backingFormat: 'qcow2' }, [
        { offset: 1024, length: 2048, pattern: 0x71 },
        { offset: 32768 + 4096, length: 1024, zero: true },
        { offset: 3 * 32768, length: 32768, pattern: 0x72 },
      ]);
      return { path };
    },
  },
  {
    name: 'external data file',
    make: async () => {
      const dir = tempDir();
      await makeImage({ path: join(dir, 'ext.qcow2'), size: 4 * MiB, dataFile: 'ext.data' }, mixedWrites(65536).filter((w) => !('compressed' in w && w.compressed)));
      return { path: 'ext.qcow2', cwd: dir };
    },
  },
  {
    name: 'external raw data file',
    make: async () => {
      const dir = tempDir();
      await makeImage({ path: join(dir, 'ext.qcow2'), size: 4 * MiB, dataFile: 'ext.data', dataFileRaw: true }, mixedWrites(65536).filter((w) => !('compressed' in w && w.compressed)));
      return { path: 'ext.qcow2', cwd: dir };
    },
  },
  {
    name: 'external raw data file with extended L2',
    make: async () => {
      const dir = tempDir();
      await makeImage({ path: join(dir, 'x.qcow2'), size: 4 * MiB, dataFile: 'x.data', dataFileRaw: true, extendedL2: true, clusterSize: 131072 }, [{ offset: 4096, length: 8192, pattern: 9 }]);
      return { path: 'x.qcow2', cwd: dir };
    },
  },
  { name: 'lazy refcounts', make: () => qcow2({ lazyRefcounts: true }, mixedWrites(65536)) },
  {
    name: 'lazy refcounts, dirty (a writer died)',
    make: async () => {
      const { path } = await qcow2({ lazyRefcounts: true }, mixedWrites(65536));
      const bytes = await readFile(path);
      bytes[79] = bytes[79]! | 1; // incompatible feature bit 0: dirty
      await writeFile(path, bytes);
      return { path };
    },
  },
  { name: 'metadata preallocation', make: () => qcow2({ preallocation: 'metadata', size: 4 * MiB }, [{ offset: 65536, length: 65536, pattern: 1 }]) },
  { name: 'falloc preallocation', make: () => qcow2({ preallocation: 'falloc', size: 2 * MiB }, [{ offset: 65536, length: 4096, pattern: 1 }]) },
  {
    name: 'snapshots',
    make: async () => {
      const path = await makeImage({ size: 4 * MiB }, mixedWrites(65536).slice(0, 4));
      await qemuImg(['snapshot', '-c', 'first', path]);
      await qemuIo(['-c', 'write -P 0x99 0 128k', '-c', 'write -z 1M 64k', path]);
      await qemuImg(['snapshot', '-c', 'second', path]);
      await qemuIo(['-c', 'write -P 0xaa 64k 64k', '-c', 'discard 0 64k', path]);
      await qemuImg(['resize', path, '6M']);
      return { path, snapshots: ['1', 'first', '2', 'second'] };
    },
  },
  {
    name: 'chain of 3, relative names, each overlay larger',
    make: async () => {
      const dir = tempDir();
      mkdirSync(join(dir, 'sub'));
      await qemuImg(['create', '-q', '-f', 'qcow2', 'sub/base.qcow2', '2M'], { cwd: dir });
      await qemuIo(['-c', 'write -P 1 0 1M', '-c', 'write -c -P 2 1M 128k', 'sub/base.qcow2'], { cwd: dir });
      await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'sub/mid.qcow2', '3M'], { cwd: dir });
      await qemuIo(['-c', 'write -P 3 512k 64k', '-c', 'write -z 0 64k', '-c', 'write -P 4 2M 64k', 'sub/mid.qcow2'], { cwd: dir });
      await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'sub/mid.qcow2', '-F', 'qcow2', 'top.qcow2', '5M'], { cwd: dir });
      await qemuIo(['-c', 'write -P 5 4M 64k', '-c', 'write -P 6 700k 4k', 'top.qcow2'], { cwd: dir });
      return { path: 'top.qcow2', cwd: dir };
    },
  },
  {
    name: 'chain of 3, absolute names',
    make: async () => {
      const dir = tempDir();
      const base = await makeImage({ path: join(dir, 'base.qcow2'), size: 4 * MiB, clusterSize: 4096 }, [{ offset: 0, length: 3 * MiB, pattern: 7 }]);
      const mid = await makeImage({ path: join(dir, 'mid.qcow2'), size: 4 * MiB, backing: base, backingFormat: 'qcow2' }, [{ offset: MiB, length: 100 * KiB, pattern: 8 }]);
      const path = await makeImage({ path: join(dir, 'top.qcow2'), size: 4 * MiB, clusterSize: 512, backing: mid, backingFormat: 'qcow2' }, [{ offset: 1000, length: 3000, pattern: 9 }, { offset: 2 * MiB, length: 512 * KiB, zero: true }]);
      return { path };
    },
  },
  {
    name: 'raw backing file, shorter than the overlay',
    make: async () => {
      const dir = tempDir();
      await makeImage({ path: join(dir, 'base.raw'), format: 'raw', size: MiB + 4096 }, [{ offset: 8192, length: 70000, pattern: 3 }, { offset: MiB, length: 4096, pattern: 4 }]);
      return { path: await makeImage({ path: join(dir, 'top.qcow2'), size: 3 * MiB, backing: 'base.raw', backingFormat: 'raw' }, [{ offset: 65536, length: 4096, pattern: 5 }]) };
    },
  },
  {
    name: 'unrecorded backing format (probed)',
    make: async () => {
      const dir = tempDir();
      await makeImage({ path: join(dir, 'base.qcow2'), size: 2 * MiB }, [{ offset: 0, length: MiB, pattern: 3 }]);
      const path = await makeImage({ path: join(dir, 'top.qcow2'), size: 2 * MiB, backing: 'base.qcow2', backingFormat: 'qcow2' }, [{ offset: 4096, length: 4096, pattern: 4 }]);
      await dropExtension(path, 0xe2792aca);
      return { path };
    },
  },
  { name: 'qcow v1', make: async () => ({ path: await makeImage({ format: 'qcow', size: 4 * MiB }, [{ offset: 0, length: 100 * KiB, pattern: 1 }, { offset: 2 * MiB, length: 4096, pattern: 2 }]) }) },
  {
    name: 'qcow v1 over a raw backing file',
    make: async () => {
      const dir = tempDir();
      await makeImage({ path: join(dir, 'b.raw'), format: 'raw', size: MiB }, [{ offset: 0, length: 10000, pattern: 1 }]);
      return { path: await makeImage({ path: join(dir, 'o.qcow'), format: 'qcow', size: 2 * MiB, backing: 'b.raw', backingFormat: 'raw' }, [{ offset: 4096, length: 4096, pattern: 2 }]) };
    },
  },
  { name: 'raw image', make: async () => ({ path: await makeImage({ format: 'raw', size: 4 * MiB }, [{ offset: 65536, length: 100 * KiB, pattern: 1 }]), format: 'raw' }) },
];

interface Made {
  variant: Variant;
  path: string;
  cwd: string | undefined;
  formatArgs: string[];
  snapshots: string[];
  /** sha256 of every file in the image's directory before any of our commands ran. */
  before: Map<string, string>;
}

async function hashDir(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const walk = async (d: string): Promise<void> => {
    for (const entry of await readdir(d, { withFileTypes: true })) {
      const p = join(d, entry.name);
      if (entry.isDirectory()) await walk(p);
      else out.set(p, await sha256(p));
    }
  };
  await walk(dir);
  return out;
}

const made = new Map<string, Made>();

beforeAll(async () => {
  await Promise.all(
    variants.map(async (variant) => {
      const result = await variant.make();
      const dir = result.cwd ?? join(result.path, '..');
      made.set(variant.name, {
        variant,
        path: result.path,
        cwd: result.cwd,
        formatArgs: result.format ? ['-f', result.format] : [],
        snapshots: result.snapshots ?? [],
        before: await hashDir(dir),
      });
    }),
  );
});

// Concurrent within the file: each test spawns processes and mostly waits on them.
describe.concurrent.each(variants.map((v) => v.name))('%s', { timeout: 300_000 }, (name) => {
  const get = () => made.get(name)!;
  const opts = () => ({ cwd: get().cwd });

  it('info --output=json equals qemu-img info', async ({ expect }) => {
    const { path, formatArgs } = get();
    const theirs = JSON.parse(await qemuImg(['info', '--output=json', ...formatArgs, path], opts()));
    const ours = await qcow86Json(['info', '--output=json', ...formatArgs, path], opts());
    expect(ours).toEqual(theirs);
  });

  it('info --backing-chain --output=json equals qemu-img', async ({ expect }) => {
    const { path, formatArgs } = get();
    const theirs = JSON.parse(await qemuImg(['info', '--backing-chain', '--output=json', ...formatArgs, path], opts()));
    const ours = await qcow86Json(['info', '--backing-chain', '--output=json', ...formatArgs, path], opts());
    expect(ours).toEqual(theirs);
  });

  it('human info equals qemu-img info (text)', async ({ expect }) => {
    const { path, formatArgs } = get();
    const env = { cwd: get().cwd };
    const theirs = await qemuImg(['info', ...formatArgs, path], env);
    const ours = await qcow86(['info', ...formatArgs, path], env);
    expect(ours.exitCode).toBe(0);
    expect(ours.stdout).toBe(theirs);
  });

  it('map --output=json equals qemu-img map', async ({ expect }) => {
    const { path, formatArgs } = get();
    const theirs = JSON.parse(await qemuImg(['map', '--output=json', ...formatArgs, path], opts()));
    const ours = await qcow86Json(['map', '--output=json', ...formatArgs, path], opts());
    expect(ours).toEqual(theirs);
  });

  it('human map equals qemu-img map (or fails the same way on compressed clusters)', async ({ expect }) => {
    const { path, formatArgs } = get();
    const theirs = await run('qemu-img', ['map', ...formatArgs, path], opts());
    const ours = await qcow86(['map', ...formatArgs, path], opts());
    expect(ours.exitCode).toBe(theirs.exitCode);
    expect(ours.stdout).toBe(theirs.stdout);
  });

  it('convert -O raw is byte-identical to qemu-img convert', async ({ expect }) => {
    const { path, formatArgs, cwd } = get();
    const out = tempDir();
    await qemuImg(['convert', ...formatArgs, '-O', 'raw', path, join(out, 'theirs.raw')], { cwd });
    const ours = await qcow86(['convert', ...formatArgs, '-O', 'raw', path, join(out, 'ours.raw')], { cwd });
    expect(ours.stderr).toBe('');
    expect(ours.exitCode).toBe(0);
    expect(await sha256(join(out, 'ours.raw'))).toBe(await sha256(join(out, 'theirs.raw')));
    // As sparse as qemu-img's: zero and unallocated ranges and all-zero 4 KiB data blocks stay holes. qemu-img
    // also writes the first 4 KiB (its alignment probe), which may be the one block more it occupies.
    const [ourBlocks, theirBlocks] = [(await stat(join(out, 'ours.raw'))).blocks, (await stat(join(out, 'theirs.raw'))).blocks];
    expect(ourBlocks).toBeLessThanOrEqual(theirBlocks);
    expect(theirBlocks - ourBlocks).toBeLessThanOrEqual(8);
    // compare agrees both ways
    expect((await qcow86(['compare', ...formatArgs, path, join(out, 'theirs.raw'), '-F', 'raw'], { cwd })).exitCode).toBe(0);
  });

  it('convert -l reads every snapshot by ID and by name like qemu-img', async ({ expect }) => {
    const { path, snapshots, cwd } = get();
    for (const snapshot of snapshots) {
      const out = tempDir();
      await qemuImg(['convert', '-l', snapshot, '-O', 'raw', path, join(out, 'theirs.raw')], { cwd });
      const ours = await qcow86(['convert', '-l', snapshot, '-O', 'raw', path, join(out, 'ours.raw')], { cwd });
      expect(ours.exitCode).toBe(0);
      expect(await sha256(join(out, 'ours.raw'))).toBe(await sha256(join(out, 'theirs.raw')));
    }
  });

  it('check exits like qemu-img check and reports the same JSON', async ({ expect }) => {
    const { path, formatArgs, cwd } = get();
    const theirs = await run('qemu-img', ['check', '--output=json', ...formatArgs, path], { cwd });
    const ours = await qcow86(['check', '--output=json', ...formatArgs, path], { cwd });
    expect(ours.exitCode).toBe(theirs.exitCode);
    if (theirs.exitCode !== 63) expect(JSON.parse(ours.stdout)).toEqual(JSON.parse(theirs.stdout));
  });

});

describe('after every command above', () => {
  it('left every input file unchanged (a dirty lazy-refcount image included)', async () => {
    for (const { before, cwd, path } of made.values()) {
      const after = await hashDir(cwd ?? join(path, '..'));
      for (const [file, hash] of before) expect({ file, hash: after.get(file) }).toEqual({ file, hash });
    }
  });
});

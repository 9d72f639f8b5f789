/**
 * rebase against qemu-img: a chain (plus the new backing files) is built twice; `qcow86 rebase` runs on one copy,
 * `qemu-img rebase` with the same options on the other. Then for every image: the same guest-visible contents,
 * the same backing name/format and virtual size (`qemu-img info`), `qemu-img check` clean on the overlay we wrote.
 * Independently of qemu-img: a safe rebase leaves the overlay's guest-visible contents exactly as before, and
 * copies nothing where the old and new backing files agree.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { makeImage, qemuImg, qemuInfo, qemuMap, run, tempDir, type ImageWrite } from '../helpers/qemu.js';
import { buildChain, contents, mapShape, sameAsQemu, twin, type LayerSpec } from '../helpers/chain.js';
import { startNginx, type NginxServer } from '../helpers/nginx.js';
import { EXT_QCOW86_BACKING_VALIDATOR } from '../../src/qcow2/header.js';
import { qcow86 } from './cli.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const pattern = (offset: number, length: number, value: number): ImageWrite => ({ offset, length, pattern: value });
const zero = (offset: number, length: number): ImageWrite => ({ offset, length, zero: true });

interface RebaseCase {
  name: string;
  /** The chain, bottom first; the last layer is the overlay that is rebased. */
  layers: LayerSpec[];
  /** Extra images (new backing files), made before the chain. */
  extra?: LayerSpec[];
  /** Arguments for both tools, before the overlay's name. */
  args: string[];
}

const overlayWrites: ImageWrite[] = [pattern(0, 64 * KiB, 2), pattern(200 * KiB, 3 * KiB, 3), zero(MiB, 64 * KiB), pattern(3 * MiB - 5 * KiB, 10 * KiB, 4)];
/** A new base that agrees with base.qcow2 (pattern 1) in some places and not in others. */
const newBaseWrites: ImageWrite[] = [pattern(0, MiB, 1), pattern(MiB, 512 * KiB, 6), pattern(2 * MiB + 4 * KiB, 2 * KiB, 7)];

const cases: RebaseCase[] = [
  {
    name: 'v3 64k: onto a partly different base',
    extra: [{ file: 'new.qcow2', size: '4M', writes: newBaseWrites }],
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ],
    args: ['-b', 'new.qcow2', '-F', 'qcow2'],
  },
  {
    name: 'extended_l2 overlay: differences copied per subcluster',
    extra: [{ file: 'new.qcow2', size: '4M', options: { extendedL2: true }, writes: [...newBaseWrites, pattern(2 * MiB + 40 * KiB, 512, 8)] }],
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', options: { extendedL2: true }, writes: [...overlayWrites, pattern(2 * MiB + 2 * KiB, 2 * KiB, 9)] },
    ],
    args: ['-b', 'new.qcow2', '-F', 'qcow2'],
  },
  {
    name: 'v2 (compat 0.10), 4k clusters',
    extra: [{ file: 'new.qcow2', size: '4M', options: { compat: '0.10', clusterSize: 4096 }, writes: newBaseWrites }],
    layers: [
      { file: 'base.qcow2', size: '4M', options: { compat: '0.10' }, writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', options: { compat: '0.10', clusterSize: 4096 }, writes: overlayWrites },
    ],
    args: ['-b', 'new.qcow2', '-F', 'qcow2'],
  },
  {
    name: '512-byte overlay clusters, new base with 2 MiB clusters',
    extra: [{ file: 'new.qcow2', size: '4M', options: { clusterSize: 2 * MiB }, writes: newBaseWrites }],
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', options: { clusterSize: 512 }, writes: overlayWrites },
    ],
    args: ['-b', 'new.qcow2', '-F', 'qcow2'],
  },
  {
    name: 'compressed old base onto a raw new base',
    extra: [{ file: 'new.raw', size: '4M', options: { format: 'raw' }, writes: [pattern(0, 2 * MiB, 1)] }],
    layers: [
      { file: 'base.qcow2', size: '4M', writes: Array.from({ length: 64 }, (_, i) => ({ offset: i * 64 * KiB, length: 64 * KiB, pattern: 1, compressed: true })) },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ],
    args: ['-b', 'new.raw', '-F', 'raw'],
  },
  {
    name: 'old backing shorter, new backing longer than the overlay',
    extra: [{ file: 'new.qcow2', size: '8M', writes: [pattern(0, 8 * MiB, 1)] }],
    layers: [
      { file: 'base.qcow2', size: '2M', writes: [pattern(0, 2 * MiB, 1)] },
      { file: 'top.qcow2', size: '6M', writes: [...overlayWrites, pattern(5 * MiB, 64 * KiB, 5)] },
    ],
    args: ['-b', 'new.qcow2', '-F', 'qcow2'],
  },
  {
    name: '3 levels: drop the middle layer (its data moves into the overlay)',
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'mid.qcow2', size: '4M', writes: [pattern(512 * KiB, MiB, 2), zero(3 * MiB, 128 * KiB)] },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ],
    args: ['-b', 'base.qcow2', '-F', 'qcow2'],
  },
  {
    name: '-b "": flatten a 3-level chain into the overlay',
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 3 * MiB, 1)] },
      { file: 'mid.qcow2', size: '4M', options: { extendedL2: true }, writes: [pattern(512 * KiB, MiB, 2), zero(2 * MiB, 64 * KiB)] },
      { file: 'top.qcow2', size: '4M', options: { extendedL2: true }, writes: overlayWrites },
    ],
    args: ['-b', ''],
  },
  {
    name: '-b "" on a v2 overlay',
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 3 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', options: { compat: '0.10' }, writes: overlayWrites },
    ],
    args: ['-b', ''],
  },
  {
    name: '-u: only the header changes (new name and format)',
    extra: [{ file: 'new.qcow2', size: '4M', writes: newBaseWrites }],
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ],
    args: ['-u', '-b', 'new.qcow2', '-F', 'qcow2'],
  },
  {
    name: '-u -b "": the backing file is forgotten',
    layers: [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', options: { compat: '0.10' }, writes: overlayWrites },
    ],
    args: ['-u', '-b', ''],
  },
];

describe('rebase', () => {
  for (const c of cases) {
    it(c.name, async () => {
      const ours = tempDir();
      for (const extra of c.extra ?? []) await buildChain(ours, [extra]);
      await buildChain(ours, c.layers);
      const theirs = await twin(ours);
      const top = c.layers.at(-1)!.file;
      const before = await contents(join(ours, top));
      const ownBefore = (await mapShape(join(ours, top))).filter((e) => e.depth === 0 && e.present);

      const result = await qcow86(['rebase', ...c.args, top], { cwd: ours });
      expect(result.exitCode, result.stderr).toBe(0);
      expect(result.stdout).toBe('');
      await qemuImg(['rebase', ...c.args, top], { cwd: theirs });

      await sameAsQemu(ours, theirs, [top]);
      const unsafe = c.args.includes('-u');
      const ownAfter = (await mapShape(join(ours, top))).filter((e) => e.depth === 0 && e.present);
      if (unsafe) {
        // Nothing but the header changed: the overlay's own allocation is exactly what it was.
        expect(ownAfter).toEqual(ownBefore);
      } else {
        // Safe: the guest sees exactly what it saw before.
        expect(Buffer.compare(Buffer.from(await contents(join(ours, top))), Buffer.from(before))).toBe(0);
        expect(ownAfter.reduce((n, e) => n + e.length, 0)).toBeGreaterThan(ownBefore.reduce((n, e) => n + e.length, 0));
      }
      const backing = c.args[c.args.indexOf('-b') + 1]!;
      const info = await qemuInfo(join(ours, top));
      expect(info['backing-filename']).toBe(backing === '' ? undefined : backing);
    });
  }

  it('copies nothing where the old and new backing files agree (byte-identical copy of the base)', async () => {
    const dir = tempDir();
    await buildChain(dir, [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ]);
    await run('cp', [join(dir, 'base.qcow2'), join(dir, 'copy.qcow2')]);
    const own = async () => (await mapShape(join(dir, 'top.qcow2'))).filter((e) => e.depth === 0 && e.present);
    const before = await own();
    const result = await qcow86(['rebase', '-b', 'copy.qcow2', '-F', 'qcow2', 'top.qcow2'], { cwd: dir });
    expect(result.exitCode, result.stderr).toBe(0);
    expect(await own()).toEqual(before);
    expect((await qemuInfo(join(dir, 'top.qcow2')))['backing-filename']).toBe('copy.qcow2');
  });

  it('a relative name is opened relative to the overlay and recorded as given', async () => {
    const dir = tempDir();
    await mkdir(join(dir, 'images'));
    await makeImage({ path: join(dir, 'images/base.qcow2'), size: '4M' }, [pattern(0, 4 * MiB, 1)]);
    await makeImage({ path: join(dir, 'images/other.qcow2'), size: '4M' }, newBaseWrites);
    await makeImage({ path: join(dir, 'images/top.qcow2'), size: '4M', backing: 'base.qcow2', backingFormat: 'qcow2' }, overlayWrites);
    const theirs = await twin(dir);
    const before = await contents(join(dir, 'images/top.qcow2'));
    // Run from the parent directory: 'other.qcow2' exists only next to the overlay.
    const result = await qcow86(['rebase', '-b', 'other.qcow2', '-F', 'qcow2', 'images/top.qcow2'], { cwd: dir });
    expect(result.exitCode, result.stderr).toBe(0);
    await qemuImg(['rebase', '-b', 'other.qcow2', '-F', 'qcow2', 'images/top.qcow2'], { cwd: theirs });
    await sameAsQemu(join(dir, 'images'), join(theirs, 'images'), ['top.qcow2']);
    expect((await qemuInfo(join(dir, 'images/top.qcow2')))['backing-filename']).toBe('other.qcow2');
    expect(Buffer.compare(Buffer.from(await contents(join(dir, 'images/top.qcow2'))), Buffer.from(before))).toBe(0);
  });

  it('-u repairs an overlay whose backing file was moved (the old one need not exist)', async () => {
    const dir = tempDir();
    await buildChain(dir, [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ]);
    const before = await contents(join(dir, 'top.qcow2'));
    await mkdir(join(dir, 'moved'));
    await rename(join(dir, 'base.qcow2'), join(dir, 'moved/base.qcow2'));
    await expect(contents(join(dir, 'top.qcow2'))).rejects.toThrow(/base\.qcow2/);
    const result = await qcow86(['rebase', '-u', '-b', 'moved/base.qcow2', '-F', 'qcow2', 'top.qcow2'], { cwd: dir });
    expect(result.exitCode, result.stderr).toBe(0);
    expect(Buffer.compare(Buffer.from(await contents(join(dir, 'top.qcow2'))), Buffer.from(before))).toBe(0);
    const check = await run('qemu-img', ['check', join(dir, 'top.qcow2')]);
    expect(check.exitCode, check.stdout + check.stderr).toBe(0);
  });
});

describe('rebase errors (exit codes and messages as qemu-img)', () => {
  async function chain(): Promise<string> {
    const dir = tempDir();
    await buildChain(dir, [
      { file: 'base.qcow2', size: '1M', writes: [pattern(0, MiB, 1)] },
      { file: 'top.qcow2', size: '1M', writes: [pattern(0, 4096, 2)] },
    ]);
    await makeImage({ path: join(dir, 'new.qcow2'), size: '1M' });
    return dir;
  }
  const cases: { name: string; args: string[]; message: string }[] = [
    { name: 'neither -b nor -u', args: [], message: 'Must specify backing file (-b) or use unsafe mode (-u)' },
    { name: '-b without -F', args: ['-b', 'new.qcow2'], message: "Could not change the backing file to 'new.qcow2': backing format must be specified" },
    { name: '-u -b without -F', args: ['-u', '-b', 'new.qcow2'], message: "Could not change the backing file to 'new.qcow2': backing format must be specified" },
    { name: 'a new backing file that does not exist', args: ['-b', 'nothere.qcow2', '-F', 'qcow2'], message: "Could not open new backing file 'nothere.qcow2'" },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const dir = await chain();
      const header = await readFile(join(dir, 'top.qcow2'));
      const ours = await qcow86(['rebase', ...c.args, 'top.qcow2'], { cwd: dir });
      const theirs = await run('qemu-img', ['rebase', ...c.args, 'top.qcow2'], { cwd: await twin(dir) });
      expect(theirs.exitCode).toBe(1);
      expect(ours.exitCode).toBe(1);
      expect(ours.stderr).toContain(c.message);
      // Failing before any change: the overlay is byte for byte what it was.
      expect(Buffer.compare(await readFile(join(dir, 'top.qcow2')), header)).toBe(0);
    });
  }

  it('a raw image has no backing file to change', async () => {
    const dir = await chain();
    await makeImage({ path: join(dir, 'disk.raw'), size: '1M', format: 'raw' });
    const ours = await qcow86(['rebase', '-f', 'raw', '-b', 'new.qcow2', '-F', 'qcow2', 'disk.raw'], { cwd: dir });
    const theirs = await run('qemu-img', ['rebase', '-f', 'raw', '-b', 'new.qcow2', '-F', 'qcow2', 'disk.raw'], { cwd: dir });
    expect(theirs.exitCode).toBe(1);
    expect(ours.exitCode).toBe(1);
    expect(ours.stderr).toContain("Could not change the backing file to 'new.qcow2': Operation not supported");
  });
});

describe('rebase and the backing validator (q86v)', () => {
  let nginx: NginxServer;
  const served = tempDir('qcow86-rebase-http-');
  beforeAll(async () => {
    await makeImage({ path: join(served, 'remote.qcow2'), size: '4M' }, newBaseWrites);
    nginx = await startNginx(served);
  });
  afterAll(async () => {
    await nginx?.close();
  });

  /** The 'q86v' extension found by walking the v3 header extensions by hand. */
  async function recordedValidator(path: string): Promise<string | undefined> {
    const bytes = await readFile(path);
    let at = bytes.readUInt32BE(100);
    for (;;) {
      const type = bytes.readUInt32BE(at);
      const length = bytes.readUInt32BE(at + 4);
      if (type === 0) return undefined;
      if (type === EXT_QCOW86_BACKING_VALIDATOR) return bytes.subarray(at + 8, at + 8 + length).toString('utf8');
      at += 8 + Math.ceil(length / 8) * 8;
    }
  }

  it('is set from an HTTP backing file (safe and -u), and removed for a local one', async () => {
    const dir = tempDir();
    await buildChain(dir, [
      { file: 'base.qcow2', size: '4M', writes: [pattern(0, 4 * MiB, 1)] },
      { file: 'top.qcow2', size: '4M', writes: overlayWrites },
    ]);
    const top = join(dir, 'top.qcow2');
    const before = await contents(top);
    const url = `${nginx.url}remote.qcow2`;
    const etag = (await fetch(url, { method: 'HEAD' })).headers.get('ETag');
    expect(etag).toBeTruthy();

    const safe = await qcow86(['rebase', '-b', url, '-F', 'qcow2', top]);
    expect(safe.exitCode, safe.stderr).toBe(0);
    expect(await recordedValidator(top)).toBe(etag);
    // qemu-img reads the overlay over HTTP (its curl driver) and sees what the guest saw before.
    expect((await qemuInfo(top))['backing-filename']).toBe(url);
    expect(Buffer.compare(Buffer.from(await contents(top)), Buffer.from(before))).toBe(0);
    expect((await run('qemu-img', ['check', top])).exitCode).toBe(0);

    // Back to a local copy of the same bytes with -u: the validator goes.
    await run('cp', [join(served, 'remote.qcow2'), join(dir, 'local.qcow2')]);
    expect((await qcow86(['rebase', '-u', '-b', 'local.qcow2', '-F', 'qcow2', top])).exitCode).toBe(0);
    expect(await recordedValidator(top)).toBeUndefined();
    expect(Buffer.compare(Buffer.from(await contents(top)), Buffer.from(before))).toBe(0);

    // -u onto the URL records it again; -b "" removes it with the backing file.
    expect((await qcow86(['rebase', '-u', '-b', url, '-F', 'qcow2', top])).exitCode).toBe(0);
    expect(await recordedValidator(top)).toBe(etag);
    expect((await qcow86(['rebase', '-b', '', top])).exitCode).toBe(0);
    expect(await recordedValidator(top)).toBeUndefined();
    expect((await qemuInfo(top))['backing-filename']).toBeUndefined();
    expect(Buffer.compare(Buffer.from(await contents(top)), Buffer.from(before))).toBe(0);
    expect((await run('qemu-img', ['check', top])).exitCode).toBe(0);
  });
});

/**
 * Differential property test: the same random sequence of writes, zero writes, discards and snapshots goes
 * through our engine and through qemu-io/qemu-img on identical starting images; the guest-visible contents
 * (and every snapshot's) must match, and our image must pass qemu-img check with no errors and no leaks.
 */
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { makeImage, qemuCheck, qemuImg, qemuIo, tempDir, type ImageOptions, type ImageWrite } from '../helpers/qemu.js';
import { expectClean, expectSameContents, openRw, pattern } from '../helpers/engine.js';

type Op =
  | { kind: 'write'; offset: number; length: number; value: number }
  | { kind: 'zero'; offset: number; length: number; unmap: boolean }
  | { kind: 'discard'; offset: number; length: number }
  | { kind: 'snapshot' }
  | { kind: 'apply'; which: number }
  | { kind: 'delete'; which: number };

interface Variant {
  name: string;
  image: Omit<ImageOptions, 'size' | 'path' | 'backing'>;
  backing?: boolean;
  snapshots?: boolean;
  /** The starting image holds compressed clusters (qemu-io `write -c`), which writes must replace, not patch. */
  compressedStart?: boolean;
  runs: number;
}

const SIZE = 8 * 1024 * 1024 + 3 * 512; // not a multiple of the cluster size: the last cluster is partial
const long = process.env.QCOW86_LONG === '1';

const variants: Variant[] = [
  { name: 'v3 64k', image: {}, runs: 30 },
  { name: 'v3 64k backing', image: {}, backing: true, runs: 30 },
  { name: 'v2 64k backing', image: { compat: '0.10' }, backing: true, runs: 25 },
  { name: 'v2 4k', image: { compat: '0.10', clusterSize: 4096 }, runs: 25 },
  { name: 'v3 512 refcount 1', image: { clusterSize: 512, refcountBits: 1 }, runs: 20 },
  { name: 'v3 4k refcount 64', image: { clusterSize: 4096, refcountBits: 64 }, runs: 20 },
  { name: 'v3 512 refcount 64 (refcount table grows)', image: { clusterSize: 512, refcountBits: 64 }, runs: 15 },
  { name: 'v3 2k refcount 4 backing', image: { clusterSize: 2048, refcountBits: 4 }, backing: true, runs: 20 },
  { name: 'extended L2 32k', image: { clusterSize: 32768, extendedL2: true }, runs: 30 },
  { name: 'extended L2 64k backing', image: { extendedL2: true }, backing: true, runs: 30 },
  { name: 'lazy refcounts', image: { lazyRefcounts: true, clusterSize: 16384 }, backing: true, runs: 20 },
  { name: 'v3 64k snapshots', image: {}, snapshots: true, runs: 20 },
  { name: 'v2 16k snapshots backing', image: { compat: '0.10', clusterSize: 16384 }, backing: true, snapshots: true, runs: 15 },
  { name: 'extended L2 snapshots', image: { clusterSize: 32768, extendedL2: true }, snapshots: true, runs: 15 },
  { name: 'v3 8k refcount 8 snapshots backing', image: { clusterSize: 8192, refcountBits: 8 }, backing: true, snapshots: true, runs: 20 },
  { name: 'deflate-compressed clusters in the start image', image: { clusterSize: 16384 }, compressedStart: true, runs: 20 },
  { name: 'zstd-compressed clusters in the start image, snapshots', image: { compressionType: 'zstd' }, compressedStart: true, snapshots: true, runs: 15 },
  { name: 'preallocation=metadata', image: { preallocation: 'metadata', clusterSize: 32768 }, runs: 15 },
  { name: 'preallocation=metadata, extended L2, backing', image: { preallocation: 'metadata', extendedL2: true }, backing: true, runs: 15 },
  // Each side gets its own data file (the image records its absolute name: QEMU opens a relative one from its
  // working directory), made by the same qemu-img create.
  { name: 'external data file', image: { dataFile: 'data' }, runs: 15 },
  { name: 'external raw data file', image: { dataFile: 'data', dataFileRaw: true, clusterSize: 4096 }, runs: 15 },
];

function opArb(snapshots: boolean): fc.Arbitrary<Op> {
  // Mostly sector-aligned ranges (some byte-granular writes), biased towards a few hot areas so ops overlap.
  const hot = fc.constantFrom(0, 64 * 1024, 1024 * 1024 - 4096, 4 * 1024 * 1024, SIZE - 70000);
  const offset = fc.oneof(
    fc.tuple(hot, fc.integer({ min: 0, max: 256 })).map(([base, sectors]) => Math.min(base + sectors * 512, SIZE - 512)),
    fc.integer({ min: 0, max: SIZE / 512 - 1 }).map((s) => s * 512),
  );
  const length = fc.oneof(fc.integer({ min: 1, max: 64 }).map((s) => s * 512), fc.integer({ min: 1, max: 512 }).map((s) => s * 512), fc.integer({ min: 1, max: 5000 }));
  const clip = (o: number, l: number) => Math.max(1, Math.min(l, SIZE - o));
  const arbs: fc.Arbitrary<Op>[] = [
    fc.tuple(offset, length, fc.integer({ min: 1, max: 255 })).map(([o, l, value]) => ({ kind: 'write' as const, offset: o, length: clip(o, l), value })),
    fc.tuple(offset, length, fc.boolean()).map(([o, l, unmap]) => ({ kind: 'zero' as const, offset: o, length: clip(o, l), unmap })),
    fc.tuple(offset, length).map(([o, l]) => ({ kind: 'discard' as const, offset: o, length: clip(o, l) })),
  ];
  if (snapshots) {
    arbs.push(fc.constant({ kind: 'snapshot' as const }), fc.constant({ kind: 'snapshot' as const }));
    arbs.push(fc.nat(7).map((which) => ({ kind: 'apply' as const, which })), fc.nat(7).map((which) => ({ kind: 'delete' as const, which })));
  }
  return fc.oneof(...arbs);
}

function ioCommand(op: Op): string {
  switch (op.kind) {
    case 'write':
      return `write -P ${op.value} ${op.offset} ${op.length}`;
    case 'zero':
      return `write -z ${op.unmap ? '-u ' : ''}${op.offset} ${op.length}`;
    case 'discard':
      return `discard ${op.offset} ${op.length}`;
    default:
      throw new Error('not a qemu-io command');
  }
}

async function prepare(variant: Variant): Promise<{ dir: string; start: string }> {
  const dir = tempDir('qcow86-diff-');
  const start = join(dir, 'start.qcow2');
  if (variant.backing) {
    await makeImage({ path: join(dir, 'base.qcow2'), size: SIZE - 4096, clusterSize: 65536 }, [
      { offset: 0, length: 3 * 1024 * 1024, pattern: 0x5a },
      { offset: 4 * 1024 * 1024, length: 2 * 1024 * 1024 + 512, pattern: 0x3c },
    ]);
    await makeImage(startOptions(variant, start), startWrites(variant));
  } else {
    await makeImage({ ...startOptions(variant, start) }, startWrites(variant));
  }
  if (variant.compressedStart) {
    // The point of the variant: the start image really holds compressed clusters.
    const { result } = await qemuCheck(start);
    expect(result['compressed-clusters']).toBeGreaterThan(0);
  }
  return { dir, start };
}

function startOptions(variant: Variant, path: string): ImageOptions {
  const dataFile = variant.image.dataFile === undefined ? {} : { dataFile: `${path}.data` };
  const backing = variant.backing ? { backing: 'base.qcow2', backingFormat: 'qcow2' } : {};
  return { ...variant.image, ...dataFile, ...backing, path, size: SIZE };
}

function startWrites(variant: Variant): ImageWrite[] {
  // (Compressed writes cannot overwrite allocated clusters, so a compressed start has only those.)
  const writes: ImageWrite[] = variant.backing || variant.compressedStart ? [] : [{ offset: 0, length: 128 * 1024, pattern: 0x11 }];
  if (variant.compressedStart) {
    // Whole clusters, compressible; some overlap the hot areas the operations favour.
    const cluster = variant.image.clusterSize ?? 65536;
    [0, 1024 * 1024 - 4 * cluster, 4 * 1024 * 1024, 6 * 1024 * 1024].forEach((at, i) => {
      writes.push({ offset: at, length: 4 * cluster, pattern: 0x21 + i, compressed: true });
    });
  }
  return writes;
}

/** Two identical starting images; each keeps its own external data file when the variant has one. */
async function startPair(variant: Variant, start: string, ours: string, theirs: string): Promise<void> {
  if (variant.image.dataFile === undefined) {
    await copyFile(start, ours);
    await copyFile(start, theirs);
    return;
  }
  for (const path of [ours, theirs]) await makeImage(startOptions(variant, path), startWrites(variant));
}

let sequenceNumber = 0;

async function replay(variant: Variant, dir: string, start: string, ops: Op[]): Promise<void> {
  const n = sequenceNumber++;
  const ours = join(dir, `ours-${n}.qcow2`);
  const theirs = join(dir, `theirs-${n}.qcow2`);
  await startPair(variant, start, ours, theirs);

  // QEMU: one qemu-io process per stretch of I/O commands, qemu-img snapshot between stretches.
  let batch: string[] = [];
  const runBatch = async () => {
    if (batch.length) await qemuIo(['-f', 'qcow2', ...batch.flatMap((c) => ['-c', c]), theirs]);
    batch = [];
  };
  // Snapshot names alive at each step, the same for both sides.
  let live: string[] = [];
  let made = 0;
  const plan = ops.map((op) => {
    if (op.kind === 'snapshot') {
      const name = `s${made++}`;
      live.push(name);
      return { op, name };
    }
    if (op.kind === 'apply' || op.kind === 'delete') {
      if (!live.length) return { op, name: undefined };
      const name = live[op.which % live.length]!;
      if (op.kind === 'delete') live = live.filter((s) => s !== name);
      return { op, name };
    }
    return { op, name: undefined };
  });
  for (const { op, name } of plan) {
    if (op.kind === 'snapshot' || op.kind === 'apply' || op.kind === 'delete') {
      if (name === undefined) continue;
      await runBatch();
      await qemuImg(['snapshot', op.kind === 'snapshot' ? '-c' : op.kind === 'apply' ? '-a' : '-d', name, theirs]);
    } else {
      batch.push(ioCommand(op));
    }
  }
  await runBatch();

  const image = await openRw(ours);
  for (const { op, name } of plan) {
    if (op.kind === 'write') await image.write(op.offset, pattern(op.length, op.value));
    else if (op.kind === 'zero') await image.writeZeroes(op.offset, op.length, { unmap: op.unmap });
    else if (op.kind === 'discard') await image.discard(op.offset, op.length);
    else if (name === undefined) continue;
    else if (op.kind === 'snapshot') await image.createSnapshot(name);
    else if (op.kind === 'apply') await image.applySnapshot(name);
    else await image.deleteSnapshot(name);
  }
  await image.close();

  await expectClean(ours);
  await expectSameContents(ours, theirs);
  for (const name of live) {
    const a = join(dir, `a-${n}.raw`);
    const b = join(dir, `b-${n}.raw`);
    await qemuImg(['convert', '-l', name, '-O', 'raw', ours, a]);
    await qemuImg(['convert', '-l', name, '-O', 'raw', theirs, b]);
    await expectSameContents(a, b, ['-f', 'raw', '-F', 'raw']);
  }
}

describe('differential: our engine vs qemu-io on the same random sequences', () => {
  for (const variant of variants) {
    it(`${variant.name}`, async () => {
      const { dir, start } = await prepare(variant);
      await fc.assert(
        fc.asyncProperty(fc.array(opArb(variant.snapshots === true), { minLength: 1, maxLength: 14 }), (ops) => replay(variant, dir, start, ops)),
        { numRuns: long ? variant.runs * 10 : variant.runs, endOnFailure: true },
      );
    }, 600_000);
  }
});

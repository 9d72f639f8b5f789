/**
 * Crash test: a child process writes at random and is SIGKILLed at a random moment, dozens of times. Afterwards
 * qemu-img check finds no corruption (leaks are allowed), `check -r leaks` cleans the image, and every sector
 * whose last change was acknowledged by a completed flush reads back as written.
 */
import { describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { makeImage, qemuCheck, qemuConvertToRaw, qemuImg, tempDir, type ImageOptions } from '../helpers/qemu.js';
import { expectClean, openRw } from '../helpers/engine.js';
import { buildEngine } from '../helpers/build.js';

const SIZE = 16 * 1024 * 1024;
const SECTORS = SIZE / 512;
const long = process.env.QCOW86_LONG === '1';
const writer = resolve(import.meta.dirname, 'crash-writer.mjs');

type Op = { kind: 'write'; first: number; count: number; value: number } | { kind: 'zero'; first: number; count: number; unmap: boolean } | { kind: 'discard'; first: number; count: number };

interface Variant {
  name: string;
  image: Omit<ImageOptions, 'size' | 'path'>;
  backing: boolean;
  /** Lazy refcounts: the next read-write open repairs the refcounts (QEMU's rule), so it runs before checking. */
  lazy?: boolean;
  runs: number;
}

const variants: Variant[] = [
  { name: 'v3 64k over a backing file', image: {}, backing: true, runs: 8 },
  { name: 'v2 4k', image: { compat: '0.10', clusterSize: 4096 }, backing: false, runs: 8 },
  { name: 'extended L2 over a backing file', image: { extendedL2: true, clusterSize: 32768 }, backing: true, runs: 8 },
  { name: '512-byte clusters, 2-bit refcounts (refcount structures grow)', image: { clusterSize: 512, refcountBits: 2 }, backing: false, runs: 6 },
  { name: 'lazy refcounts', image: { lazyRefcounts: true }, backing: true, lazy: true, runs: 6 },
];

function seeded(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    return x / 2 ** 32;
  };
}

/** Runs the writer until a random moment, kills it, and returns what it reported. */
function runAndKill(dist: string, path: string, seed: number, killAfterMs: number): Promise<{ ops: Op[]; flushedUpTo: number }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [writer, dist, path, String(seed), String(SECTORS)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let timer: NodeJS.Timeout | undefined;
    child.stdout.on('data', (chunk: Buffer) => {
      out += chunk.toString();
      if (!timer && out.includes('ready\n')) timer = setTimeout(() => child.kill('SIGKILL'), killAfterMs);
    });
    child.stderr.on('data', (chunk: Buffer) => (err += chunk.toString()));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      if (signal !== 'SIGKILL') return reject(new Error(`writer ended with ${code ?? signal} before being killed:\n${err}`));
      const ops: Op[] = [];
      let flushedUpTo = 0;
      for (const line of out.split('\n')) {
        if (line.startsWith('op ')) ops.push(JSON.parse(line.slice(3)) as Op);
        else if (line === 'flushed') flushedUpTo = ops.length;
      }
      resolvePromise({ ops, flushedUpTo });
    });
  });
}

describe('crash safety: SIGKILL during random writes', () => {
  for (const variant of variants) {
    it(variant.name, async () => {
      const dist = buildEngine();
      const dir = tempDir('qcow86-crash-');
      // What the disk holds before the writer starts, per sector (the backing file shows through).
      const initial = new Int16Array(SECTORS);
      let base: string | undefined;
      if (variant.backing) {
        base = await makeImage({ path: join(dir, 'base.qcow2'), size: SIZE }, [{ offset: 0, length: SIZE / 2, pattern: 0xbb }]);
        initial.fill(0xbb, 0, SECTORS / 2);
      }
      const random = seeded(variant.name.length * 7919 + 1);
      const runs = long ? variant.runs * 5 : variant.runs;
      for (let run = 0; run < runs; run++) {
        const path = join(dir, `crash-${run}.qcow2`);
        await makeImage({ ...variant.image, path, size: SIZE, ...(base ? { backing: base, backingFormat: 'qcow2' } : {}) });
        const { ops, flushedUpTo } = await runAndKill(dist, path, 1 + Math.floor(random() * 2 ** 31), 30 + Math.floor(random() * 500));

        if (variant.lazy) {
          // The writer died with the image dirty: a read-write open rebuilds the refcounts.
          const image = await openRw(path);
          await image.close();
        }
        const { exitCode, result } = await qemuCheck(path);
        expect({ run, exitCode: exitCode === 3 ? 0 : exitCode, corruptions: result.corruptions ?? 0, errors: result['check-errors'] }).toEqual({ run, exitCode: 0, corruptions: 0, errors: 0 });
        await qemuImg(['check', '-q', '-r', 'leaks', path]);
        await expectClean(path);

        // Expected contents: acknowledged operations applied; sectors touched afterwards are unknown (-1).
        const expected = initial.slice();
        ops.forEach((op, index) => {
          const value = index >= flushedUpTo ? -1 : op.kind === 'write' ? op.value : op.kind === 'discard' ? null : 0;
          if (value === null) {
            // Discard applies to whole clusters only, and then reads as zero (v3) or backing/zero (v2 without backing).
            const cluster = (variant.image.clusterSize ?? 65536) / 512;
            const from = Math.ceil(op.first / cluster) * cluster;
            const to = op.first + op.count >= SECTORS ? SECTORS : Math.floor((op.first + op.count) / cluster) * cluster;
            if (to > from) expected.fill(0, from, to);
          } else {
            expected.fill(value, op.first, op.first + op.count);
          }
        });
        const raw = new Uint8Array(await readFile(await qemuConvertToRaw(path, { out: join(dir, `crash-${run}.raw`) })));
        let wrong = -1;
        for (let s = 0; s < SECTORS && wrong < 0; s++) {
          const want = expected[s]!;
          if (want < 0) continue;
          for (let i = s * 512; i < (s + 1) * 512; i++) {
            if (raw[i] !== want) {
              wrong = s;
              break;
            }
          }
        }
        expect({ run, ops: ops.length, acknowledged: flushedUpTo, firstWrongSector: wrong }).toEqual({ run, ops: ops.length, acknowledged: flushedUpTo, firstWrongSector: -1 });
      }
    }, 300_000);
  }
});

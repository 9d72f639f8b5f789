/**
 * Hostile images: qemu-img-made images with patched headers and tables. Each must end in a specific typed
 * error (class and the field or problem named in the message) within 1 s and in bounded memory, measured in a
 * child process (its peak resident size) so one case cannot hide another's allocation.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { copyFile, readFile, truncate, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { makeImage, qemuImg, run, tempDir } from '../helpers/qemu.js';
import { qcow86 } from '../cli/cli.js';
import { buildEngine } from '../helpers/build.js';

const child = resolve(import.meta.dirname, 'read-child.mjs');
const CS = 65536;

interface Outcome {
  ok: boolean;
  error?: string;
  message?: string;
  ms: number;
  cpuMs: number;
  maxRssMiB: number;
}

function readInChild(image: string, format?: string): Promise<Outcome> {
  return new Promise((resolvePromise, reject) => {
    // The generous outer timeout only turns a hang into a failure; the 1 s bound is measured inside the child, as CPU time.
    execFile(process.execPath, [child, buildEngine(), image, ...(format ? [format] : [])], { timeout: 60_000, encoding: 'utf8' }, (error, stdout, stderr) => {
      if (error) return reject(new Error(`child failed: ${error.message}\n${stderr}`));
      resolvePromise(JSON.parse(stdout.trim().split('\n').pop()!) as Outcome);
    });
  });
}

let dir: string;
let base: string;
/** Host offsets learned from the pristine image. */
let layout: { l1: number; refTable: number; l2: number; compressedEntry: number; dataEntry: number; featureTable: number };

beforeAll(async () => {
  dir = tempDir();
  base = await makeImage({ path: join(dir, 'base.qcow2'), size: 16 * 1024 * 1024 }, [
    { offset: 0, length: 2 * CS, pattern: 0x11 },
    { offset: 4 * CS, length: CS, pattern: 0x22, compressed: true },
  ]);
  await qemuImg(['snapshot', '-c', 's1', base]);
  const bytes = await readFile(base);
  const l1 = Number(bytes.readBigUInt64BE(40));
  const l2 = Number(bytes.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  let featureTable = -1;
  for (let at = bytes.readUInt32BE(100); at < CS; ) {
    const type = bytes.readUInt32BE(at);
    const length = bytes.readUInt32BE(at + 4);
    if (type === 0) break;
    if (type === 0x6803f857) featureTable = at + 8;
    at += 8 + Math.ceil(length / 8) * 8;
  }
  layout = { l1, refTable: Number(bytes.readBigUInt64BE(48)), l2, dataEntry: l2, compressedEntry: l2 + 4 * 8, featureTable };
});

type Patch = (bytes: Buffer, path: string) => unknown;

async function patched(name: string, patch: Patch): Promise<string> {
  const path = join(dir, `${name.replace(/[^a-z0-9]+/gi, '-')}.qcow2`);
  await copyFile(base, path);
  const bytes = await readFile(path);
  await patch(bytes, path);
  await writeFile(path, bytes);
  return path;
}

const cases: { name: string; patch: Patch; error: string; message: RegExp; format?: string }[] = [
  { name: 'bad magic (opened with -f qcow2)', patch: (b) => b.writeUInt32BE(0x51464900, 0), error: 'UnsupportedError', message: /not in qcow2 format/, format: 'qcow2' },
  { name: 'version 4', patch: (b) => b.writeUInt32BE(4, 4), error: 'UnsupportedError', message: /version 4/ },
  { name: 'cluster_bits 30', patch: (b) => b.writeUInt32BE(30, 20), error: 'FormatError', message: /cluster_bits 30/ },
  { name: 'cluster_bits 8', patch: (b) => b.writeUInt32BE(8, 20), error: 'FormatError', message: /cluster_bits 8/ },
  { name: 'huge l1_size', patch: (b) => b.writeUInt32BE(0x10000000, 36), error: 'FormatError', message: /l1_size/ },
  { name: 'l1_size too small for the disk', patch: (b) => b.writeUInt32BE(0, 36), error: 'FormatError', message: /l1_size 0/ },
  { name: 'misaligned L1 table', patch: (b) => b.writeBigUInt64BE(BigInt(layout.l1 + 8), 40), error: 'FormatError', message: /l1_table_offset .* aligned/ },
  { name: 'L1 table outside the file', patch: (b) => b.writeBigUInt64BE(1n << 40n, 40), error: 'FormatError', message: /l1_table_offset .*outside the file/ },
  { name: 'refcount table outside the file', patch: (b) => b.writeBigUInt64BE(1n << 45n, 48), error: 'FormatError', message: /refcount_table_offset/ },
  { name: 'refcount_order 7', patch: (b) => b.writeUInt32BE(7, 96), error: 'FormatError', message: /refcount_order 7/ },
  { name: 'unknown incompatible feature bit 7', patch: (b) => b.writeUInt32BE(b.readUInt32BE(76) | 0x80, 76), error: 'UnsupportedError', message: /incompatible feature bit 7/ },
  {
    name: 'unknown incompatible feature named by the image',
    patch: (b) => {
      b.writeUInt32BE(b.readUInt32BE(76) | 0x20, 76);
      // Rename the table's entry for incompatible bit 4 to describe bit 5.
      for (let at = layout.featureTable; b[at] === 0 || b[at] === 1 || b[at] === 2; at += 48) {
        if (b[at] === 0 && b[at + 1] === 4) {
          b[at + 1] = 5;
          b.write('quantum entanglement'.padEnd(46, '\0'), at + 2, 'latin1');
          break;
        }
      }
    },
    error: 'UnsupportedError',
    message: /quantum entanglement/,
  },
  { name: 'absurd backing name length', patch: (b) => (b.writeBigUInt64BE(512n, 8), b.writeUInt32BE(0xffffffff, 16)), error: 'FormatError', message: /backing_file_size/ },
  { name: 'huge nb_snapshots', patch: (b) => b.writeUInt32BE(0xffffffff, 60), error: 'FormatError', message: /nb_snapshots/ },
  { name: 'nb_snapshots past the table', patch: (b) => b.writeUInt32BE(60000, 60), error: 'FormatError', message: /snapshot/ },
  { name: 'extension longer than the header area', patch: (b) => b.writeUInt32BE(0x7fffffff, b.readUInt32BE(100) + 4), error: 'FormatError', message: /extension/ },
  { name: 'L2 table offset misaligned', patch: (b) => b.writeBigUInt64BE(BigInt(layout.l2 + 512) | (1n << 63n), layout.l1), error: 'CorruptImageError', message: /L2 table offset .* unaligned/ },
  { name: 'L2 table outside the file', patch: (b) => b.writeBigUInt64BE((1n << 44n) | (1n << 63n), layout.l1), error: 'ShortReadError', message: /L2 table/ },
  // Past 2^53 a number no longer addresses bytes exactly: must still be a short read, not a crash in the store.
  { name: 'L2 table offset above 2^53', patch: (b) => b.writeBigUInt64BE((1n << 55n) | (1n << 63n), layout.l1), error: 'ShortReadError', message: /L2 table at offset 0x80000000000000 is truncated/ },
  { name: 'data cluster offset misaligned', patch: (b) => b.writeBigUInt64BE(b.readBigUInt64BE(layout.dataEntry) + 512n, layout.dataEntry), error: 'CorruptImageError', message: /unaligned/ },
  {
    name: 'compressed descriptor pointing past the end of the file',
    patch: (b) => b.writeBigUInt64BE((1n << 62n) | (0xffn << 54n) | ((1n << 50n) + 123n), layout.compressedEntry),
    error: 'CorruptImageError',
    message: /compressed cluster .* outside the file/,
  },
  {
    name: 'compressed data corrupt',
    patch: (b) => {
      const entry = b.readBigUInt64BE(layout.compressedEntry);
      const offset = Number(entry & ((1n << 54n) - 1n));
      b.fill(0xff, offset, offset + 64);
    },
    error: 'FormatError',
    message: /compressed cluster .* corrupt/,
  },
  {
    name: 'truncated compressed data',
    patch: (b) => {
      const entry = b.readBigUInt64BE(layout.compressedEntry);
      const offset = Number(entry & ((1n << 54n) - 1n));
      // The stream (79 bytes for a patterned cluster, whose first 20 bytes already decode to the whole
      // cluster) stops after 2 bytes: what follows is zeros.
      b.fill(0, offset + 2, offset + 400);
    },
    error: 'FormatError',
    message: /compressed cluster/,
  },
];

describe('corrupt images end in a specific error, fast and in bounded memory', () => {
  it.each(cases)('$name', async ({ name, patch, error, message, format }) => {
    const path = await patched(name, patch);
    const outcome = await readInChild(path, format);
    expect(outcome.ok, JSON.stringify(outcome)).toBe(false);
    expect(outcome.error).toMatch(new RegExp(`^(${error})$`));
    expect(outcome.message).toMatch(message);
    expect(outcome.cpuMs).toBeLessThan(1000);
    expect(outcome.ms).toBeLessThan(10_000); // wall time: only a hang guard, generous for a loaded CI machine
    expect(outcome.maxRssMiB).toBeLessThan(256);
  });

  it('an L2 table overlapping the header reads like QEMU reads it, and check reports the overlap as corruption', async () => {
    // Reads do not look for overlaps (neither does QEMU); check does, and exits 2 like qemu-img check.
    const path = await patched('l2-over-header', (b) => b.writeBigUInt64BE(1n << 63n, layout.l1));
    const theirs = await run('qemu-img', ['check', path]);
    const ours = await qcow86(['check', path]);
    expect(theirs.exitCode).toBe(2);
    expect(ours.exitCode).toBe(2);
    // The L1 entry has only flag bits: both walk the header as an L2 table and list the same findings.
    const findings = (text: string) => text.split('\n').filter((line) => /^(ERROR|Leaked)/.test(line)).sort();
    expect(findings(ours.stderr + ours.stdout)).toEqual(findings(theirs.stderr + theirs.stdout));
    expect(findings(ours.stderr + ours.stdout).length).toBeGreaterThan(10);
  });

  it("a snapshot's L1 table outside the file: the image opens (as in QEMU, which checks a snapshot's L1 only on use), reading that snapshot is a FormatError naming it", async () => {
    const path = await patched('snapshot-l1-outside', (b) => b.writeBigUInt64BE(1n << 40n, Number(b.readBigUInt64BE(64))));
    const outcome = await readInChild(path);
    expect(outcome.ok, JSON.stringify(outcome)).toBe(true);
    expect(outcome.cpuMs).toBeLessThan(1000);
    const ours = await qcow86(['convert', '-l', 's1', '-O', 'raw', path, join(dir, 'snapshot-l1-outside.raw')]);
    expect(ours.exitCode).toBe(1);
    expect(ours.stderr).toMatch(/snapshot 1 \(s1\): L1 table \(\d+ bytes at l1_table_offset 0x10000000000\) lies outside the file/);
  });

  it('a backing chain loop (a -> b -> a) is refused', async () => {
    const a = join(dir, 'loop-a.qcow2');
    const b = join(dir, 'loop-b.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', a, '1M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'loop-a.qcow2', '-F', 'qcow2', b, '1M']);
    await qemuImg(['rebase', '-u', '-b', 'loop-b.qcow2', '-F', 'qcow2', a]);
    const outcome = await readInChild(a);
    expect(outcome.error).toBe('BackingChainError');
    expect(outcome.message).toMatch(/loop/);
    expect(outcome.cpuMs).toBeLessThan(1000);
    expect(outcome.ms).toBeLessThan(10_000); // wall time: only a hang guard, generous for a loaded CI machine
  });

  it('an image naming itself as its backing file is refused', async () => {
    const a = join(dir, 'self.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', a, '1M']);
    await qemuImg(['rebase', '-u', '-b', 'self.qcow2', '-F', 'qcow2', a]);
    const outcome = await readInChild(a);
    expect(outcome.error).toBe('BackingChainError');
    expect(outcome.message).toMatch(/loop/);
  });

  it('a file truncated inside its L1 table ends in a short-read error', async () => {
    const path = await patched('truncated', () => {});
    await truncate(path, layout.l1 + 4);
    const outcome = await readInChild(path);
    expect(outcome.ok).toBe(false);
    expect(outcome.error).toMatch(/FormatError|ShortReadError/);
    expect(outcome.cpuMs).toBeLessThan(1000);
    expect(outcome.ms).toBeLessThan(10_000); // wall time: only a hang guard, generous for a loaded CI machine
  });

  it('a 1 TiB sparse image reads in bounded memory', async () => {
    const path = await makeImage({ path: join(dir, 'tera.qcow2'), size: '1T' }, [{ offset: 2 ** 39, length: CS, pattern: 1 }]);
    const outcome = await readInChild(path);
    expect(outcome.ok).toBe(true);
    expect(outcome.maxRssMiB).toBeLessThan(256);
  });
});

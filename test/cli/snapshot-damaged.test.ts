/**
 * Damaged snapshot table entries, qemu-img 7.2 as the oracle. QEMU opens an image whose snapshot's L1 table is
 * oversized, misaligned or outside the file (it judges a snapshot's L1 only when the snapshot is used), check
 * reports the entry, and the active disk converts; using that snapshot fails. Version 3 entries with less than
 * 16 bytes of extra data are "incomplete": a corruption for check, rewritten by check -r all.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImg, qemuIo, run, sha256, tempDir, type RunResult } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

let dir: string;
let template: string;
/** Where the first snapshot table entry starts. */
let entry: number;

beforeAll(async () => {
  dir = tempDir('qcow86-snapshot-damaged-');
  template = join(dir, 'template.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', template, '4M']);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 1 0 64k', '-c', 'write -P 3 1M 4k', template]);
  await qemuImg(['snapshot', '-c', 'snap1', template]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 12 8k 8k', template]);
  entry = Number((await readFile(template)).readBigUInt64BE(64));
});

async function damaged(name: string, patch: (bytes: Buffer) => void): Promise<string> {
  const bytes = await readFile(template);
  patch(bytes);
  const path = join(dir, `${name}.qcow2`);
  await writeFile(path, bytes);
  return path;
}

/** Findings (sorted: their order is not part of the contract) and the summary, less each tool's own error line. */
function findings(result: RunResult): string {
  const lines = result.stderr.split('\n').filter((line) => line !== '' && !/^(qemu-img|qcow86 check): /.test(line));
  return [...lines.sort(), '--', result.stdout.trim()].join('\n');
}

async function expectSameCheck(path: string, args: string[] = []): Promise<RunResult> {
  const ourCopy = join(dir, 'ours.qcow2');
  const theirCopy = join(dir, 'theirs.qcow2');
  await copyFile(path, ourCopy);
  await copyFile(path, theirCopy);
  const theirs = await run('qemu-img', ['check', ...args, theirCopy]);
  const ours = await qcow86(['check', ...args, ourCopy]);
  expect(findings(ours)).toBe(findings(theirs));
  expect(ours.exitCode).toBe(theirs.exitCode);
  return ours;
}

async function expectSameActiveConvert(path: string): Promise<void> {
  const theirs = join(dir, 'theirs.raw');
  const ours = join(dir, 'ours.raw');
  await qemuImg(['convert', '-O', 'raw', path, theirs]);
  const result = await qcow86(['convert', '-O', 'raw', path, ours]);
  expect(result.exitCode, result.stderr).toBe(0);
  expect(await sha256(ours)).toBe(await sha256(theirs));
}

/** Using the snapshot fails for both tools; our message names the snapshot and the field; the image is unchanged. */
async function expectSnapshotRefused(path: string, field: RegExp): Promise<void> {
  const before = await sha256(path);
  expect((await run('qemu-img', ['convert', '-l', 'snap1', '-O', 'raw', path, join(dir, 'theirs-l.raw')])).exitCode).toBe(1);
  const converted = await qcow86(['convert', '-l', 'snap1', '-O', 'raw', path, join(dir, 'ours-l.raw')]);
  expect(converted.exitCode).toBe(1);
  expect(converted.stderr).toMatch(new RegExp(`snapshot 1 \\(snap1\\): ${field.source}`));
  for (const op of ['-a', '-d']) {
    const copy = join(dir, `theirs${op}.qcow2`);
    await copyFile(path, copy);
    expect((await run('qemu-img', ['snapshot', op, 'snap1', copy])).exitCode).toBe(1);
    const ours = await qcow86(['snapshot', op, 'snap1', path]);
    expect(ours.exitCode).toBe(1);
    expect(ours.stderr).toMatch(new RegExp(`snapshot 1 \\(snap1\\): ${field.source}`));
  }
  expect(await sha256(path)).toBe(before);
}

describe("a snapshot's damaged L1 fields: the image opens, check reports the entry as qemu-img does, the snapshot cannot be used", () => {
  it('l1_size over 32 MiB of entries', async () => {
    const path = await damaged('l1-size', (b) => (b[entry + 8] = 0x80));
    const ours = await expectSameCheck(path);
    expect(ours.exitCode).toBe(2);
    expect(ours.stderr).toMatch(/ERROR snapshot 1 \(snap1\) l1_size=0x80000002: L1 table is too large; snapshot table entry corrupted/);
    await expectSameActiveConvert(path);
    await expectSnapshotRefused(path, /l1_size 0x80000002 exceeds QEMU's limit/);
    expect((await qcow86(['snapshot', '-l', path])).stdout).toBe(await qemuImg(['snapshot', '-l', path]));
  });

  it('l1_table_offset not cluster aligned', async () => {
    const path = await damaged('l1-unaligned', (b) => (b[entry + 7] = b[entry + 7]! | 0x08));
    const ours = await expectSameCheck(path);
    expect(ours.stderr).toMatch(/L1 table is not cluster aligned; snapshot table entry corrupted/);
    await expectSameActiveConvert(path);
    await expectSnapshotRefused(path, /l1_table_offset 0x[0-9a-f]+ is not cluster aligned/);
  });

  it('l1_table_offset outside the file: check and convert agree; using the snapshot is refused (qemu-img reads zeros there)', async () => {
    const path = await damaged('l1-outside', (b) => (b[entry + 2] = 0x10));
    const ours = await expectSameCheck(path);
    expect(ours.stderr).toMatch(/counting reference for region exceeding the end of the file/);
    await expectSameActiveConvert(path);
    const converted = await qcow86(['convert', '-l', 'snap1', '-O', 'raw', path, join(dir, 'ours-l.raw')]);
    expect(converted.exitCode).toBe(1);
    expect(converted.stderr).toMatch(/snapshot 1 \(snap1\): L1 table \(16 bytes at l1_table_offset 0x1000000[0-9a-f]{5}\) lies outside the file/);
  });

  it('l1_table_offset at 2^63: both checks stop with an I/O error and no summary', async () => {
    const path = await damaged('l1-2-63', (b) => (b[entry] = 0x80));
    const theirs = await run('qemu-img', ['check', path]);
    const ours = await qcow86(['check', path]);
    expect(theirs.exitCode).toBe(1);
    expect(ours.exitCode).toBe(1);
    expect(ours.stdout).toBe(theirs.stdout);
    const errors = (r: RunResult) => r.stderr.split('\n').filter((l) => l.startsWith('ERROR')).sort();
    expect(errors(ours)).toEqual(errors(theirs));
    expect(errors(ours)).toContain('ERROR: I/O error in check_refcounts_l1');
    await expectSameActiveConvert(path);
  });
});

describe('version 3 snapshot entries with less than 16 bytes of extra data', () => {
  it('check reports each as incomplete (exit 2); check -r all rewrites the table as qemu-img does', async () => {
    // extra_data_size 8: vm_state_size_large only; the ID and name are then read 16 bytes early, as QEMU reads them.
    const path = await damaged('incomplete', (b) => b.writeUInt32BE(8, entry + 36));
    const ours = await expectSameCheck(path);
    expect(ours.exitCode).toBe(2);
    expect(ours.stderr).toMatch(/^ERROR snapshot table entry 0 is incomplete$/m);
    await expectSameActiveConvert(path);
    const repaired = await expectSameCheck(path, ['-r', 'all']);
    expect(repaired.exitCode).toBe(0);
    expect(repaired.stderr).toMatch(/^Repairing snapshot table entry 0 is incomplete$/m);
    expect(repaired.stdout).toMatch(/1 corruptions/);
    // The repaired file: clean for qemu-img, and the same snapshot list it would have made.
    const ourCopy = join(dir, 'ours.qcow2');
    const theirCopy = join(dir, 'theirs.qcow2');
    expect((await run('qemu-img', ['check', ourCopy])).exitCode).toBe(0);
    expect(await qemuImg(['snapshot', '-l', ourCopy])).toBe(await qemuImg(['snapshot', '-l', theirCopy]));
  });

  it('version 2 entries need no extra data: no finding', async () => {
    const v2 = join(dir, 'v2.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '1M']);
    await qemuImg(['snapshot', '-c', 's', v2]);
    const bytes = await readFile(v2);
    bytes.writeUInt32BE(0, Number(bytes.readBigUInt64BE(64)) + 36);
    await writeFile(v2, bytes);
    const ours = await expectSameCheck(v2);
    expect(ours.exitCode).toBe(0);
  });
});

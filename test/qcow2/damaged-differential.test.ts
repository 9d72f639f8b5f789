/**
 * Differential test on damaged images: QEMU-made images (v3 4k with a compressed cluster, zeros and a snapshot;
 * v2 64k with a snapshot; extended L2 32k; 512-byte clusters with 4-bit refcounts) get 1-3 bytes of their metadata
 * (header, L1, L2, refcount table and block, snapshot table) changed, and qemu-img 7.2 is the oracle:
 * - no case crashes or hangs, and `check` never modifies the image;
 * - `check` exits with qemu-img check's code and prints the same findings (stderr lines, sorted, and the summary);
 * - `convert -O raw` succeeds exactly when qemu-img convert does, with identical bytes.
 * The only differences allowed are the intended ones below, each recognised from the image bytes themselves (not
 * from our own output) and counted in the printed figures.
 *
 * The cases are seeded: QCOW86_SEED picks another sequence, QCOW86_LONG=1 runs 2000 cases instead of 100.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyFile, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImg, qemuIo, run, sha256, tempDir, type RunResult } from '../helpers/qemu.js';
import { qcow86InProcess } from '../cli/cli.js';

const long = process.env.QCOW86_LONG === '1';
const CASES = long ? 2000 : 100;
const SEED = Number(process.env.QCOW86_SEED ?? 1);
const BATCH = 25;
/** A case taking longer than this (ours, in the test process) counts as a hang. */
const CASE_TIMEOUT_MS = 20_000;

/**
 * Intended differences. Each is recognised from the damaged image's bytes, and our side must then fail with the
 * specific error named here; qemu-img's side may do anything.
 */
const INTENDED = {
  headerTable: {
    reason:
      'a header-level table (active L1, refcount table, the snapshot table or one of its entries) lies outside the file or is misaligned: ' +
      'refused on open with a FormatError naming the field (issue 3: every offset bounds-checked on open; test/qcow2/read-corrupt.test.ts), ' +
      'where qemu-img reads zeros past the end of the file and goes on. (A snapshot\'s own L1 table is judged only when that snapshot is used, as QEMU does.)',
    ours: /(l1_table_offset|refcount_table_offset|snapshots_offset) 0x[0-9a-f]+ at offset \d+: |snapshot table/,
  },
  l2PastEof: {
    reason:
      'an active L2 table lies (partly) past the end of the file: reading it is an error naming the table ' +
      '(test/qcow2/read-corrupt.test.ts), where qemu-img reads zeros past the end of the file; check still walks such a table as qemu-img does',
    ours: /L2 table at offset 0x[0-9a-f]+ is truncated/,
  },
  backingNotOpened: {
    reason:
      'the header names a backing file (a mutation gave backing_file_offset and backing_file_size values): qemu-img 7.2 check opens ' +
      'the backing chain and fails when it cannot, where our check never opens a file an image names (issue 13: inspection reaches ' +
      'nothing the image names; test/cli/trust.test.ts) and checks the image itself',
    ours: /^/,
  },
} as const;
type Intended = keyof typeof INTENDED;

interface Outcome {
  check: RunResult;
  convert: RunResult;
  rawHash: string;
}

let dir: string;
let templates: string[];
const figures = { cases: 0, agreed: 0, intended: { headerTable: 0, l2PastEof: 0, backingNotOpened: 0 } as Record<Intended, number>, disagreements: 0 };

beforeAll(async () => {
  dir = tempDir('qcow86-damaged-');
  const make = async (name: string, options: string, writes: string[]) => {
    const path = join(dir, name);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', options, path, '4M']);
    if (writes.length) await qemuIo(['-f', 'qcow2', ...writes.flatMap((w) => ['-c', w]), path]);
    return path;
  };
  templates = [
    await make('t1.qcow2', 'cluster_size=4096', ['write -P 1 0 64k', 'write -c -P 2 128k 16k', 'write -z 256k 8k', 'write -P 3 1M 4k']),
    await make('t2.qcow2', 'cluster_size=65536,compat=0.10', ['write -P 5 0 192k', 'write -P 6 2M 64k']),
    await make('t3.qcow2', 'cluster_size=32768,extended_l2=on', ['write -P 7 0 8k', 'write -P 8 40k 4k', 'write -z 100k 2k', 'write -c -P 9 256k 32k']),
    await make('t4.qcow2', 'cluster_size=512,refcount_bits=4', ['write -P 10 0 20k', 'write -P 11 1M 3k']),
  ];
  await qemuImg(['snapshot', '-c', 'snap1', templates[0]!]);
  await qemuIo(['-f', 'qcow2', '-c', 'write -P 12 8k 8k', templates[0]!]);
  await qemuImg(['snapshot', '-c', 'snap2', templates[1]!]);
});

afterAll(() => {
  console.log(
    `damaged images, seed ${SEED}: ${figures.cases} cases, ${figures.agreed} agree with qemu-img, intended differences: ` +
      `${figures.intended.headerTable} header-level table refused on open, ${figures.intended.l2PastEof} L2 table past EOF refused on read, ` +
      `${figures.intended.backingNotOpened} backing file not opened by check; ` +
      `${figures.disagreements} disagreements`,
  );
});

/**
 * mulberry32: a 32-bit state stepped by a Weyl sequence and mixed, period 2^32 (the LCG used before repeated its
 * cases after about 1040 draws). The seed picks the sequence: same seed, same cases.
 */
function random(seed: number): (n: number) => number {
  let state = seed >>> 0;
  return (n) => {
    state = (state + 0x6d2b79f5) >>> 0;
    let mixed = Math.imul(state ^ (state >>> 15), state | 1);
    mixed ^= mixed + Math.imul(mixed ^ (mixed >>> 7), mixed | 61);
    return Math.floor((((mixed ^ (mixed >>> 14)) >>> 0) / 2 ** 32) * n);
  };
}

const be64 = (b: Buffer, at: number) => Number(b.readBigUInt64BE(at));

/** Byte ranges holding metadata: header, L1, the start of the refcount table and first block, snapshots, L2 tables. */
function metadataRegions(bytes: Buffer): [number, number][] {
  const regions: [number, number][] = [];
  const version = bytes.readUInt32BE(4);
  regions.push([0, (version >= 3 ? bytes.readUInt32BE(100) : 72) + 64]);
  const clusterBits = bytes.readUInt32BE(20);
  const l1Size = bytes.readUInt32BE(36);
  const l1 = be64(bytes, 40);
  regions.push([l1, l1Size * 8]);
  const refTable = be64(bytes, 48);
  regions.push([refTable, 64]);
  const firstBlock = be64(bytes, refTable);
  if (firstBlock) regions.push([firstBlock, 256]);
  if (bytes.readUInt32BE(60)) regions.push([be64(bytes, 64), 200]);
  for (let i = 0; i < l1Size; i++) {
    const l2 = Number(bytes.readBigUInt64BE(l1 + 8 * i) & 0x00fffffffffffe00n);
    if (l2 && l2 < bytes.length) regions.push([l2, Math.min(2 ** clusterBits, 512)]);
  }
  return regions.filter(([at, length]) => at + length <= bytes.length);
}

interface Case {
  index: number;
  template: number;
  bytes: Buffer;
  mutations: string;
}

/** Every case of the run, generated up front so that each batch is the same whatever runs before it. */
async function makeCases(): Promise<Case[]> {
  const pick = random(SEED);
  const originals = await Promise.all(templates.map((t) => readFile(t)));
  const cases: Case[] = [];
  for (let index = 0; index < CASES; index++) {
    const template = pick(templates.length);
    const bytes = Buffer.from(originals[template]!);
    const regions = metadataRegions(bytes);
    const mutations: string[] = [];
    for (let m = 1 + pick(3); m > 0; m--) {
      const [at, length] = regions[pick(regions.length)]!;
      const where = at + pick(length);
      const kind = pick(3);
      const old = bytes[where]!;
      if (kind === 0) bytes[where] = old ^ (1 << pick(8));
      else if (kind === 1) bytes[where] = pick(256);
      else bytes[where] = [0, 0xff, 0x80, 0x01][pick(4)]!;
      mutations.push(`@${where}:${old}->${bytes[where]}`);
    }
    cases.push({ index, template: template + 1, bytes, mutations: mutations.join(' ') });
  }
  return cases;
}

/** Header-level tables (and snapshot table entries) outside the file or misaligned, read straight from the bytes. */
/** The header records a backing file name (offset and size both non-zero). */
function namesBackingFile(bytes: Buffer): boolean {
  return bytes.readBigUInt64BE(8) !== 0n && bytes.readUInt32BE(16) !== 0;
}

function headerTableOutside(bytes: Buffer): boolean {
  const size = BigInt(bytes.length);
  const clusterBits = bytes.readUInt32BE(20);
  // A cluster size QEMU refuses (outside 512 B .. 2 MiB) fails both opens first: no table is judged.
  if (clusterBits < 9 || clusterBits > 21) return false;
  const cs = 2n ** BigInt(clusterBits);
  const bad = (offset: bigint, length: bigint) => (length > 0n || offset !== 0n) && (offset % cs !== 0n || offset + length > size);
  if (bad(bytes.readBigUInt64BE(40), BigInt(bytes.readUInt32BE(36)) * 8n)) return true;
  if (bad(bytes.readBigUInt64BE(48), BigInt(bytes.readUInt32BE(56)) * cs)) return true;
  const nbSnapshots = bytes.readUInt32BE(60);
  const snapshots = bytes.readBigUInt64BE(64);
  if (bad(snapshots, BigInt(nbSnapshots) * 40n)) return true;
  let at = Number(snapshots);
  for (let i = 0; i < nbSnapshots; i++) {
    if (at + 40 > bytes.length) return true;
    const length = 40 + bytes.readUInt32BE(at + 36) + bytes.readUInt16BE(at + 12) + bytes.readUInt16BE(at + 14);
    at += Math.ceil(length / 8) * 8;
    if (at > bytes.length) return true;
  }
  return false;
}

/** An active L1 entry covering the virtual disk names an L2 table that does not lie wholly inside the file. */
function activeL2PastEof(bytes: Buffer): boolean {
  const clusterBits = bytes.readUInt32BE(20);
  const extendedL2 = bytes.readUInt32BE(4) >= 3 && (bytes.readBigUInt64BE(72) & 16n) !== 0n;
  const perL2 = 2 ** clusterBits / (extendedL2 ? 16 : 8);
  const used = Math.ceil(be64(bytes, 24) / (perL2 * 2 ** clusterBits));
  const l1 = be64(bytes, 40);
  for (let i = 0; i < Math.min(used, bytes.readUInt32BE(36)); i++) {
    if (l1 + 8 * i + 8 > bytes.length) return false;
    const l2 = Number(bytes.readBigUInt64BE(l1 + 8 * i) & 0x00fffffffffffe00n);
    if (l2 !== 0 && l2 + 2 ** clusterBits > bytes.length) return true;
  }
  return false;
}

function withTimeout<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${CASE_TIMEOUT_MS / 1000} s`)), CASE_TIMEOUT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function theirs(image: string, raw: string): Promise<Outcome> {
  const check = await run('qemu-img', ['check', image]);
  const convert = await run('qemu-img', ['convert', '-O', 'raw', image, raw]);
  return { check, convert, rawHash: convert.exitCode === 0 ? await sha256(raw) : '' };
}

async function ours(image: string, raw: string): Promise<Outcome> {
  const check = await withTimeout(qcow86InProcess(['check', image]), 'check');
  const convert = await withTimeout(qcow86InProcess(['convert', '-O', 'raw', image, raw]), 'convert');
  return { check, convert, rawHash: convert.exitCode === 0 ? await sha256(raw) : '' };
}

/** What check printed, less the tool's own error line: findings sorted (their order is not part of the contract), then the summary. */
function findings(result: RunResult, tool: RegExp): string {
  const lines = result.stderr.split('\n').filter((line) => line !== '' && !tool.test(line));
  return [...lines.sort(), '--', result.stdout.trim()].join('\n');
}

/** Compares one case; returns the disagreements (empty when qemu-img and we agree, or differ only as intended). */
async function compare(c: Case): Promise<string[]> {
  const image = join(dir, `m${c.index}.qcow2`);
  const mine = join(dir, `o${c.index}.qcow2`);
  await writeFile(image, c.bytes);
  await copyFile(image, mine);
  const pristine = await sha256(image);
  // qemu-img runs in its child processes while ours runs here.
  const [q, o] = await Promise.all([theirs(image, join(dir, 'q.raw')), ours(mine, join(dir, 'o.raw')).catch((error: Error) => error)]);
  if (o instanceof Error) return [`case ${c.index} (t${c.template} ${c.mutations}): crash or hang: ${o.stack ?? String(o)}`];
  const problems: string[] = [];
  const stack = /\n\s+at |TypeError|RangeError|ReferenceError|Maximum call stack/;
  if (stack.test(o.check.stderr) || stack.test(o.convert.stderr)) problems.push(`crash: ${o.check.stderr}${o.convert.stderr}`);
  if ((await sha256(mine)) !== pristine) problems.push('our check or convert modified the image');

  const intended: Intended[] = [];
  if (headerTableOutside(c.bytes) && o.check.exitCode === 1 && INTENDED.headerTable.ours.test(o.check.stderr)) {
    intended.push('headerTable');
    // Refused on open: convert must refuse it the same way (qemu-img may convert it).
    if (o.convert.exitCode !== 1 || !INTENDED.headerTable.ours.test(o.convert.stderr)) problems.push(`convert should refuse like check: ${o.convert.stderr}`);
  } else if (namesBackingFile(c.bytes) && q.check.exitCode === 1 && /Could not open backing file/.test(q.check.stderr) && q.check.stdout === '') {
    intended.push('backingNotOpened');
    // Convert opens the chain on both sides: both must refuse it.
    if (o.convert.exitCode !== 1 || q.convert.exitCode !== 1) problems.push(`convert exit code ${o.convert.exitCode} (${o.convert.stderr.trim()}), qemu-img ${q.convert.exitCode}`);
  } else {
    // When neither could check the image (both refused to open it, or the check failed before a summary, e.g. on
    // a snapshot's L1 table at 2^63) there are no findings to compare; convert is compared either way.
    const neitherChecked = o.check.exitCode === 1 && q.check.exitCode === 1 && o.check.stdout === '' && q.check.stdout === '';
    if (!neitherChecked) {
      if (o.check.exitCode !== q.check.exitCode) problems.push(`check exit code ${o.check.exitCode}, qemu-img ${q.check.exitCode}`);
      const theirFindings = findings(q.check, /^qemu-img: /);
      const ourFindings = findings(o.check, /^qcow86 check: /);
      if (theirFindings !== ourFindings) problems.push(`check output differs:\n${lineDiff(theirFindings, ourFindings)}`);
    }
    const bothConverted = q.convert.exitCode === 0 && o.convert.exitCode === 0;
    if (bothConverted && q.rawHash !== o.rawHash) problems.push('convert: different bytes');
    if (q.convert.exitCode === 0 && o.convert.exitCode !== 0 && activeL2PastEof(c.bytes) && INTENDED.l2PastEof.ours.test(o.convert.stderr)) {
      intended.push('l2PastEof');
    } else if ((q.convert.exitCode === 0) !== (o.convert.exitCode === 0)) {
      problems.push(`convert exit code ${o.convert.exitCode} (${o.convert.stderr.trim()}), qemu-img ${q.convert.exitCode} (${q.convert.stderr.trim()})`);
    }
  }
  figures.cases++;
  if (problems.length) figures.disagreements++;
  else if (intended.length) for (const kind of intended) figures.intended[kind]++;
  else figures.agreed++;
  await rm(image);
  await rm(mine);
  return problems.map((p) => `case ${c.index} (t${c.template} ${c.mutations}): ${p}`);
}

/** Lines only one side printed, a few of each. */
function lineDiff(theirs: string, ours: string): string {
  const a = theirs.split('\n');
  const b = ours.split('\n');
  const onlyTheirs = a.filter((line) => !b.includes(line)).slice(0, 6);
  const onlyOurs = b.filter((line) => !a.includes(line)).slice(0, 6);
  return [...onlyTheirs.map((l) => `  qemu-img: ${l}`), ...onlyOurs.map((l) => `  qcow86:   ${l}`)].join('\n') || '  (same lines, different counts)';
}

describe(`damaged QEMU-made images (seed ${SEED}, ${CASES} cases): check and convert agree with qemu-img`, () => {
  let cases: Case[];
  beforeAll(async () => {
    cases = await makeCases();
  });
  for (let from = 0; from < CASES; from += BATCH) {
    const to = Math.min(CASES, from + BATCH);
    it(`cases ${from}..${to - 1}`, { timeout: 600_000 }, async () => {
      const problems: string[] = [];
      for (const c of cases.slice(from, to)) problems.push(...(await compare(c)));
      expect(problems, problems.join('\n\n')).toEqual([]);
    });
  }
});

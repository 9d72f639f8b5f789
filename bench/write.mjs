#!/usr/bin/env node
// Write path: sequential 1 MiB writes and random 4 KiB writes into a fresh overlay (with a backing file), ours vs
// `qemu-img bench -w` on the same kind of image in the same run. Best of three per side: the machines are shared.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openImage } from '../dist/qcow2/open.js';
import { FileStore, nodeResolver } from '../dist/io/node.js';

const dir = mkdtempSync(join(tmpdir(), 'qcow86-bench-write-'));
const base = join(dir, 'base.qcow2');
const overlay = join(dir, 'overlay.qcow2');
execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '4G']);
const fresh = () => execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay]);

/** The offsets qemu-img bench uses: start at 0, advance by `step`, wrap at the image size. */
function offsets(count, size, step) {
  const out = [];
  let at = 0;
  for (let i = 0; i < count; i++) {
    out.push(at);
    at += step;
    if (at + size > 4 * 2 ** 30) at = 0;
  }
  return out;
}

async function ours(count, size, step) {
  fresh();
  const image = await openImage(await FileStore.open(overlay, { readOnly: false }), { readOnly: false, resolver: nodeResolver() });
  const buffer = new Uint8Array(size).fill(0xa5);
  const start = process.hrtime.bigint();
  for (const offset of offsets(count, size, step)) await image.write(offset, buffer);
  await image.flush();
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  await image.close();
  return seconds;
}

function qemu(count, size, step) {
  fresh();
  const start = process.hrtime.bigint();
  execFileSync('qemu-img', ['bench', '-w', '-t', 'writeback', '-c', String(count), '-s', String(size), '-S', String(step), overlay]);
  return Number(process.hrtime.bigint() - start) / 1e9;
}

const cases = [
  { name: 'sequential 1 MiB', count: 512, size: 2 ** 20, step: 2 ** 20 },
  { name: 'random-ish 4 KiB', count: 8000, size: 4096, step: 4096 * 7919 },
];
console.log('| case | ours MB/s | ours ops/s | qemu-img MB/s | qemu-img ops/s | ratio (target >= 0.7) |');
console.log('| --- | --- | --- | --- | --- | --- |');
for (const c of cases) {
  let a = Infinity;
  let b = Infinity;
  for (let i = 0; i < 3; i++) {
    a = Math.min(a, await ours(c.count, c.size, c.step));
    b = Math.min(b, qemu(c.count, c.size, c.step));
  }
  const mb = (s) => ((c.count * c.size) / 2 ** 20 / s).toFixed(1);
  const ops = (s) => (c.count / s).toFixed(0);
  console.log(`| ${c.name} | ${mb(a)} | ${ops(a)} | ${mb(b)} | ${ops(b)} | ${(b / a).toFixed(2)} |`);
}
rmSync(dir, { recursive: true, force: true });

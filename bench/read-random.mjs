#!/usr/bin/env node
// Random 4 KiB reads over a 1 GiB sparse qcow2 (64 MiB of data scattered over it): ops/s of our engine
// in-process vs `qemu-img bench` (read mode, 4 KiB requests, stepping through the disk). Needs `npm run build`.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const root = resolve(import.meta.dirname, '..');
const { FileStore, nodeResolver, nodeCodecs } = await import(pathToFileURL(join(root, 'dist/io/node.js')).href);
const { openImage } = await import(pathToFileURL(join(root, 'dist/qcow2/open.js')).href);
const dir = mkdtempSync(join(tmpdir(), 'qcow86-bench-read-'));
const image = join(dir, 'sparse.qcow2');
const GiB = 1024 ** 3;
execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '1G']);
const writes = [];
for (let i = 0; i < 64; i++) writes.push('-c', `write -P ${i + 1} ${i * 16}M 1M`);
execFileSync('qemu-io', [...writes, image]);

const COUNT = 50_000;
const start = process.hrtime.bigint();
execFileSync('qemu-img', ['bench', '-c', String(COUNT), '-s', '4k', '-S', String(20 * 4096 + 4096), '-d', '16', image]);
const theirs = COUNT / (Number(process.hrtime.bigint() - start) / 1e9);

const device = await openImage(await FileStore.open(image), { resolver: nodeResolver(), codecs: nodeCodecs() });
let seed = 12345;
const next = () => ((seed = (seed * 1103515245 + 12345) >>> 0) % (GiB / 4096)) * 4096;
const t0 = process.hrtime.bigint();
let done = 0;
// 16 requests in flight, like qemu-img bench -d 16.
await Promise.all(
  Array.from({ length: 16 }, async () => {
    while (done < COUNT) {
      done++;
      await device.read(next(), 4096);
    }
  }),
);
const ours = COUNT / (Number(process.hrtime.bigint() - t0) / 1e9);
await device.close();
console.table([{ workload: '4 KiB reads, 1 GiB sparse qcow2, 16 in flight', 'qemu-img bench ops/s': theirs.toFixed(0), 'qcow86 ops/s': ours.toFixed(0), 'ratio (ours/qemu)': (ours / theirs).toFixed(2), target: '>= 0.5' }]);
rmSync(dir, { recursive: true, force: true });

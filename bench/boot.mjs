#!/usr/bin/env node
// Boot benchmark: time to the shell prompt and guest-visible disk throughput (dd inside the guest), our disk
// adapter on the compressed qcow2 base + an in-memory overlay vs v86's own disk on the same disk as a raw
// in-memory buffer, alternating in the same run. Rounds: QCOW86_BENCH_ROUNDS (default 3). Never fails on speed.
// Runs on dist/ (`npm run bench` builds first).
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const { ensureImages } = await import(join(root, 'images/build.mjs'));
const { Machine } = await import(join(root, 'dist/v86/machine.js'));
const { loadMachineAssets } = await import(join(root, 'dist/node/machine-assets.js'));
const { openBootDisk } = await import(join(root, 'dist/node/boot-disk.js'));
const { RawImage } = await import(join(root, 'dist/qcow2/raw.js'));
const { MemoryStore } = await import(join(root, 'dist/io/memory.js'));

const ROUNDS = Number(process.env.QCOW86_BENCH_ROUNDS ?? 3);
const BOOT_TIMEOUT = 600_000;

await ensureImages();
const assets = await loadMachineAssets();
const rawPath = join(root, '.cache/images/disk.raw');
if (!existsSync(rawPath)) execFileSync('qemu-img', ['convert', '-O', 'raw', join(root, 'public/images/base.qcow2'), rawPath]);
const rawBytes = readFileSync(rawPath);

/** Runs a guest command between markers; returns host wall seconds and its output. */
async function timed(machine, command) {
  const tag = `b${Math.random().toString(36).slice(2, 7)}`;
  const began = performance.now();
  const { match } = await machine
    .send(`echo ${tag}-$((1+1)); ${command}; echo ${tag}-$((2+1))\n`)
    .expect(new RegExp(`${tag}-2\\n([\\s\\S]*?)${tag}-3\\n`), { timeout: 300_000 });
  return { seconds: (performance.now() - began) / 1000, output: match[1] };
}

async function once(kind) {
  let machine;
  if (kind === 'qcow2') {
    const disk = await openBootDisk({});
    machine = new Machine({ disk: disk.device, ...assets });
  } else {
    // A private copy per boot: v86 writes into the buffer it is given.
    const copy = rawBytes.buffer.slice(rawBytes.byteOffset, rawBytes.byteOffset + rawBytes.byteLength);
    const idle = await RawImage.open(new MemoryStore('idle', new Uint8Array(512)));
    machine = new Machine({ disk: idle, referenceDisk: { buffer: copy }, ...assets });
  }
  const began = performance.now();
  await machine.expect('# ', { timeout: BOOT_TIMEOUT });
  const boot = (performance.now() - began) / 1000;
  // 8 MiB written and fsynced into a file; then the FAT partition (12 MiB of base data) read back from the
  // device with the page cache dropped, so both go through the disk.
  const write = await timed(machine, 'dd if=/dev/zero of=/root/dd.bin bs=1M count=8 conv=fsync 2>/dev/null');
  const read = await timed(machine, 'echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/sda1 of=/dev/null bs=1M 2>/dev/null');
  const stats = kind === 'qcow2' ? machine.disk.stats : undefined;
  await machine.close();
  return { boot, writeMiBs: 8 / write.seconds, readMiBs: 12 / read.seconds, stats };
}

const results = { qcow2: [], raw: [] };
for (let round = 1; round <= ROUNDS; round++) {
  for (const kind of round % 2 ? ['qcow2', 'raw'] : ['raw', 'qcow2']) {
    const r = await once(kind);
    results[kind].push(r);
    console.log(`round ${round} ${kind.padEnd(5)} boot ${r.boot.toFixed(1)} s, write ${r.writeMiBs.toFixed(2)} MiB/s, read ${r.readMiBs.toFixed(2)} MiB/s` +
      (r.stats ? ` (${r.stats.reads} reads, ${(r.stats.readBytes / 1048576).toFixed(1)} MiB, ${r.stats.writes} writes, ${r.stats.cacheHits} hits, store wait ${(r.stats.storeWaitMs / 1000).toFixed(2)} s)` : ''));
  }
}

const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
};
const row = (label, key, unit, better) => {
  const ours = median(results.qcow2.map((r) => r[key]));
  const raw = median(results.raw.map((r) => r[key]));
  return { metric: label, 'qcow2 adapter': `${ours.toFixed(2)} ${unit}`, 'v86 raw buffer': `${raw.toFixed(2)} ${unit}`, ratio: (better === 'lower' ? ours / raw : raw / ours).toFixed(3) };
};
console.log(`\nmedians over ${ROUNDS} rounds (ratio: ours relative to the raw buffer, > 1 means slower; target <= 1.05)`);
console.table([
  row('time to shell prompt', 'boot', 's', 'lower'),
  row('guest dd write 8 MiB + fsync', 'writeMiBs', 'MiB/s', 'higher'),
  row('guest dd read 12 MiB (sda1)', 'readMiBs', 'MiB/s', 'higher'),
]);

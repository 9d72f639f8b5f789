#!/usr/bin/env node
// Boot and disk benchmark, in Node: the default guest booted on each way of attaching its disk, alternating in the
// same run, each on the compressed qcow2 base with a qcow2 overlay in a temporary file (fdatasync included):
//   virtio      our virtio-blk device, our disk adapter (write-back cache, FLUSH to the overlay)
//   ide-cache   v86's IDE, our adapter, the drive reporting a write cache and FLUSH CACHE routed to the overlay
//   ide-durable v86's IDE, our adapter acknowledging each write only once durable (no cache to report)
//   ide-raw     v86's IDE on its own buffer disk (the raw image in memory: no overlay, no durability) - the peer
// Figures: time to the shell prompt; guest dd sequential write with fsync (8 MiB) and read (the disk's first
// 24 MiB, page cache dropped), MiB/s, and the same with O_DIRECT (the device path without the page cache); flush latency (a guest `time sync` right after writing 1 MiB); overlay
// bytes reclaimed by `fstrim -v /` after deleting an 8 MiB file (qemu-img map of the overlay). The two IDE
// options are the choice for IDE flushes: measured here side by side.
// Rounds: QCOW86_BENCH_ROUNDS (default 3). Never fails on speed. Runs on dist/ (`npm run bench` builds first).
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
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
const KINDS = ['virtio', 'ide-cache', 'ide-durable', 'ide-raw'];
const MiB = 1024 * 1024;

await ensureImages();
const assets = await loadMachineAssets();
const rawPath = join(root, '.cache/images/disk.raw');
if (!existsSync(rawPath)) execFileSync('qemu-img', ['convert', '-O', 'raw', join(root, 'public/images/base.qcow2'), rawPath]);
const rawBytes = readFileSync(rawPath);
const work = mkdtempSync(join(tmpdir(), 'qcow86-bench-boot-'));

/** Runs a guest command between markers; returns host wall seconds and its output. */
async function timed(machine, command) {
  const tag = `b${Math.random().toString(36).slice(2, 7)}`;
  const began = performance.now();
  const { match } = await machine
    .send(`echo ${tag}-$((1+1)); ${command}; echo ${tag}-$((2+1))\n`)
    .expect(new RegExp(`${tag}-2\\n([\\s\\S]*?)${tag}-3\\n`), { timeout: 300_000 });
  return { seconds: (performance.now() - began) / 1000, output: match[1] };
}

/** busybox time's "real 0m 0.12s", in seconds. */
function guestSeconds(output) {
  const match = /real\s+(\d+)m\s*([\d.]+)s/.exec(output);
  if (!match) throw new Error(`no 'time' output in: ${output}`);
  return Number(match[1]) * 60 + Number(match[2]);
}

/** The overlay's own data clusters (qemu-img map, depth 0), in bytes. */
function overlayData(path) {
  const map = JSON.parse(execFileSync('qemu-img', ['map', '-U', '--output=json', path]).toString());
  return map.filter((e) => e.depth === 0 && e.data).reduce((sum, e) => sum + e.length, 0);
}

async function once(kind, round) {
  let machine;
  const overlay = join(work, `${kind}-${round}.qcow2`);
  if (kind === 'ide-raw') {
    // A private copy per boot: v86 writes into the buffer it is given.
    const copy = rawBytes.buffer.slice(rawBytes.byteOffset, rawBytes.byteOffset + rawBytes.byteLength);
    const idle = await RawImage.open(new MemoryStore('idle', new Uint8Array(512)));
    machine = new Machine({ disk: idle, referenceDisk: { buffer: copy }, diskBus: 'ide', ...assets });
  } else {
    const disk = await openBootDisk({ overlay });
    const diskBus = kind === 'virtio' ? 'virtio' : 'ide';
    machine = new Machine({ disk: disk.device, diskBus, diskOptions: { writeThrough: kind === 'ide-durable' }, ...assets });
  }
  const began = performance.now();
  await machine.expect('# ', { timeout: BOOT_TIMEOUT });
  const boot = (performance.now() - began) / 1000;
  const dev = kind === 'virtio' ? 'vda' : 'sda';
  // Each timed by the guest's own clock (busybox time; its report goes to stderr, so nothing is redirected), so
  // the console round trip is not in the figures.
  // Through the page cache, as programs write and read: 8 MiB written and fsynced into a file; the disk's first
  // 24 MiB (the boot partition and most of the root, base data) read with the page cache dropped first.
  const seconds = async (command) => guestSeconds((await timed(machine, `time ${command}`)).output);
  const write = await seconds('dd if=/dev/zero of=/root/dd.bin bs=1M count=8 conv=fsync');
  await timed(machine, 'echo 3 > /proc/sys/vm/drop_caches');
  const read = await seconds(`dd if=/dev/${dev} of=/dev/null bs=1M count=24`);
  // The device path alone (O_DIRECT: no page cache), the same sizes.
  const directWrite = await seconds('dd if=/dev/zero of=/root/direct.bin bs=1M count=8 oflag=direct');
  const directRead = await seconds(`dd if=/dev/${dev} of=/dev/null bs=1M count=24 iflag=direct`);
  await timed(machine, 'rm /root/dd.bin /root/direct.bin; sync');
  // Flush latency: the guest's own clock around a sync right after a 1 MiB write (busybox time).
  const flush = [];
  for (let i = 0; i < 3; i++) flush.push(guestSeconds((await timed(machine, `dd if=/dev/urandom of=/root/f${i} bs=1M count=1 2>/dev/null; time sync`)).output));
  const flushMs = median(flush) * 1000;
  let reclaimed;
  if (kind !== 'ide-raw') {
    // Files deleted earlier are trimmed first, so the figure is what deleting the 8 MiB file gives back.
    await timed(machine, 'rm -f /root/f0 /root/f1 /root/f2; sync; fstrim / 2>/dev/null; sync');
    await timed(machine, 'dd if=/dev/urandom of=/root/eight.bin bs=1M count=8 2>/dev/null; sync');
    const before = overlayData(overlay);
    await timed(machine, 'rm /root/eight.bin; sync; fstrim / 2>/dev/null; sync');
    reclaimed = before - overlayData(overlay);
  }
  const stats = kind === 'ide-raw' ? undefined : machine.disk.stats;
  await machine.close();
  rmSync(overlay, { force: true });
  return { boot, writeMiBs: 8 / write, readMiBs: 24 / read, directWriteMiBs: 8 / directWrite, directReadMiBs: 24 / directRead, flushMs, reclaimed, stats };
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

const results = Object.fromEntries(KINDS.map((k) => [k, []]));
try {
  for (let round = 1; round <= ROUNDS; round++) {
    // Rotate the order: the load of a shared machine drifts, and should not favour one kind.
    const order = KINDS.map((_, i) => KINDS[(i + round - 1) % KINDS.length]);
    for (const kind of order) {
      const r = await once(kind, round);
      results[kind].push(r);
      console.log(`round ${round} ${kind.padEnd(11)} boot ${r.boot.toFixed(1)} s, write ${r.writeMiBs.toFixed(2)} MiB/s, read ${r.readMiBs.toFixed(2)} MiB/s, O_DIRECT write ${r.directWriteMiBs.toFixed(2)} MiB/s, read ${r.directReadMiBs.toFixed(2)} MiB/s, sync after 1 MiB ${r.flushMs.toFixed(0)} ms` +
        (r.reclaimed !== undefined ? `, fstrim reclaimed ${(r.reclaimed / MiB).toFixed(2)} MiB` : '') +
        (r.stats ? ` (${r.stats.reads} reads, ${r.stats.writes} writes, ${r.stats.guestFlushes} guest flushes, ${r.stats.discards} discards, store wait ${(r.stats.storeWaitMs / 1000).toFixed(2)} s)` : ''));
    }
  }
} finally {
  rmSync(work, { recursive: true, force: true });
}

const m = (kind, key) => median(results[kind].map((r) => r[key]));
const fmt = (value, unit, digits = 2) => (value === undefined ? 'n/a' : `${value.toFixed(digits)} ${unit}`);
console.log(`\nmedians over ${ROUNDS} rounds (qcow2 overlay in a temporary file; ide-raw: v86's raw buffer in memory)`);
console.log('| metric | virtio | IDE, write cache + FLUSH CACHE | IDE, durable acks | IDE, v86 raw buffer | virtio / IDE (cache) | target |');
console.log('| --- | ---: | ---: | ---: | ---: | ---: | --- |');
const line = (label, key, unit, target, digits = 2) => {
  const v = Object.fromEntries(KINDS.map((k) => [k, results[k].some((r) => r[key] !== undefined) ? m(k, key) : undefined]));
  const ratio = v.virtio !== undefined && v['ide-cache'] ? (v.virtio / v['ide-cache']).toFixed(2) : 'n/a';
  console.log(`| ${label} | ${fmt(v.virtio, unit, digits)} | ${fmt(v['ide-cache'], unit, digits)} | ${fmt(v['ide-durable'], unit, digits)} | ${fmt(v['ide-raw'], unit, digits)} | ${ratio} | ${target} |`);
};
line('time to shell prompt', 'boot', 's', 'virtio <= 1.0x IDE', 1);
line('guest dd write 8 MiB + fsync', 'writeMiBs', 'MiB/s', 'virtio >= 2x IDE');
line('guest dd read 24 MiB (page cache dropped)', 'readMiBs', 'MiB/s', 'virtio >= 2x IDE');
line('guest dd write 8 MiB, O_DIRECT', 'directWriteMiBs', 'MiB/s', '-');
line('guest dd read 24 MiB, O_DIRECT', 'directReadMiBs', 'MiB/s', '-');
line('flush latency: guest sync after 1 MiB (Node)', 'flushMs', 'ms', 'lower is better', 0);
const reclaimed = Object.fromEntries(KINDS.map((k) => [k, results[k].some((r) => r.reclaimed !== undefined) ? m(k, 'reclaimed') / MiB : undefined]));
console.log(`| overlay bytes reclaimed by fstrim after deleting 8 MiB | ${fmt(reclaimed.virtio, 'MiB')} | ${fmt(reclaimed['ide-cache'], 'MiB')} | ${fmt(reclaimed['ide-durable'], 'MiB')} | n/a | - | >= 6 MiB |`);

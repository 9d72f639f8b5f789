#!/usr/bin/env node
// Session benchmark (issue 8): a 128 MiB guest running a counter is saved as a session in a qcow2 overlay and
// resumed in a new machine. Reports save time (guest paused), resume time, and the session's VM state in the
// file against v86's own save_state() blob, raw and compressed by zstd and deflate in this run. Target: the
// stored VM state is no larger than a zstd or deflate compression of v86's blob. Rounds: QCOW86_BENCH_ROUNDS
// (default 3). Never fails on speed. Runs on dist/ (`npm run bench` builds first).
import { deflateRawSync, gzipSync } from 'node:zlib';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const { ensureImages } = await import(join(root, 'images/build.mjs'));
const { Machine } = await import(join(root, 'dist/v86/machine.js'));
const { loadMachineAssets } = await import(join(root, 'dist/node/machine-assets.js'));
const { openBootDisk } = await import(join(root, 'dist/node/boot-disk.js'));
const { nodeCodecs } = await import(join(root, 'dist/io/node-codecs.js'));
const { saveSession, resumeSession, loadSession, trackGuestClock } = await import(join(root, 'dist/v86/session.js'));

const ROUNDS = Number(process.env.QCOW86_BENCH_ROUNDS ?? 3);
const MEMORY = 128 * 1024 * 1024;
const COUNTER = 'i=0; while true; do i=$((i+1)); echo $i > /c; echo C=$i; sleep 1; done &\n';

await ensureImages();
const assets = await loadMachineAssets();
const codecs = nodeCodecs();
const dir = mkdtempSync(join(tmpdir(), 'qcow86-bench-session-'));
const overlay = join(dir, 'session.qcow2');
const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
};
const mib = (n) => `${(n / 1048576).toFixed(2)} MiB`;
const timed = async (f) => {
  const began = performance.now();
  const value = await f();
  return { value, ms: performance.now() - began };
};

try {
  let disk = await openBootDisk({ overlay });
  let machine = new Machine({ disk: disk.device, ...assets, memoryBytes: MEMORY, timeout: 120_000 });
  trackGuestClock(machine);
  await machine.expect('# ', { timeout: 600_000 });
  await machine.send(COUNTER).expect('C=3\n');

  // v86's own blob, taken the way a session takes it (machine stopped, disk settled).
  const emulator = machine.emulator;
  await emulator.stop();
  await machine.disk.settle();
  const blobTaken = await timed(async () => new Uint8Array(await emulator.save_state()));
  const blob = blobTaken.value;
  await emulator.run();

  const saves = [];
  let saved;
  for (let round = 1; round <= ROUNDS; round++) {
    await machine.expect(/C=\d+\n/);
    const r = await timed(() => saveSession(machine, disk.device, 'bench', codecs, { replace: true }));
    saved = r.value;
    saves.push(saved.pausedMs);
    console.log(`save ${round}: guest paused ${saved.pausedMs.toFixed(0)} ms, v86 state ${mib(saved.rawBytes)} raw, ${mib(saved.vmStateSize)} stored (${saved.format})`);
  }
  const savedAt = Number((await machine.expect(/C=(\d+)\n/)).match[1]);
  await machine.close();

  const resumes = [];
  for (let round = 1; round <= ROUNDS; round++) {
    disk = await openBootDisk({ overlay });
    machine = new Machine({ disk: disk.device, ...assets, memoryBytes: MEMORY, timeout: 120_000 });
    await machine.started;
    const loadMs = (await timed(() => loadSession(disk.device, 'bench', codecs))).ms;
    const r = await timed(() => resumeSession(machine, disk.device, 'bench', codecs));
    const next = await timed(() => machine.expect(/C=(\d+)\n/));
    resumes.push(r.ms);
    console.log(`resume ${round}: ${r.ms.toFixed(0)} ms (of which reading and checking the VM state ${loadMs.toFixed(0)} ms), first counter C=${next.value.match[1]} after ${next.ms.toFixed(0)} ms more (saved near C=${savedAt})`);
    await machine.close();
  }

  // Compressions of v86's blob in this run: zstd at QEMU's default level (3), 6, 9 and 19, deflate as zlib/gzip
  // default (level 6, 32 KiB window) and -9, and QEMU's qcow2 cluster deflate (4 KiB window).
  const { compress } = await import('@bokuweb/zstd-wasm').then(async (m) => (await m.init(), m));
  const peers = [];
  for (const [label, f] of [
    ['zstd -3', () => compress(blob, 3)],
    ['zstd -6', () => compress(blob, 6)],
    ['zstd -9', () => compress(blob, 9)],
    ['zstd -19', () => compress(blob, 19)],
    ['deflate -6 (gzip default)', () => gzipSync(blob)],
    ['deflate -9', () => gzipSync(blob, { level: 9 })],
    ['deflate, QEMU cluster settings (4 KiB window)', () => deflateRawSync(blob, { windowBits: 12, memLevel: 9 })],
  ]) {
    const r = await timed(async () => f());
    peers.push({ label, bytes: r.value.length, ms: r.ms });
  }
  const stored = saved.vmStateSize;
  const rows = [
    { what: "v86 save_state() blob (raw)", size: mib(blob.length), 'stored / this': (stored / blob.length).toFixed(3), time: `${blobTaken.ms.toFixed(0)} ms to take` },
    ...peers.map((p) => ({ what: p.label, size: mib(p.bytes), 'stored / this': (stored / p.bytes).toFixed(3), time: `${p.ms.toFixed(0)} ms to compress` })),
    { what: 'session VM state in the qcow2 file (ours)', size: mib(stored), 'stored / this': '1.000', time: '' },
  ];
  console.table(rows);
  const smallestPeer = Math.min(...peers.filter((p) => /^zstd -3|^deflate -6/.test(p.label)).map((p) => p.bytes));
  console.table([
    { metric: 'save: guest paused (median)', value: `${median(saves).toFixed(0)} ms` },
    { metric: 'resume: disk revert + restore_state (median)', value: `${median(resumes).toFixed(0)} ms` },
    { metric: 'stored VM state vs smaller of zstd -3 / deflate -6 of the blob', value: `${(stored / smallestPeer).toFixed(3)} (${stored <= smallestPeer ? 'target met' : 'target missed'})` },
  ]);
} finally {
  rmSync(dir, { recursive: true, force: true });
}

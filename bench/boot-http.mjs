#!/usr/bin/env node
// Boot over HTTP (issue 6): the default guest booted to its shell prompt with its base served by nginx on
// 127.0.0.1, reporting bytes transferred, requests and time (nginx's own access log counts bytes and requests)
// for:
//   ours/qcow2-c  HttpStore on the compressed base.qcow2 (what `qcow86 boot --base URL` does)
//   ours/qcow2    HttpStore on an uncompressed qcow2 of the same disk
//   ours/raw      HttpStore on the raw disk
//   naive/raw     one request per device read, no cache or readahead (bench/_http-naive.mjs), on the raw disk
// against the unique bytes the guest actually read from its disk (the physical floor, recorded per boot by a
// wrapper around the device the disk adapter reads). Each boot's overlay is a throw-away one in memory.
// Then the Debian guest (public/images/debian.qcow2, built on demand by `npm run images -- debian`), cold, to its prompt and `python3 -c 'print(1)'`: ours on debian.qcow2 and the naive
// client on its raw disk, with the fraction of the base file fetched.
// QCOW86_BENCH_GUESTS=default or =debian runs one of the two. Never fails on speed or ratios; runs on dist/
// (`npm run bench` builds first).
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openNaiveHttpStore } from './_http-naive.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const { ensureImages } = await import(join(root, 'images/build.mjs'));
const { Machine } = await import(join(root, 'dist/v86/machine.js'));
const { loadMachineAssets } = await import(join(root, 'dist/node/machine-assets.js'));
const { openBootDisk } = await import(join(root, 'dist/node/boot-disk.js'));
const { openImage } = await import(join(root, 'dist/qcow2/open.js'));
const { createQcow2 } = await import(join(root, 'dist/qcow2/create.js'));
const { MemoryStore } = await import(join(root, 'dist/io/memory.js'));

const MiB = 1024 * 1024;
const BOOT_TIMEOUT = 600_000;

await ensureImages();
const assets = await loadMachineAssets();
const dir = mkdtempSync(join(tmpdir(), 'qcow86-bench-boot-http-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));

const base = join(root, 'public/images/base.qcow2');
const rawPath = join(root, '.cache/images/disk.raw');
if (!existsSync(rawPath)) execFileSync('qemu-img', ['convert', '-O', 'raw', base, rawPath]);
symlinkSync(base, join(dir, 'base.qcow2'));
symlinkSync(rawPath, join(dir, 'disk.raw'));
execFileSync('qemu-img', ['convert', '-O', 'qcow2', base, join(dir, 'plain.qcow2')]);

// nginx-light with a tab-separated access log of this run's requests.
const port = await new Promise((resolve) => {
  const probe = createServer().listen(0, '127.0.0.1', () => {
    const { port } = probe.address();
    probe.close(() => resolve(port));
  });
});
const user = process.getuid?.() === 0 ? 'user root;' : '';
const log = join(dir, 'access.log');
writeFileSync(join(dir, 'nginx.conf'), `daemon off; ${user} worker_processes 1; pid ${dir}/nginx.pid; error_log ${dir}/error.log warn;
events { worker_connections 64; }
http { default_type application/octet-stream; gzip off; sendfile on;
  log_format bench escape=none '$status\\t$request_uri\\t$http_range\\t$body_bytes_sent'; access_log ${log} bench;
  client_body_temp_path ${dir}/b; proxy_temp_path ${dir}/p; fastcgi_temp_path ${dir}/f; scgi_temp_path ${dir}/s; uwsgi_temp_path ${dir}/u;
  server { listen 127.0.0.1:${port}; root ${dir}; location / { } } }`);
const nginx = spawn('/usr/sbin/nginx', ['-c', join(dir, 'nginx.conf'), '-p', dir, '-e', join(dir, 'error.log')], { stdio: 'inherit' });
const origin = `http://127.0.0.1:${port}`;
for (let i = 0; ; i++) {
  try {
    await (await fetch(`${origin}/disk.raw`, { method: 'HEAD' })).arrayBuffer();
    break;
  } catch (error) {
    if (i > 200) throw error;
    await new Promise((done) => setTimeout(done, 25));
  }
}
const logged = () => (existsSync(log) ? readFileSync(log, 'utf8').split('\n').filter(Boolean).map((line) => line.split('\t')) : []);

/** The device the disk adapter reads, recording which 512-byte sectors of the guest's disk were read. */
function recording(device) {
  const seen = new Uint8Array(Math.ceil(device.virtualSize / 512));
  const proxy = new Proxy(device, {
    get(target, key) {
      const mark = (offset, length) => seen.fill(1, Math.floor(offset / 512), Math.ceil(Math.min(target.virtualSize, offset + length) / 512));
      if (key === 'read') {
        return (offset, length) => {
          mark(offset, length);
          return target.read(offset, length);
        };
      }
      if (key === 'readInto' && typeof target.readInto === 'function') {
        return (offset, buffer, ...rest) => {
          mark(offset, buffer.length);
          return target.readInto(offset, buffer, ...rest);
        };
      }
      const value = target[key];
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
  return { device: proxy, unique: () => seen.reduce((sum, bit) => sum + bit, 0) * 512 };
}

/** The naive client on the raw disk, under the same kind of in-memory qcow2 overlay openBootDisk makes. */
async function naiveDisk(url) {
  const store = await openNaiveHttpStore(url);
  const overlay = new MemoryStore('memory-overlay.qcow2');
  await createQcow2(overlay, { size: await store.size(), backingFile: url, backingFormat: 'raw' });
  const resolver = { open: async () => ({ store, fullName: url, identity: url }) };
  return openImage(overlay, { readOnly: false, format: 'qcow2', resolver });
}

async function boot(label, file, client, { memoryBytes, after } = {}) {
  const url = `${origin}/${file}`;
  const before = logged().length;
  const started = performance.now();
  const device = client === 'ours' ? (await openBootDisk({ base: url })).device : await naiveDisk(url);
  const { device: watched, unique } = recording(device);
  const machine = new Machine({ disk: watched, ...assets, timeout: BOOT_TIMEOUT, ...(memoryBytes ? { memoryBytes } : {}) });
  await machine.expect('# ', { timeout: BOOT_TIMEOUT });
  if (after) await after(machine);
  const seconds = (performance.now() - started) / 1000;
  const storeWait = machine.disk.stats.storeWaitMs / 1000;
  await machine.close();
  // nginx logs a request when its response is complete: wait until the log stops growing.
  let count = -1;
  while (count !== logged().length) {
    count = logged().length;
    await new Promise((done) => setTimeout(done, 300));
  }
  const requests = logged().slice(before).filter((r) => r[1] === `/${file}`);
  const statuses = new Set(requests.map((r) => r[0]));
  const bytes = requests.reduce((sum, r) => sum + Number(r[3]), 0);
  const row = { label, requests: requests.length, bytes, seconds, storeWait, unique: unique(), statuses: [...statuses].join(',') };
  console.log(`${label.padEnd(12)} ${String(row.requests).padStart(5)} requests ${(bytes / MiB).toFixed(2).padStart(7)} MiB  unique read ${(row.unique / MiB).toFixed(2)} MiB  ${seconds.toFixed(1)} s to the prompt (store wait ${storeWait.toFixed(2)} s)  statuses ${row.statuses}`);
  return row;
}

const GUESTS = (process.env.QCOW86_BENCH_GUESTS ?? 'default,debian').split(',');
try {
  if (GUESTS.includes('default')) await defaultRows();
  if (GUESTS.includes('debian')) await debianRows((ok) => (ok ? 'met' : 'MISSED'));
} finally {
  nginx.kill('SIGQUIT');
}

/** The default guest to its prompt: ours on three forms of the base, and the naive client on the raw disk. */
async function defaultRows() {
  const rows = [
    await boot('ours/qcow2-c', 'base.qcow2', 'ours'),
    await boot('ours/qcow2', 'plain.qcow2', 'ours'),
    await boot('ours/raw', 'disk.raw', 'ours'),
    await boot('naive/raw', 'disk.raw', 'naive'),
  ];
  // The floor: the guest's distinct bytes read, the same boot in every row (the smallest, to be strict).
  const floor = Math.min(...rows.map((r) => r.unique));
  const naive = rows.at(-1);
  console.log(`\nunique bytes the guest read (floor): ${(floor / MiB).toFixed(2)} MiB (per boot: ${rows.map((r) => (r.unique / MiB).toFixed(2)).join(', ')})`);
  console.table(rows.map((r) => ({
    client: r.label,
    requests: r.requests,
    'MiB sent': (r.bytes / MiB).toFixed(2),
    'x floor': (r.bytes / floor).toFixed(3),
    'x naive requests': (r.requests / naive.requests).toFixed(3),
    's to prompt': r.seconds.toFixed(1),
  })));
  const verdict = (ok) => (ok ? 'met' : 'MISSED');
  const [compressed, plain, raw] = rows;
  console.log(`target bytes <= 1.25x floor: ours/raw ${(raw.bytes / floor).toFixed(3)}x ${verdict(raw.bytes <= 1.25 * floor)}; ours/qcow2 ${(plain.bytes / floor).toFixed(3)}x ${verdict(plain.bytes <= 1.25 * floor)}`);
  console.log(`target requests <= 1/10 of naive (${naive.requests}): ours/raw ${raw.requests} (${((raw.requests / naive.requests) * 100).toFixed(1)}%) ${verdict(raw.requests * 10 <= naive.requests)}; ours/qcow2-c ${compressed.requests} (${((compressed.requests / naive.requests) * 100).toFixed(1)}%) ${verdict(compressed.requests * 10 <= naive.requests)}`);
  console.log(`target compressed base below the floor: ${(compressed.bytes / MiB).toFixed(2)} MiB vs ${(floor / MiB).toFixed(2)} MiB (${(compressed.bytes / floor).toFixed(3)}x) ${verdict(compressed.bytes < floor)}`);
}

/** The Debian guest, cold, to its prompt and `python3 -c 'print(1)'`: ours on the qcow2 and naive on the raw disk. */
async function debianRows(verdict) {
  const { ensureDebian } = await import(join(root, 'images/debian.mjs'));
  await ensureDebian();
  const image = join(root, 'public/images/debian.qcow2');
  const raw = join(dir, 'debian.raw');
  // Sparse: the 2 GiB disk is mostly holes, and nginx serves holes as zeros.
  execFileSync('qemu-img', ['convert', '-O', 'raw', '-S', '4k', image, raw]);
  symlinkSync(image, join(dir, 'debian.qcow2'));
  const python = async (machine) => {
    await machine.send("python3 -c 'print(1)'; echo py-done-$((6*7))\n").expect('py-done-42', { timeout: BOOT_TIMEOUT });
  };
  const options = { memoryBytes: 128 * MiB, after: python };
  const rows = [await boot('debian ours/qcow2-c', 'debian.qcow2', 'ours', options), await boot('debian naive/raw', 'debian.raw', 'naive', options)];
  const [ours, naive] = rows;
  const floor = Math.min(...rows.map((r) => r.unique));
  const size = statSync(image).size;
  console.log(`\nDebian guest, cold, to the prompt and python3 -c 'print(1)' (unique bytes the guest read: ${(floor / MiB).toFixed(2)} MiB; base file ${(size / MiB).toFixed(2)} MiB)`);
  console.log('| client | requests | MiB fetched | unique MiB read | x read | fraction of the base file | s |');
  console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: |');
  for (const r of rows) {
    const fraction = r.label.includes('qcow2') ? `${((r.bytes / size) * 100).toFixed(1)}%` : '-';
    console.log(`| ${r.label} | ${r.requests} | ${(r.bytes / MiB).toFixed(2)} | ${(r.unique / MiB).toFixed(2)} | ${(r.bytes / r.unique).toFixed(3)} | ${fraction} | ${r.seconds.toFixed(1)} |`);
  }
  console.log(`target bytes <= 1.25x read: ${(ours.bytes / ours.unique).toFixed(3)}x ${verdict(ours.bytes <= 1.25 * ours.unique)}`);
  console.log(`target requests <= 40: ${ours.requests} ${verdict(ours.requests <= 40)}; <= 1/10 of naive (${naive.requests}): ${verdict(ours.requests * 10 <= naive.requests)}`);
}

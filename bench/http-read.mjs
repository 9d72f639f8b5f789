#!/usr/bin/env node
// HTTP base reads (issue 6), until the boot benchmark exists: a boot-like access pattern (a long sequential load,
// then scattered small reads) through the qcow2 engine over nginx on 127.0.0.1, with HttpStore and with a naive
// one-request-per-read client. Reports bytes transferred, requests and time against the unique bytes the engine
// actually read from the image (the physical floor). Never fails on speed.
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { HttpStore } from '../dist/io/http.js';
import { openImage } from '../dist/qcow2/index.js';
import { openNaiveHttpStore } from './_http-naive.mjs';

const MiB = 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), 'qcow86-bench-http-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));

const image = join(dir, 'base.qcow2');
execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', image, '64M']);
execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 24M', '-c', 'write -P 0x22 32M 8M', '-c', 'write -P 0x33 50M 2M', image]);

const port = await new Promise((resolve) => {
  const probe = createServer().listen(0, '127.0.0.1', () => {
    const { port } = probe.address();
    probe.close(() => resolve(port));
  });
});
const user = process.getuid?.() === 0 ? 'user root;' : '';
writeFileSync(join(dir, 'nginx.conf'), `daemon off; ${user} worker_processes 1; pid ${dir}/nginx.pid; error_log ${dir}/error.log warn;
events { worker_connections 64; }
http { default_type application/octet-stream; access_log off; gzip off;
  client_body_temp_path ${dir}/b; proxy_temp_path ${dir}/p; fastcgi_temp_path ${dir}/f; scgi_temp_path ${dir}/s; uwsgi_temp_path ${dir}/u;
  server { listen 127.0.0.1:${port}; root ${dir}; location / { } } }`);
const nginx = spawn('/usr/sbin/nginx', ['-c', join(dir, 'nginx.conf'), '-p', dir, '-e', join(dir, 'error.log')], { stdio: 'inherit' });
const url = `http://127.0.0.1:${port}/base.qcow2`;
for (let i = 0; ; i++) {
  try {
    await (await fetch(url, { method: 'HEAD' })).arrayBuffer();
    break;
  } catch (error) {
    if (i > 200) throw error;
    await new Promise((done) => setTimeout(done, 25));
  }
}

/** Wraps a store to record which bytes of the image the engine asked for. */
function recording(store, size) {
  const seen = new Uint8Array(Math.ceil(size / 512));
  return {
    store: new Proxy(store, {
      get(target, key) {
        if (key !== 'read') return typeof target[key] === 'function' ? target[key].bind(target) : target[key];
        return async (offset, length) => {
          for (let s = Math.floor(offset / 512); s < Math.ceil(Math.min(size, offset + length) / 512); s++) seen[s] = 1;
          return target.read(offset, length);
        };
      },
    }),
    unique: () => seen.reduce((sum, bit) => sum + bit, 0) * 512,
  };
}

async function run(kind) {
  const inner = kind === 'HttpStore' ? await HttpStore.open(url) : await openNaiveHttpStore(url);
  const { store, unique } = recording(inner, await inner.size());
  const disk = await openImage(store, { format: 'qcow2' });
  const started = performance.now();
  // A kernel and initrd load: 16 MiB in 64 KiB reads.
  for (let offset = 0; offset < 16 * MiB; offset += 64 * 1024) await disk.read(offset, 64 * 1024);
  // Then a root filesystem's scattered 4 KiB reads, a few in a row at a time.
  let seed = 1;
  const random = () => ((seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  for (let i = 0; i < 150; i++) {
    const at = Math.floor(random() * (disk.virtualSize / 4096 - 4)) * 4096;
    for (let j = 0; j < 1 + Math.floor(random() * 4); j++) await disk.read(at + j * 4096, 4096);
  }
  const ms = performance.now() - started;
  const stats = inner.stats();
  return { kind, bytes: stats.bytesFetched, requests: stats.requests, ms, unique: unique() };
}

try {
  // One unmeasured round first: the first fetches of a process pay for JIT and connection set-up.
  await run('HttpStore');
  await run('naive');
  const rows = [await run('HttpStore'), await run('naive')];
  const floor = rows[0].unique;
  console.log(`unique image bytes the engine read (floor): ${(floor / MiB).toFixed(2)} MiB`);
  console.log('client      MiB sent   x floor   requests   time ms');
  for (const row of rows) {
    console.log(`${row.kind.padEnd(10)} ${(row.bytes / MiB).toFixed(2).padStart(9)} ${(row.bytes / floor).toFixed(2).padStart(9)} ${String(row.requests).padStart(10)} ${row.ms.toFixed(0).padStart(9)}`);
  }
  console.log(`requests: HttpStore uses ${((rows[0].requests / rows[1].requests) * 100).toFixed(1)}% of the naive client's (target <= 10%)`);
} finally {
  nginx.kill('SIGQUIT');
}

#!/usr/bin/env node
// Browser boot benchmark: time from navigation to the guest's shell prompt in headless Chromium, for the tab
// (`vite build` output: qcow2 base by HTTP Range through our engine in a Worker, overlay in OPFS) and for v86's
// own path (a minimal page booting v86 with `hda: { url, async: true, size }`, its AsyncXHRBuffer, on the same
// disk converted to raw), both from the same nginx. Cold = a fresh browser profile (empty cache and OPFS);
// warm = a reload in the same profile (overlay and HTTP cache present). Reports bytes and requests nginx served.
// Rounds: QCOW86_BENCH_ROUNDS (default 1; each round boots four times). Never fails on speed.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const ROUNDS = Number(process.env.QCOW86_BENCH_ROUNDS ?? 1);
const BOOT_TIMEOUT = 600_000;

execFileSync(process.execPath, [join(root, 'scripts/system-deps.mjs'), 'chromium', 'nginx-light'], { stdio: 'inherit' });
execFileSync(process.execPath, [join(root, 'scripts/ensure-images.mjs')], { stdio: 'inherit' });
execFileSync(process.execPath, [join(root, 'node_modules/vite/bin/vite.js'), 'build', '--logLevel', 'error'], { cwd: root, stdio: 'inherit' });
const rawPath = join(root, '.cache/images/disk.raw');
if (!existsSync(rawPath)) execFileSync('qemu-img', ['convert', '-O', 'raw', join(root, 'public/images/base.qcow2'), rawPath]);

// One web root for both: the built app, plus v86's own build, the raw disk and the reference page beside it.
const web = mkdtempSync(join(tmpdir(), 'qcow86-bench-web-'));
const built = join(root, 'dist/web');
for (const name of readdirSync(built)) symlinkSync(join(built, name), join(web, name));
mkdirp(join(web, 'v86ref'));
symlinkSync(join(root, 'node_modules/v86/build/libv86.js'), join(web, 'v86ref/libv86.js'));
symlinkSync(join(root, 'node_modules/v86/build/v86.wasm'), join(web, 'v86ref/v86.wasm'));
symlinkSync(rawPath, join(web, 'v86ref/disk.raw'));
writeFileSync(join(web, 'v86ref/index.html'), referencePage(statSync(rawPath).size));

// The nginx test helper is TypeScript: load it through Vite's module runner rather than keeping a copy here.
const { createServer } = await import('vite');
const vite = await createServer({ configFile: false, root, logLevel: 'error', server: { middlewareMode: true, hmr: false, watch: null } });
const { startNginx } = await vite.ssrLoadModule('/test/helpers/nginx.ts');
const nginx = await startNginx(web);
const { chromium } = await import('@playwright/test');
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});

const results = [];
try {
  for (let round = 0; round < ROUNDS; round++) {
    for (const kind of ['qcow86', 'v86']) {
      const context = await browser.newContext();
      try {
        const page = await context.newPage();
        for (const when of ['cold', 'warm']) {
          const before = nginx.requests().length;
          const ms = await bootOnce(page, kind, when === 'warm');
          const requests = nginx.requests().slice(before);
          const disk = requests.filter((r) => /\/(images\/base\.qcow2|v86ref\/disk\.raw)$/.test(r.uri.split('?')[0]));
          results.push({ kind, when, ms, requests: requests.length, bytes: sum(requests), diskRequests: disk.length, diskBytes: sum(disk) });
          console.log(`  ${kind} ${when}: ${(ms / 1000).toFixed(1)} s, ${requests.length} requests, ${mib(sum(requests))}`);
        }
      } finally {
        await context.close();
      }
    }
  }
} finally {
  await browser.close();
  await nginx.close();
  await vite.close();
  rmSync(web, { recursive: true, force: true });
}

const median = (values) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];
const row = (kind, when) => {
  const runs = results.filter((r) => r.kind === kind && r.when === when);
  return { ms: median(runs.map((r) => r.ms)), ...runs[0] };
};
console.log(`\nBrowser boot to shell prompt (headless Chromium, nginx, ${ROUNDS} round(s), median)`);
console.log('| path | profile | boot s | requests (disk) | bytes (disk) |');
console.log('| --- | --- | ---: | ---: | ---: |');
for (const kind of ['qcow86', 'v86']) {
  for (const when of ['cold', 'warm']) {
    const r = row(kind, when);
    console.log(`| ${kind === 'qcow86' ? 'qcow86 tab (qcow2 base, OPFS overlay)' : "v86 AsyncXHRBuffer on raw"} | ${when} | ${(r.ms / 1000).toFixed(1)} | ${r.requests} (${r.diskRequests}) | ${mib(r.bytes)} (${mib(r.diskBytes)}) |`);
  }
}
const ours = row('qcow86', 'cold');
const theirs = row('v86', 'cold');
console.log(`\ncold boot time ours/v86: ${(ours.ms / theirs.ms).toFixed(2)} (target <= 1)`);
console.log(`cold bytes ours/v86: ${(ours.bytes / theirs.bytes).toFixed(2)} (target <= 1); disk bytes ${(ours.diskBytes / theirs.diskBytes).toFixed(2)}`);
console.log(`cold disk requests v86/ours: ${(theirs.diskRequests / Math.max(1, ours.diskRequests)).toFixed(1)}x (target >= 10x)`);

/** Navigates (or reloads) and returns the in-page time from navigation start to the shell prompt, in ms. */
async function bootOnce(page, kind, reload) {
  const url = kind === 'qcow86' ? nginx.url : `${nginx.url}v86ref/`;
  if (kind === 'qcow86' && !reload) {
    // The tab says "shell ready" once its console shows the prompt (checked every 200 ms, so up to 0.2 s late);
    // a MutationObserver stamps the moment. The init script stays registered for the warm reload.
    await page.addInitScript(() => {
      new MutationObserver(() => {
        const phase = document.getElementById('phase');
        if (phase && /shell ready/.test(phase.textContent ?? '') && window.__ready === undefined) window.__ready = performance.now();
      }).observe(document, { subtree: true, childList: true, characterData: true });
    });
  }
  if (reload) await page.reload();
  else await page.goto(url);
  await page.waitForFunction(() => window.__ready !== undefined, undefined, { timeout: BOOT_TIMEOUT, polling: 250 });
  return page.evaluate(() => window.__ready);
}

function referencePage(size) {
  return `<!doctype html><meta charset="utf-8"><title>v86 reference</title>
<script src="libv86.js"></script>
<script>
  // v86 as its own README shows it: the raw disk fetched on demand by its AsyncXHRBuffer.
  const emulator = new V86({
    wasm_path: 'v86.wasm',
    memory_size: 64 * 1024 * 1024,
    vga_memory_size: 8 * 1024 * 1024,
    bios: { url: '../images/bios.bin' },
    vga_bios: { url: '../images/vgabios-stdvga.bin' },
    hda: { url: 'disk.raw', async: true, size: ${size} },
    autostart: true,
    disable_keyboard: true,
    disable_mouse: true,
    disable_speaker: true,
  });
  let tail = '';
  emulator.add_listener('serial0-output-byte', (byte) => {
    tail = (tail + String.fromCharCode(byte)).slice(-256);
    // The same prompt test as the tab: busybox's "# " at the end of a line, its ESC[6n removed.
    if (window.__ready === undefined && /(^|\\n)[^\\n]*[#$] $/.test(tail.replace(/\\x1b\\[[0-9;?]*[A-Za-z]/g, ''))) window.__ready = performance.now();
  });
</script>`;
}

function mkdirp(path) {
  execFileSync('mkdir', ['-p', path]);
}
function sum(requests) {
  return requests.reduce((total, r) => total + r.bytes, 0);
}
function mib(bytes) {
  return `${(bytes / 1048576).toFixed(2)} MiB`;
}

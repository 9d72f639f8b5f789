#!/usr/bin/env node
// Browser boot benchmark: time from navigation to the guest's shell prompt in headless Chromium, for the tab
// (`vite build` output: qcow2 base by HTTP Range through our engine in a Worker, overlay in OPFS) and for v86's
// own path (a minimal page booting v86 with `hda: { url, async: true, size }`, its AsyncXHRBuffer, on the same
// disk converted to raw), both from the same nginx. Cold = a fresh browser profile (empty cache and OPFS);
// warm = a reload in the same profile (overlay, HTTP cache and, for the tab, the base's blocks kept in OPFS present).
// Reports bytes and requests nginx served (its access log), split by kind so both sides count the same things:
//   app       the page, its scripts, styles and v86's WebAssembly (each side's own build)
//   firmware  bios.bin and vgabios-stdvga.bin (the same files on both sides)
//   disk      the guest's disk: base.qcow2 for the tab, the raw image for v86
// Both pages declare an empty favicon, so neither asks for /favicon.ico. nginx compresses HTML, CSS, JavaScript and
// WebAssembly as a production static server does (never the disk images); QCOW86_BENCH_GZIP=0 serves them as they
// are (the app row then shows the build's own sizes). QCOW86_BENCH_LOG=1 lists every request.
// Rounds: QCOW86_BENCH_ROUNDS (default 1; each round boots four times). Never fails on speed.
// Guests: the default guest to its prompt, then (QCOW86_BENCH_GUESTS=default,debian, the default) the Debian guest
// to its prompt and `python3 -c 'print(1)'` typed on its serial console, built on demand.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildTab, root, startTab } from './_tab.mjs';

const ROUNDS = Number(process.env.QCOW86_BENCH_ROUNDS ?? 1);
const BOOT_TIMEOUT = 600_000;
const COMPRESS = process.env.QCOW86_BENCH_GZIP !== '0';
const KINDS = ['app', 'firmware', 'disk'];
const GUESTS = (process.env.QCOW86_BENCH_GUESTS ?? 'default,debian').split(',');
/** Per guest: the tab's base, the raw disk v86 reads, guest RAM, and whether python3 runs after the prompt. */
const GUEST = {
  default: { base: 'base.qcow2', raw: join(root, '.cache/images/disk.raw'), memoryMiB: 64, python: false },
  debian: { base: 'debian.qcow2', raw: join(root, '.cache/images-debian/disk.raw'), memoryMiB: 128, python: true },
};

await buildTab(async () => {
  if (!GUESTS.includes('debian')) return;
  const { ensureDebian } = await import(join(root, 'images/debian.mjs'));
  await ensureDebian();
  if (!existsSync(GUEST.debian.raw)) execFileSync('qemu-img', ['convert', '-O', 'raw', '-S', '4k', join(root, 'public/images/debian.qcow2'), GUEST.debian.raw]);
});
if (!existsSync(GUEST.default.raw)) execFileSync('qemu-img', ['convert', '-O', 'raw', join(root, 'public/images/base.qcow2'), GUEST.default.raw]);

// One web root for both: the built app, plus v86's own build, the raw disk and the reference page beside it.
const web = mkdtempSync(join(tmpdir(), 'qcow86-bench-web-'));
const built = join(root, 'dist/web');
for (const name of readdirSync(built)) symlinkSync(join(built, name), join(web, name));
mkdirp(join(web, 'v86ref'));
symlinkSync(join(root, 'node_modules/v86/build/libv86.js'), join(web, 'v86ref/libv86.js'));
symlinkSync(join(root, 'node_modules/v86/build/v86.wasm'), join(web, 'v86ref/v86.wasm'));
for (const guest of GUESTS) {
  const { raw, memoryMiB } = GUEST[guest];
  symlinkSync(raw, join(web, `v86ref/${guest}.raw`));
  writeFileSync(join(web, `v86ref/${guest}.html`), referencePage(guest, statSync(raw).size, memoryMiB));
}

const tab = await startTab(web, { compressAssets: COMPRESS });
const { nginx, browser } = tab;
const loadBefore = loadavg();

const results = [];
try {
  for (const guest of GUESTS) for (let round = 0; round < ROUNDS; round++) {
    // Alternate which side boots first: the load of a shared machine drifts, and should not favour one side.
    for (const kind of round % 2 ? ['v86', 'qcow86'] : ['qcow86', 'v86']) {
      const context = await browser.newContext();
      try {
        const page = await context.newPage();
        for (const when of ['cold', 'warm']) {
          const before = nginx.requests().length;
          const ms = await bootOnce(page, guest, kind, when === 'warm');
          // nginx logs a request when its response is complete: let the log settle.
          await new Promise((done) => setTimeout(done, 1000));
          const requests = nginx.requests().slice(before);
          const by = Object.fromEntries(KINDS.map((k) => [k, requests.filter((r) => kindOf(r.uri) === k)]));
          results.push({ guest, kind, when, ms, requests: requests.length, bytes: sum(requests), ...Object.fromEntries(KINDS.flatMap((k) => [[`${k}Requests`, by[k].length], [`${k}Bytes`, sum(by[k])]])) });
          console.log(`  ${guest} ${kind} ${when}: ${(ms / 1000).toFixed(1)} s, ${requests.length} requests, ${mib(sum(requests))} (${KINDS.map((k) => `${k} ${by[k].length} / ${mib(sum(by[k]))}`).join(', ')})`);
          if (process.env.QCOW86_BENCH_LOG) for (const r of requests) console.log(`    ${r.status} ${r.method} ${r.uri} ${r.range} ${r.bytes}`);
        }
      } finally {
        await context.close();
      }
    }
  }
} finally {
  await tab.close();
  rmSync(web, { recursive: true, force: true });
}

const median = (values) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];
const row = (guest, kind, when) => {
  const runs = results.filter((r) => r.guest === guest && r.kind === kind && r.when === when);
  // Every figure the median of its rounds (the spread of the first round used to override the median time).
  return Object.fromEntries(Object.entries(runs[0]).map(([key, value]) => [key, typeof value === 'number' ? median(runs.map((r) => r[key])) : value]));
};
const loadAfter = loadavg();
const ratio = (a, b) => (a / Math.max(1, b)).toFixed(2);
for (const guest of GUESTS) {
  const until = GUEST[guest].python ? "shell prompt and python3 -c 'print(1)'" : 'shell prompt';
  console.log(`\n${guest} guest: browser boot to the ${until} (headless Chromium, nginx${COMPRESS ? ' compressing app assets' : ', nothing compressed'}, ${ROUNDS} round(s), median; load average ${loadBefore[0].toFixed(2)} before, ${loadAfter[0].toFixed(2)} after)`);
  console.log('| path | profile | boot s | requests: all (app / firmware / disk) | bytes: all (app / firmware / disk) |');
  console.log('| --- | --- | ---: | ---: | ---: |');
  for (const kind of ['qcow86', 'v86']) {
    for (const when of ['cold', 'warm']) {
      const r = row(guest, kind, when);
      const path = kind === 'qcow86' ? 'qcow86 tab (qcow2 base, OPFS overlay and base blocks)' : 'v86 AsyncXHRBuffer on raw';
      console.log(`| ${path} | ${when} | ${(r.ms / 1000).toFixed(1)} | ${r.requests} (${KINDS.map((k) => r[`${k}Requests`]).join(' / ')}) | ${mib(r.bytes)} (${KINDS.map((k) => mib(r[`${k}Bytes`])).join(' / ')}) |`);
    }
  }
  const ours = row(guest, 'qcow86', 'cold');
  const theirs = row(guest, 'v86', 'cold');
  console.log(`cold boot time ours/v86: ${ratio(ours.ms, theirs.ms)} (target <= 1)`);
  console.log(`cold bytes ours/v86: ${ratio(ours.bytes, theirs.bytes)} (target <= 1); app ${ratio(ours.appBytes, theirs.appBytes)}, firmware ${ratio(ours.firmwareBytes, theirs.firmwareBytes)}, disk ${ratio(ours.diskBytes, theirs.diskBytes)}`);
  console.log(`cold requests v86/ours: ${ratio(theirs.requests, ours.requests)}x (target >= 10x); disk only ${ratio(theirs.diskRequests, ours.diskRequests)}x`);
}

/**
 * Navigates (or reloads) and returns the in-page time from navigation start to the shell prompt (and, for a guest
 * that runs python3, to its answer), in ms.
 */
async function bootOnce(page, guest, kind, reload) {
  const url = kind === 'qcow86' ? `${nginx.url}?base=/images/${GUEST[guest].base}` : `${nginx.url}v86ref/${guest}.html`;
  if (kind === 'qcow86' && !reload) {
    // The tab says "shell ready" once its console shows the prompt (checked every 200 ms, so up to 0.2 s late);
    // a MutationObserver stamps the moment, and the moment the console shows python3's answer. The init script
    // stays registered for the warm reload.
    await page.addInitScript(() => {
      new MutationObserver(() => {
        const phase = document.getElementById('phase');
        if (phase && /shell ready/.test(phase.textContent ?? '') && window.__ready === undefined) window.__ready = performance.now();
        const rows = document.querySelector('#terminal .xterm-rows');
        if (rows && /py-done-42/.test(rows.textContent ?? '') && window.__done === undefined) window.__done = performance.now();
      }).observe(document, { subtree: true, childList: true, characterData: true });
    });
  }
  if (reload) await page.reload();
  else await page.goto(url);
  await page.waitForFunction(() => window.__ready !== undefined, undefined, { timeout: BOOT_TIMEOUT, polling: 250 });
  if (!GUEST[guest].python) return page.evaluate(() => window.__ready);
  if (kind === 'qcow86') {
    await page.locator('#terminal').click();
    await page.keyboard.type("python3 -c 'print(1)'; echo py-done-$((6*7))");
    await page.keyboard.press('Enter');
  } else {
    await page.evaluate(() => window.emulator.serial0_send("python3 -c 'print(1)'; echo py-done-$((6*7))\n"));
  }
  await page.waitForFunction(() => window.__done !== undefined, undefined, { timeout: BOOT_TIMEOUT, polling: 250 });
  return page.evaluate(() => window.__done);
}

function referencePage(guest, size, memoryMiB) {
  // An empty favicon, as the tab's index.html declares: neither page asks for /favicon.ico.
  return `<!doctype html><meta charset="utf-8"><title>v86 reference</title><link rel="icon" href="data:,">
<script src="libv86.js"></script>
<script>
  // v86 as its own README shows it: the raw disk fetched on demand by its AsyncXHRBuffer.
  const emulator = new V86({
    wasm_path: 'v86.wasm',
    memory_size: ${memoryMiB} * 1024 * 1024,
    vga_memory_size: 8 * 1024 * 1024,
    bios: { url: '../images/bios.bin' },
    vga_bios: { url: '../images/vgabios-stdvga.bin' },
    hda: { url: '${guest}.raw', async: true, size: ${size} },
    autostart: true,
    disable_keyboard: true,
    disable_mouse: true,
    disable_speaker: true,
  });
  window.emulator = emulator;
  let tail = '';
  emulator.add_listener('serial0-output-byte', (byte) => {
    tail = (tail + String.fromCharCode(byte)).slice(-256);
    const clean = tail.replace(/\\x1b\\[[0-9;?]*[A-Za-z]/g, '');
    // The same prompt test as the tab: a "# " at the end of a line, terminal escapes removed.
    if (window.__ready === undefined && /(^|\\n)[^\\n]*[#$] $/.test(clean)) window.__ready = performance.now();
    if (window.__done === undefined && /\\npy-done-42/.test(clean)) window.__done = performance.now();
  });
</script>`;
}

/** Which kind of thing a logged request fetched (see the header comment). */
function kindOf(uri) {
  const path = uri.split('?')[0];
  if (/\/(images\/(base|debian)\.qcow2|v86ref\/\w+\.raw)$/.test(path)) return 'disk';
  if (/\/images\/(bios|vgabios-stdvga)\.bin$/.test(path)) return 'firmware';
  return 'app';
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

/**
 * The same HttpStore code, unchanged, in headless Chromium: on a page and in a module Worker, reading from nginx
 * (same origin). The compiled modules are served as they are emitted, so no bundler rewrites them.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { chromium, type Browser } from '@playwright/test';
import { startNginx, type NginxServer } from '../helpers/nginx.js';
import { tempDir } from '../helpers/qemu.js';

const ROOT = resolve(import.meta.dirname, '../..');
const CHROMIUM = '/usr/bin/chromium';
const dir = tempDir('qcow86-http-browser-');
const truth = randomBytes(2 * 1024 * 1024 + 999);
let nginx: NginxServer;
let browser: Browser;

/** The reads both contexts perform, and what they send back: offsets, lengths and the bytes as hex. */
const PROBE = `
export async function probe(url) {
  const { HttpStore } = await import('/dist/io/http.js');
  const store = await HttpStore.open(url, { blockSize: 32768 });
  const reads = [];
  let seed = 7;
  const random = () => ((seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  for (let i = 0; i < 60; i++) {
    const offset = Math.floor(random() * ${truth.length + 500});
    const length = 1 + Math.floor(random() * 70000);
    const bytes = await store.read(offset, length);
    reads.push({ offset, length, hex: Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('') });
  }
  let refused = '';
  try { await HttpStore.open(url.replace('random.img', 'missing.img')); } catch (error) { refused = error.message; }
  return { validator: store.validator, size: await store.size(), stats: store.stats(), reads, refused };
}

/** In a dedicated Worker (OPFS sync handles exist only there): the store with its blocks kept in OPFS. */
export async function probePersisted(url) {
  const { HttpStore } = await import('/dist/io/http.js');
  const { opfsPersistentBlocks } = await import('/dist/io/opfs.js');
  const persist = await opfsPersistentBlocks(url, 'probe-blocks');
  const store = await HttpStore.open(url, { blockSize: 32768, persist });
  const reads = [];
  for (let offset = 0; offset < ${truth.length}; offset += 100000) {
    const bytes = await store.read(offset, 5000);
    reads.push({ offset, length: 5000, hex: Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('') });
  }
  const stats = store.stats();
  await store.close();
  return { persisted: persist !== undefined, validator: store.validator, stats, reads };
}

export function probeInWorker(url, name = 'probe') {
  return new Promise((done, fail) => {
    const worker = new Worker('/worker.js', { type: 'module' });
    worker.onmessage = (event) => (event.data.ok ? done(event.data.ok) : fail(new Error(event.data.error)));
    worker.onerror = (event) => fail(new Error(event.message));
    worker.postMessage({ url, name });
  });
}
`;

beforeAll(async () => {
  // tsc's own output, compiled now so the test never runs a stale dist/.
  execFileSync(process.execPath, [join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', join(ROOT, 'tsconfig.build.json'), '--outDir', join(dir, 'dist'), '--declaration', 'false', '--sourceMap', 'false'], { cwd: ROOT, stdio: 'inherit' });
  writeFileSync(join(dir, 'random.img'), truth);
  writeFileSync(join(dir, 'probe.js'), PROBE);
  writeFileSync(join(dir, 'worker.js'), `import { probe, probePersisted } from './probe.js';\nself.onmessage = async (event) => { try { const { url, name } = event.data; self.postMessage({ ok: await (name === 'persisted' ? probePersisted : probe)(url) }); } catch (error) { self.postMessage({ error: String(error) }); } };\n`);
  writeFileSync(join(dir, 'index.html'), '<!doctype html><title>http store</title>\n');
  nginx = await startNginx(dir);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
}, 120_000);

afterAll(async () => {
  await browser?.close();
  await nginx?.close();
});

interface ProbeResult {
  validator: string;
  size: number;
  stats: { requests: number; bytesFetched: number };
  reads: Array<{ offset: number; length: number; hex: string }>;
  refused: string;
}

function check(result: ProbeResult): void {
  expect(result.size).toBe(truth.length);
  expect(result.reads).toHaveLength(60);
  for (const read of result.reads) expect(read.hex).toBe(truth.subarray(read.offset, read.offset + read.length).toString('hex'));
  expect(result.refused).toMatch(/missing\.img: not found \(404\)/);
}

describe.skipIf(!existsSync(CHROMIUM))('HttpStore in Chromium', () => {
  it('reads the true bytes on a page and in a module Worker, with explicit If-Range ranges only', async () => {
    const page = await browser.newPage();
    await page.goto(`${nginx.url}index.html`);
    const before = nginx.requests().filter((r) => r.uri === '/random.img').length;
    // Passed as source text: a function would be rewritten by Vitest's transform before reaching the page.
    const image = JSON.stringify(`${nginx.url}random.img`);
    const onPage = (await page.evaluate(`import('/probe.js').then((m) => m.probe(${image}))`)) as ProbeResult;
    check(onPage);
    const inWorker = (await page.evaluate(`import('/probe.js').then((m) => m.probeInWorker(${image}))`)) as ProbeResult;
    check(inWorker);
    const requests = nginx.requests().filter((r) => r.uri === '/random.img').slice(before);
    // What the browser really sent: every request one explicit range, every answer a 206, If-Range after the first.
    expect(requests).toHaveLength(onPage.stats.requests + inWorker.stats.requests);
    for (const request of requests) {
      expect(request.status).toBe(206);
      expect(request.range).toMatch(/^bytes=\d+-\d+$/);
    }
    expect(requests.filter((r) => r.ifRange === onPage.validator)).toHaveLength(requests.length - 2);
    await page.close();
  }, 120_000);

  it('keeps the blocks in OPFS: a second Worker reopens with one 304 and reads them from there', async () => {
    const page = await browser.newPage();
    await page.goto(`${nginx.url}index.html`);
    const image = JSON.stringify(`${nginx.url}random.img`);
    const mark = () => nginx.requests().filter((r) => r.uri === '/random.img').length;
    const before = mark();
    const run = async () => (await page.evaluate(`import('/probe.js').then((m) => m.probeInWorker(${image}, 'persisted'))`)) as ProbeResult & { persisted: boolean; stats: { bytesRestored: number } };
    const cold = await run();
    const between = mark();
    const warm = await run();
    for (const result of [cold, warm]) {
      expect(result.persisted).toBe(true);
      for (const read of result.reads) expect(read.hex).toBe(truth.subarray(read.offset, read.offset + read.length).toString('hex'));
    }
    expect(cold.stats.bytesRestored).toBe(0);
    expect(warm.stats).toMatchObject({ requests: 1, bytesFetched: 0 });
    expect(warm.stats.bytesRestored).toBeGreaterThan(0);
    const coldRequests = nginx.requests().filter((r) => r.uri === '/random.img').slice(before, between);
    expect(coldRequests.every((r) => r.status === 206)).toBe(true);
    // Chromium hands the 304 to the Worker (If-None-Match set by the page, cache: no-store): no body crossed.
    expect(nginx.requests().filter((r) => r.uri === '/random.img').slice(between)).toEqual([expect.objectContaining({ status: 304, bytes: 0 })]);
    await page.close();
  }, 120_000);
});

/**
 * OpfsStore in headless Chromium, on a site whose storage quota is lowered through the DevTools protocol: a write
 * or resize that does not fit is a QuotaError, never a silent short write - in an on-disk profile (Chromium throws
 * QuotaExceededError) and in an in-memory one (Chromium's in-memory file system returns its error code as the
 * byte count: 2^32 - 8) - and with a makeRoom callback that frees space, the same call goes through. The compiled
 * modules are served as tsc emits them.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { chromium, type Browser, type BrowserContext } from '@playwright/test';
import { startNginx, type NginxServer } from '../helpers/nginx.js';
import { tempDir } from '../helpers/qemu.js';
import { QuotaError, quotaErrorIn } from '../../src/io/opfs.js';

const ROOT = resolve(import.meta.dirname, '../..');
const CHROMIUM = '/usr/bin/chromium';
const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const MiB = 1024 * 1024;
const dir = tempDir('qcow86-opfs-browser-');
let nginx: NginxServer;
let browser: Browser;

/** Runs in a dedicated Worker (sync handles exist only there); each scenario returns what it saw. */
const WORKER = `
import { OpfsStore, QuotaError, opfsDirectory } from '/dist/io/opfs.js';

const MiB = ${MiB};
const pattern = (n, seed) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed) & 255);
const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
const outcome = async (action) => {
  try { await action(); return 'ok'; } catch (error) { return (error instanceof QuotaError ? 'QuotaError: ' : 'other: ') + error.message; }
};

const scenarios = {
  // Fills the quota: the write that does not fit, and a resize past it, fail as QuotaError.
  async full() {
    const dir = await opfsDirectory('full');
    const store = await OpfsStore.open(dir, 'disk', { create: true });
    const written = await outcome(() => store.write(0, pattern(6 * MiB, 1)));
    const size = await store.size();
    const grown = await outcome(() => store.truncate(64 * MiB));
    await store.close();
    return { written, size, grown };
  },
  // A filler takes the room; makeRoom deletes it and the same write goes through, bytes intact.
  async room() {
    const dir = await opfsDirectory('room');
    const filler = await OpfsStore.open(dir, 'filler', { create: true });
    await filler.write(0, pattern(3 * MiB, 2));
    await filler.close();
    self.postMessage({ ready: true });
    await new Promise((go) => (self.onmessage = go));
    let calls = 0;
    const store = await OpfsStore.open(dir, 'disk', { create: true, makeRoom: async () => { calls++; await dir.removeEntry('filler'); return true; } });
    const data = pattern(2 * MiB, 3);
    const written = await outcome(() => store.write(0, data));
    const back = same(await store.read(0, data.length), data);
    // Nothing more to free: the next write that does not fit fails after one more call.
    const refused = await outcome(() => store.write(2 * MiB, pattern(4 * MiB, 4)));
    await store.close();
    return { written, back, calls, refused };
  },
};

self.onmessage = async (event) => {
  try { self.postMessage({ ok: await scenarios[event.data]() }); } catch (error) { self.postMessage({ error: String(error && error.stack || error) }); }
};
`;

interface Full {
  written: string;
  size: number;
  grown: string;
}
interface Room {
  written: string;
  back: boolean;
  calls: number;
  refused: string;
}

beforeAll(async () => {
  execFileSync(process.execPath, [join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', join(ROOT, 'tsconfig.build.json'), '--outDir', join(dir, 'dist'), '--declaration', 'false', '--sourceMap', 'false'], { cwd: ROOT, stdio: 'inherit' });
  writeFileSync(join(dir, 'worker.js'), WORKER);
  writeFileSync(join(dir, 'index.html'), '<!doctype html><title>opfs store</title>\n');
  nginx = await startNginx(dir);
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS });
}, 120_000);

afterAll(async () => {
  await browser?.close();
  await nginx?.close();
});

/** Starts the scenario in a Worker of a page of `context`, with the origin's quota set to its usage plus `room` once it is ready. */
async function scenario<T>(context: BrowserContext, name: string, room: number): Promise<T> {
  const page = await context.newPage();
  await page.goto(`${nginx.url}index.html`);
  const cdp = await context.newCDPSession(page);
  const origin = nginx.url.replace(/\/$/, '');
  const limit = async () => {
    const usage = (await page.evaluate('navigator.storage.estimate().then((e) => e.usage)')) as number;
    await cdp.send('Storage.overrideQuotaForOrigin', { origin, quotaSize: usage + room });
  };
  if (name !== 'room') await limit();
  // The Worker reports 'ready' when its setup is written (the quota goes down only then), then the result.
  await page.evaluate(`window.worker = new Worker('/worker.js', { type: 'module' }); window.messages = []; worker.onmessage = (e) => messages.push(e.data); worker.postMessage(${JSON.stringify(name)});`);
  const next = async (): Promise<Record<string, unknown>> => {
    await page.waitForFunction('window.messages.length > 0', undefined, { timeout: 60_000 });
    return (await page.evaluate('window.messages.shift()')) as Record<string, unknown>;
  };
  let message = await next();
  if (message['ready']) {
    await limit();
    await page.evaluate('worker.postMessage("go")');
    message = await next();
  }
  await cdp.send('Storage.overrideQuotaForOrigin', { origin });
  await page.close();
  if (message['error']) throw new Error(String(message['error']));
  return message['ok'] as T;
}

describe('quotaErrorIn', () => {
  it('finds a QuotaError however deep an engine error wraps it, and nothing else', () => {
    const quota = new QuotaError('opfs:qcow86/disk', 'write failed');
    expect(quotaErrorIn(quota)).toBe(quota);
    expect(quotaErrorIn(new Error('flush failed', { cause: new Error('metadata write failed', { cause: quota }) }))).toBe(quota);
    expect(quotaErrorIn(new Error('other', { cause: new Error('no space') }))).toBeUndefined();
    expect(quotaErrorIn(undefined)).toBeUndefined();
  });
});

describe.skipIf(!existsSync(CHROMIUM))('OpfsStore in Chromium on a full storage', () => {
  for (const profile of ['in-memory', 'on-disk'] as const) {
    it(`reports a write and a resize that do not fit as QuotaError (${profile} profile)`, async () => {
      const userData = profile === 'on-disk' ? mkdtempSync(join(tmpdir(), 'qcow86-opfs-profile-')) : undefined;
      const context = userData ? await chromium.launchPersistentContext(userData, { executablePath: CHROMIUM, args: ARGS }) : await browser.newContext();
      try {
        const full = await scenario<Full>(context, 'full', 2 * MiB);
        expect(full.written).toMatch(/^QuotaError: opfs:full\/disk: write of 6291456 bytes at offset 0 failed: the browser's storage quota for this site is used up/);
        expect(full.size).toBeLessThanOrEqual(2 * MiB);
        expect(full.grown).toMatch(/^QuotaError: .*resize to 67108864 bytes failed/);

        const room = await scenario<Room>(context, 'room', MiB);
        expect(room).toMatchObject({ written: 'ok', back: true, calls: 2 });
        expect(room.refused).toMatch(/^QuotaError: /);
      } finally {
        await context.close();
        if (userData) rmSync(userData, { recursive: true, force: true });
      }
    }, 120_000);
  }
});

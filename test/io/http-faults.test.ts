/**
 * HttpStore against a misbehaving server: each fault gets the documented retry or a clear error naming the URL,
 * and no read ever returns a byte that differs from the true file.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { startFaultServer, type Fault, type FaultServer, type FaultServerOptions } from '../helpers/fault-server.js';
import { HttpStore, contentHash, type HttpStats, type HttpStoreOptions } from '../../src/io/http.js';
import { HttpError } from '../../src/qcow2/errors.js';

const KiB = 1024;
const truth = randomBytes(1024 * KiB + 777);
// Small blocks, no readahead and quick retries keep request sequences short and easy to reason about.
const quick: HttpStoreOptions = { blockSize: 4 * KiB, readahead: false, backoffMs: 1, retries: 3, timeoutMs: 2000 };
let server: FaultServer | undefined;

afterEach(async () => {
  await server?.close();
  server = undefined;
});

async function serve(options: FaultServerOptions = {}, bytes: Uint8Array = truth): Promise<FaultServer> {
  server = await startFaultServer(bytes, options);
  return server;
}

async function expectTrue(store: HttpStore, offset: number, length: number): Promise<void> {
  const got = await store.read(offset, length);
  expect(Buffer.from(got).equals(truth.subarray(offset, offset + length))).toBe(true);
}

function seeded(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 2 ** 32;
  };
}

describe('HttpStore error cases', () => {
  it('says in those words that a server ignoring Range is unusable', async () => {
    const s = await serve();
    s.always('ignore-range');
    const error = await HttpStore.open(s.url, quick).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(HttpError);
    expect((error as Error).message).toContain(`${s.url}: the server ignores Range requests`);
    expect(s.requests).toHaveLength(1);
  });

  it('refuses a whole-file 200 in the middle of a session too', async () => {
    const s = await serve();
    const store = await HttpStore.open(s.url, quick);
    s.queue('ignore-range');
    await expect(store.read(100 * KiB, 10)).rejects.toThrow('the server ignores Range requests');
    // Not sticky: the server may behave on the next request.
    await expectTrue(store, 100 * KiB, 10);
  });

  it('reports a 416 with the size the server claims, and a 416 of another size as a changed image', async () => {
    const s = await serve();
    s.queue('416');
    await expect(HttpStore.open(s.url, quick)).rejects.toThrow(`${s.url}: the server refused bytes=0-4095 as not satisfiable (416); it says the file is ${truth.length} bytes`);
    const store = await HttpStore.open(s.url, quick);
    s.setFile(truth.subarray(0, 1000));
    await expect(store.read(500 * KiB, 10)).rejects.toThrow(/changed on the server/);
  });

  it('refuses compressed responses', async () => {
    const s = await serve();
    s.always('gzip');
    await expect(HttpStore.open(s.url, quick)).rejects.toThrow(`${s.url}: the server compressed the image (Content-Encoding: gzip)`);
  });

  it('refuses an HTML page served for a missing file', async () => {
    const s = await serve({ htmlForMissing: true });
    const url = `${s.origin}/images/missing.qcow2`;
    await expect(HttpStore.open(url, quick)).rejects.toThrow(`${url}: the server returned an HTML page`);
  });

  it('refuses a 206 for a different range', async () => {
    const s = await serve();
    const store = await HttpStore.open(s.url, quick);
    s.queue('wrong-range');
    await expect(store.read(8 * KiB, 10)).rejects.toThrow(`asked for bytes=8192-12287, the server sent bytes 8193-12288`);
  });

  it('opens a file smaller than one block and reads it to its end', async () => {
    const tiny = truth.subarray(0, 100);
    const s = await serve({}, tiny);
    const store = await HttpStore.open(s.url, quick);
    expect(await store.size()).toBe(100);
    expect(s.requests.map((r) => r.range)).toEqual(['bytes=0-4095']);
    expect(Buffer.from(await store.read(90, 50)).equals(tiny.subarray(90))).toBe(true);
    expect(await store.read(100, 10)).toHaveLength(0);
    expect(s.requests).toHaveLength(1);
  });

  it('opens a 0-byte file answered 416 (size 0) as an empty image, and a 416 naming another size stays an error', async () => {
    const s = await serve({}, new Uint8Array(0));
    const store = await HttpStore.open(s.url, quick);
    expect(await store.size()).toBe(0);
    // This server's 416 carries no ETag or Last-Modified: the version is pinned by its (empty) content.
    expect(store.validator).toBe(`pin:0:${contentHash(new Uint8Array(0))}`);
    expect(await store.read(0, 512)).toHaveLength(0);
    expect(s.requests.map((r) => [r.range, r.status])).toEqual([['bytes=0-4095', 416]]);
    // The same 416 from a file that has bytes is a server refusing a satisfiable range.
    const full = await startFaultServer(truth);
    try {
      full.queue('416');
      await expect(HttpStore.open(full.url, quick)).rejects.toThrow(`(416); it says the file is ${truth.length} bytes`);
    } finally {
      await full.close();
    }
  });

  it('retries truncated bodies, resets, short lengths and 5xx, then succeeds with the true bytes', async () => {
    const s = await serve();
    const store = await HttpStore.open(s.url, quick);
    const faults: Fault[] = ['truncate', 'reset', 'short-length', '503'];
    for (const [i, fault] of faults.entries()) {
      s.queue(fault, fault);
      await expectTrue(store, (i + 10) * 8 * KiB, 6 * KiB);
    }
    expect(store.stats()).toMatchObject({ retries: 8, requests: 1 + 12 });
  });

  it('waits longer before each retry: the backoff doubles from backoffMs', async () => {
    const s = await serve();
    const store = await HttpStore.open(s.url, { ...quick, backoffMs: 40, retries: 3 });
    s.queue('503', '503', '503');
    await expectTrue(store, 20 * KiB, 100);
    const attempts = s.requests.slice(1).map((r) => r.at);
    expect(attempts).toHaveLength(4);
    const gaps = attempts.slice(1).map((at, i) => at - attempts[i]!);
    // Lower bounds only (a busy machine may wait longer): 40, 80 and 160 ms, less 2 ms of timer rounding.
    gaps.forEach((gap, i) => expect(gap).toBeGreaterThanOrEqual(40 * 2 ** i - 2));
    expect(store.stats()).toMatchObject({ retries: 3, requests: 5 });
  });

  it('gives up after the documented number of attempts with the last reason', async () => {
    const s = await serve();
    const store = await HttpStore.open(s.url, quick);
    const cases: Array<[Fault, RegExp]> = [
      ['503', /the server answered bytes=\d+-\d+ with 503 Service Unavailable \(gave up after 4 attempts\)/],
      ['reset', /network error on bytes=\d+-\d+: .* \(gave up after 4 attempts\)/],
      ['truncate', /(network error|short body).* \(gave up after 4 attempts\)/],
      ['short-length', /short body for bytes=\d+-\d+: 2048 of 4096 bytes \(gave up after 4 attempts\)/],
    ];
    for (const [fault, message] of cases) {
      s.always(fault);
      const before = s.requests.length;
      const error = await store.read(40 * KiB, 100).catch((e: unknown) => e);
      expect(error).toBeInstanceOf(HttpError);
      expect((error as Error).message).toMatch(message);
      expect((error as Error).message.startsWith(s.url)).toBe(true);
      expect(s.requests.length - before).toBe(4);
    }
    s.always(undefined);
    await expectTrue(store, 40 * KiB, 100);
  });

  it('times out a stalled request, retries it, and fails clearly when the server keeps stalling', async () => {
    const s = await serve();
    const store = await HttpStore.open(s.url, { ...quick, timeoutMs: 200, retries: 1 });
    s.queue('stall');
    await expectTrue(store, 64 * KiB, 10);
    s.always('stall');
    await expect(store.read(128 * KiB, 10)).rejects.toThrow(/the server sent nothing for bytes=131072-135167 in 200 ms \(gave up after 2 attempts\)/);
  }, 20_000);

  it('ends a read that a server drips out slowly at its total deadline, however steadily the bytes come', async () => {
    const s = await serve();
    const store = await HttpStore.open(s.url, { ...quick, timeoutMs: 300, retries: 1 });
    s.always('drip');
    const started = performance.now();
    const error = await store.read(64 * KiB, 4 * KiB).catch((e: unknown) => e);
    const took = performance.now() - started;
    expect(error).toBeInstanceOf(HttpError);
    // A byte every 100 ms keeps the 300 ms idle timeout re-armed: only the 1200 ms deadline (4 idle timeouts for
    // so small a range) ends each of the two attempts.
    expect((error as Error).message).toMatch(/the server did not finish bytes=65536-69631 within 1200 ms \(gave up after 2 attempts\)/);
    expect(took).toBeGreaterThan(2 * 1200);
    expect(took).toBeLessThan(10_000);
  }, 20_000);

  it('follows a redirect within the image\'s origin, never one to another origin', async () => {
    const s = await serve();
    s.queue('redirect-same-origin');
    const store = await HttpStore.open(s.url, quick);
    await expectTrue(store, 0, 4 * KiB);
    s.queue('redirect-same-origin');
    await expectTrue(store, 40 * KiB, 4 * KiB);
    expect(s.requests.map((r) => [r.path, r.status])).toEqual([['/disk.img', 302], ['/moved/disk.img', 206], ['/disk.img', 302], ['/moved/disk.img', 206]]);
    s.requests.length = 0;
    s.queue('redirect-other-origin');
    const error = await store.read(80 * KiB, 4 * KiB).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(HttpError);
    expect((error as Error).message).toContain(`${s.url}: the server redirects to another origin (http://localhost:`);
    // Refused, not retried, and nothing was asked of the other origin (the same server under another name).
    expect(s.requests.map((r) => [r.path, r.status])).toEqual([['/disk.img', 302]]);
  });

  it('refuses a body longer than its Content-Range without retrying', async () => {
    const s = await serve();
    const store = await HttpStore.open(s.url, quick);
    s.queue('long-body');
    await expect(store.read(12 * KiB, 10)).rejects.toThrow(`${s.url}: the body is longer than the 4096 bytes its Content-Range announced`);
    expect(store.stats().retries).toBe(0);
    await expectTrue(store, 12 * KiB, 10);
  });

  it('times out only when the server goes quiet, not while a slow body keeps arriving', async () => {
    const s = await serve();
    // 30 pieces 20 ms apart take about 600 ms in all, well past the 400 ms idle limit.
    const store = await HttpStore.open(s.url, { ...quick, timeoutMs: 400, retries: 0 });
    s.queue('trickle');
    await expectTrue(store, 64 * KiB, 4 * KiB);
    expect(store.stats().retries).toBe(0);
  }, 20_000);

  it('hands out a demanded block before the readahead behind it has arrived', async () => {
    const s = await serve();
    const store = await HttpStore.open(s.url, { ...quick, readahead: { initial: 64 * KiB, max: 64 * KiB } });
    await expectTrue(store, 0, 4 * KiB);
    s.queue('trickle');
    // Sequential miss: one request for block 1 and 64 KiB of readahead, sent in 30 pieces 20 ms apart.
    await expectTrue(store, 4 * KiB, 4 * KiB);
    expect(store.stats().inFlight).toBe(1);
    await expectTrue(store, 8 * KiB, 60 * KiB);
    expect(s.requests.map((r) => r.range)).toEqual(['bytes=0-4095', `bytes=4096-${4 * KiB + 68 * KiB - 1}`]);
  }, 20_000);

  it('stops with an error naming the image when it changes mid-session, and never serves either version after', async () => {
    const s = await serve();
    const store = await HttpStore.open(s.url, quick);
    await expectTrue(store, 0, 16 * KiB);
    s.setFile(randomBytes(truth.length));
    const error = await store.read(200 * KiB, 10).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(HttpError);
    expect((error as Error).message).toMatch(new RegExp(`^${s.url}: the image changed on the server during this session`));
    // Even cached blocks of the old version are refused now: the session is over.
    await expect(store.read(0, 10)).rejects.toThrow(/changed on the server/);
    expect(s.requests.at(-1)).toMatchObject({ ifRange: store.validator, status: 200 });
  });

  it('notices a change through the ETag when the server ignores If-Range', async () => {
    const s = await serve({ ignoreIfRange: true });
    const store = await HttpStore.open(s.url, quick);
    s.setFile(randomBytes(truth.length));
    await expect(store.read(300 * KiB, 10)).rejects.toThrow(/the image changed on the server during this session \(its ETag went from "v1-\d+" to "v2-\d+"\)/);
  });

  it('pins size and a hash of the first block when there is no strong ETag, and notices a change through it', async () => {
    const s = await serve({ etag: 'weak' });
    const store = await HttpStore.open(s.url, quick);
    expect(store.validator).toBe(`pin:${truth.length}:${contentHash(truth.subarray(0, 4 * KiB))}`);
    // Overlays made by earlier versions recorded Last-Modified + size: that name still matches this version.
    expect(store.legacyValidators).toEqual([`lm:${truth.length}:Mon, 01 Jan 2024 00:00:01 GMT`]);
    await expectTrue(store, 50 * KiB, 100);
    expect(s.requests.at(-1)!.ifRange).toBe('Mon, 01 Jan 2024 00:00:01 GMT');
    s.setFile(randomBytes(truth.length));
    await expect(store.read(300 * KiB, 10)).rejects.toThrow(/changed on the server/);
    // A server with no validator at all: the content pin is the only one, and it tells versions apart.
    const s2 = await startFaultServer(truth, { etag: 'none', lastModified: false });
    try {
      const first = await HttpStore.open(s2.url, quick);
      expect(first.validator).toBe(`pin:${truth.length}:${contentHash(truth.subarray(0, 4 * KiB))}`);
      await expect(HttpStore.open(s2.url, { ...quick, expectedValidator: first.validator })).resolves.toBeDefined();
      const changed = truth.slice();
      changed[100] ^= 1;
      s2.setFile(changed);
      const refused = await HttpStore.open(s2.url, { ...quick, expectedValidator: first.validator }).catch((e: unknown) => e);
      expect((refused as Error).message).toMatch(/is not the version recorded earlier \(recorded pin:\d+:[0-9a-f]{16}, the server now has pin:/);
    } finally {
      await s2.close();
    }
  });

  it('cancels through the store signal, a per-read signal, or close()', async () => {
    const s = await serve();
    const controller = new AbortController();
    const store = await HttpStore.open(s.url, { ...quick, signal: controller.signal });
    s.always('stall');
    const stalled = store.read(64 * KiB, 10);
    setTimeout(() => controller.abort(new Error('user cancelled')), 20);
    await expect(stalled).rejects.toThrow('user cancelled');
    await expect(store.read(0, 10)).rejects.toThrow('user cancelled');

    s.always(undefined);
    const other = await HttpStore.open(s.url, quick);
    s.queue('stall');
    const perRead = new AbortController();
    const abandoned = other.read(64 * KiB, 10, { signal: perRead.signal });
    perRead.abort();
    await expect(abandoned).rejects.toThrow(/abort/i);
    await expectTrue(other, 256 * KiB, 10);
    s.always('stall');
    const closing = other.read(512 * KiB, 10);
    await other.close();
    await expect(closing).rejects.toThrow(`${s.url}: the store is closed`);
  }, 20_000);

  it('never accepts a wrong byte under random faults over random reads, and reports progress', async () => {
    const s = await serve();
    const random = seeded(42);
    const faults: Fault[] = ['503', 'reset', 'truncate', 'short-length', 'wrong-range', 'gzip', 'ignore-range'];
    const seen: HttpStats[] = [];
    const store = await HttpStore.open(s.url, { ...quick, retries: 6, cacheBytes: 64 * KiB, readahead: { initial: 8 * KiB, max: 64 * KiB }, onProgress: (stats) => seen.push(stats) });
    s.chooser = () => (random() < 0.25 ? faults[Math.floor(random() * faults.length)] : undefined);
    let ok = 0;
    let failed = 0;
    for (let i = 0; i < 300; i++) {
      const offset = random() < 0.5 ? Math.floor(random() * truth.length) : ((i * 3 * KiB) % truth.length);
      const length = 1 + Math.floor(random() * 20 * KiB);
      try {
        const got = await store.read(offset, length);
        expect(Buffer.from(got).equals(truth.subarray(offset, offset + length))).toBe(true);
        ok++;
      } catch (error) {
        expect(error).toBeInstanceOf(HttpError);
        expect((error as Error).message).toMatch(/ignores Range|compressed|asked for|gave up/);
        failed++;
      }
    }
    expect(ok).toBeGreaterThan(200);
    expect(failed).toBeGreaterThan(0);
    expect(seen.length).toBeGreaterThan(10);
    for (let i = 1; i < seen.length; i++) expect(seen[i]!.bytesFetched).toBeGreaterThanOrEqual(seen[i - 1]!.bytesFetched);
    const final = store.stats();
    expect(final.requests).toBe(s.requests.length);
    expect(final.retries).toBeGreaterThan(0);
    expect(final.hitRate).toBeGreaterThan(0);
  }, 30_000);
});

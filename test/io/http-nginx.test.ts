/**
 * HttpStore against a real static server (nginx-light on 127.0.0.1): every byte read equals the file, every
 * request is an explicit range with If-Range and gets a 206, and the cache, coalescing, in-flight de-duplication
 * and readahead produce exactly the requests they should (counted in nginx's own access log).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { startNginx, type NginxServer } from '../helpers/nginx.js';
import { makeImage, qemuImg, tempDir } from '../helpers/qemu.js';
import { BOOT_HTTP_OPTIONS, HttpStore, httpResolver } from '../../src/io/http.js';
import { HttpError } from '../../src/qcow2/errors.js';
import { openImage } from '../../src/qcow2/open.js';
import { FileStore } from '../../src/io/file.js';

const KiB = 1024;
const dir = tempDir('qcow86-http-');
const truth = randomBytes(3 * 1024 * KiB + 12345);
writeFileSync(join(dir, 'random.img'), truth);
let nginx: NginxServer;

beforeAll(async () => {
  nginx = await startNginx(dir);
});
afterAll(async () => {
  await nginx?.close();
});

/** Requests nginx logged for `name` since `since` requests had been logged. */
function logged(name: string, since = 0) {
  return nginx.requests().slice(since).filter((request) => request.uri === `/${name}`);
}

function seeded(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (Math.imul(state, 1664525) + 1013904223) >>> 0;
    return state / 2 ** 32;
  };
}

describe('HttpStore over nginx', () => {
  it('returns the true bytes for random reads, with only explicit If-Range ranges answered 206', async () => {
    const before = nginx.requests().length;
    // A small cache so eviction happens during the run.
    const store = await HttpStore.open(`${nginx.url}random.img`, { blockSize: 16 * KiB, cacheBytes: 256 * KiB });
    expect(await store.size()).toBe(truth.length);
    const random = seeded(6);
    for (let i = 0; i < 400; i++) {
      const offset = Math.floor(random() * (truth.length + 1000));
      const length = 1 + Math.floor(random() * (random() < 0.2 ? 300 * KiB : 5000));
      const got = await store.read(offset, length);
      expect(Buffer.from(got).equals(truth.subarray(offset, offset + length))).toBe(true);
    }
    const requests = logged('random.img', before);
    expect(requests.length).toBe(store.stats().requests);
    // The first request pins the version, so it has nothing to send as If-Range yet.
    expect(requests[0]!.ifRange).toBe('');
    for (const request of requests) {
      expect(request.status).toBe(206);
      expect(request.range).toMatch(/^bytes=\d+-\d+$/);
    }
    for (const request of requests.slice(1)) expect(request.ifRange).toBe(store.validator);
    expect(store.stats().bytesFetched).toBe(requests.reduce((sum, request) => sum + request.bytes, 0));
    expect(store.stats().cachedBytes).toBeLessThanOrEqual(256 * KiB);
  });

  it('pins nginx\'s strong ETag and refuses a different recorded validator unless forced', async () => {
    const response = await fetch(`${nginx.url}random.img`, { method: 'HEAD' });
    const store = await HttpStore.open(`${nginx.url}random.img`);
    expect(store.validator).toBe(response.headers.get('ETag'));
    await expect(HttpStore.open(`${nginx.url}random.img`, { expectedValidator: '"other-1"' })).rejects.toThrow(/not the version recorded earlier.*"other-1"/);
    await expect(HttpStore.open(`${nginx.url}random.img`, { expectedValidator: '"other-1"' })).rejects.toBeInstanceOf(HttpError);
    const forced = await HttpStore.open(`${nginx.url}random.img`, { expectedValidator: '"other-1"', force: true });
    expect(forced.validator).toBe(store.validator);
    await expect(HttpStore.open(`${nginx.url}random.img`, { expectedValidator: store.validator })).resolves.toBeInstanceOf(HttpStore);
  });

  it('opens a 0-byte file as an empty raw image, as QEMU\'s curl driver does, and refuses it as qcow2', async () => {
    writeFileSync(join(dir, 'empty.img'), new Uint8Array(0));
    const url = `${nginx.url}empty.img`;
    const before = nginx.requests().length;
    const store = await HttpStore.open(url);
    expect(await store.size()).toBe(0);
    expect(await store.read(0, 4096)).toHaveLength(0);
    // nginx answers a range of an empty file with the whole (empty) file: one 200 of 0 bytes, nothing else.
    expect(logged('empty.img', before).map((r) => [r.status, r.bytes])).toEqual([[200, 0]]);
    expect(store.validator).toBe((await fetch(url, { method: 'HEAD' })).headers.get('ETag'));
    const device = await openImage(store);
    expect(device.virtualSize).toBe(0);
    // qemu-img reads the same URL through QEMU's curl driver: a raw image of 0 bytes.
    const info = JSON.parse(await qemuImg(['info', '--output=json', url]));
    expect(info).toMatchObject({ format: 'raw', 'virtual-size': 0 });
    await expect(openImage(await HttpStore.open(url), { format: 'qcow2' })).rejects.toThrow(`${url}: image is not in qcow2 format`);
  });

  it('names the URL of a missing image (404)', async () => {
    await expect(HttpStore.open(`${nginx.url}missing.img`)).rejects.toThrow(`${nginx.url}missing.img: not found (404)`);
  });

  it('serves hits from the cache, coalesces adjacent misses and joins requests in flight', async () => {
    const before = nginx.requests().length;
    const store = await HttpStore.open(`${nginx.url}random.img`, { blockSize: 64 * KiB, readahead: false });
    expect(logged('random.img', before).map((r) => r.range)).toEqual(['bytes=0-65535']);
    // Block 0 came with open: no request.
    expect(Buffer.from(await store.read(100, 4000)).equals(truth.subarray(100, 4100))).toBe(true);
    // Blocks 2-5 missing: one request.
    await store.read(2 * 64 * KiB + 5, 4 * 64 * KiB - 10);
    // Two reads of block 8 at once, and a third spanning blocks 7-9: one request for 8, one each for 7 and 9.
    await Promise.all([store.read(8 * 64 * KiB, 512), store.read(8 * 64 * KiB + 1000, 512), store.read(7 * 64 * KiB + 10, 2 * 64 * KiB)]);
    // Spanning cached 2-5 and missing 6: only block 6 is fetched.
    await store.read(3 * 64 * KiB, 4 * 64 * KiB);
    expect(logged('random.img', before).map((r) => r.range)).toEqual([
      'bytes=0-65535',
      'bytes=131072-393215',
      'bytes=524288-589823',
      'bytes=458752-524287',
      'bytes=589824-655359',
      'bytes=393216-458751',
    ]);
    const stats = store.stats();
    expect(stats.requests).toBe(6);
    expect(stats).toMatchObject({ reads: 6, hits: 1, misses: 5, retries: 0 });
  });

  it('evicts the least recently used block when over the byte budget', async () => {
    const before = nginx.requests().length;
    const block = 64 * KiB;
    const store = await HttpStore.open(`${nginx.url}random.img`, { blockSize: block, cacheBytes: 3 * block, readahead: false });
    // Cache after each read (oldest first): [0 1] [0 1 2] [1 2 0] [2 0 3] [0 3 1] [3 1 0] [1 0 2]
    for (const index of [1, 2, 0, 3, 1, 0, 2]) {
      const got = await store.read(index * block + 7, 100);
      expect(Buffer.from(got).equals(truth.subarray(index * block + 7, index * block + 107))).toBe(true);
    }
    const fetched = logged('random.img', before).map((r) => Number(/^bytes=(\d+)-/.exec(r.range)![1]) / block);
    expect(fetched).toEqual([0, 1, 2, 3, 1, 2]);
    expect(store.stats()).toMatchObject({ hits: 2, misses: 5, cachedBytes: 3 * block });
  });

  it('grows readahead while reads are sequential and drops it after a jump', async () => {
    const before = nginx.requests().length;
    const store = await HttpStore.open(`${nginx.url}random.img`, { blockSize: 64 * KiB, readahead: { initial: 128 * KiB, max: 1024 * KiB } });
    for (let offset = 0; offset < 2048 * KiB; offset += 4 * KiB) await store.read(offset, 4 * KiB);
    // Each sequential miss doubles the window: 128K, 256K, 512K, then the 1M maximum.
    expect(logged('random.img', before).map((r) => r.range)).toEqual([
      'bytes=0-65535',
      'bytes=65536-262143',
      'bytes=262144-589823',
      'bytes=589824-1179647',
      'bytes=1179648-2293759',
    ]);
    // Blocks are handed out as they arrive, so a read may wait for a block still in flight; at most one read per
    // block waits.
    expect(store.stats().hitRate).toBeGreaterThanOrEqual(480 / 512);
    // A jump: only the demanded block, and the next sequential miss starts over at the initial window.
    const mark = nginx.requests().length;
    await store.read(2800 * KiB, 4 * KiB);
    await store.read(2804 * KiB, 4 * KiB);
    for (let offset = 2808 * KiB; offset < 2880 * KiB; offset += 4 * KiB) await store.read(offset, 4 * KiB);
    expect(logged('random.img', mark).map((r) => r.range)).toEqual(['bytes=2818048-2883583', 'bytes=2883584-3080191']);
    // The window never reads past the end of the file.
    await store.read(truth.length - 10, 100);
    const last = logged('random.img').at(-1)!;
    expect(last.range).toBe(`bytes=${3072 * KiB}-${truth.length - 1}`);
  });

  it('a miss elsewhere takes the absent blocks of its aligned chunk in the same request (missChunk)', async () => {
    const before = nginx.requests().length;
    const store = await HttpStore.open(`${nginx.url}random.img`, { blockSize: 64 * KiB, readahead: false, missChunk: 256 * KiB });
    const check = async (offset: number, length: number) => expect(Buffer.from(await store.read(offset, length)).equals(truth.subarray(offset, offset + length))).toBe(true);
    // Block 5: its chunk is blocks 4-7, all absent.
    await check(5 * 64 * KiB + 10, 100);
    await check(6 * 64 * KiB, 100);
    // Block 2: chunk 0-3, block 0 came with the open, so 1-3.
    await check(2 * 64 * KiB + 5, 100);
    // Blocks 7-8, 7 held: only 8 (the chunk never adds a request of its own or reaches backwards past a held block).
    await check(8 * 64 * KiB - 50, 100);
    expect(logged('random.img', before).map((r) => r.range)).toEqual(['bytes=0-65535', 'bytes=262144-524287', 'bytes=65536-262143', 'bytes=524288-589823']);
    // The boot tuning the CLI and the tab use: a chunk of two default blocks, readahead from 1 MiB.
    expect(BOOT_HTTP_OPTIONS).toEqual({ readahead: { initial: 1024 * KiB, max: 4096 * KiB }, missChunk: 512 * KiB });
  });

  it('resolves a relative backing name against the overlay URL and reads the chain like qemu-img', async () => {
    const chain = tempDir('qcow86-http-chain-');
    await makeImage({ path: join(chain, 'base.qcow2'), size: '8M' }, [{ offset: 0, length: 3 * 1024 * KiB, pattern: 0x5a }]);
    await makeImage({ path: join(chain, 'top.qcow2'), size: '8M', backing: 'base.qcow2', backingFormat: 'qcow2' }, [{ offset: 1024 * KiB, length: 64 * KiB, pattern: 0x33 }]);
    const served = await startNginx(chain);
    try {
      const top = await HttpStore.open(`${served.url}top.qcow2`);
      const device = await openImage(top, { resolver: httpResolver() });
      const expected = join(chain, 'flat.raw');
      await qemuImg(['convert', '-O', 'raw', join(chain, 'top.qcow2'), expected]);
      const flat = await FileStore.open(expected);
      for (const offset of [0, 1024 * KiB, 3 * 1024 * KiB - 512, 7 * 1024 * KiB]) {
        const got = await device.read(offset, 64 * KiB);
        expect(Buffer.from(got).equals(Buffer.from(await flat.read(offset, 64 * KiB)))).toBe(true);
      }
      await flat.close();
      const resolved = await httpResolver().open('base.qcow2', top, { readOnly: true });
      expect(resolved.fullName).toBe(`${served.url}base.qcow2`);
      expect(resolved.identity).toBe(`${served.url}base.qcow2`);
      expect(resolved.store.validator).toMatch(/^"[0-9a-f]+-[0-9a-f]+"$/);
      expect(served.requests().every((request) => request.status === 206)).toBe(true);
      // The validator an overlay recorded for its base travels with the open.
      await expect(httpResolver().open('base.qcow2', top, { readOnly: true, expectedValidator: '"0-0"' })).rejects.toThrow(/not the version recorded earlier/);
      await expect(httpResolver().open('base.qcow2', top, { readOnly: true, expectedValidator: resolved.store.validator })).resolves.toBeTruthy();
      await expect(httpResolver().open('base.qcow2', top, { readOnly: false })).rejects.toThrow(/read-only/);
      await expect(httpResolver().open('../../elsewhere/x.qcow2', top, { readOnly: true })).rejects.toThrow(`${served.url.replace(/\/$/, '')}/elsewhere/x.qcow2: not found (404)`);
    } finally {
      await served.close();
    }
  });
});

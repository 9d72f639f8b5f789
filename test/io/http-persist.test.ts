/**
 * HttpStore with a persistent block store (what a reloaded tab uses, there on OPFS) against a real nginx: a
 * reopen costs one conditional request answered 304 with no body and every byte then comes from the stored
 * blocks; a base that changed on the server (new content, new strong ETag) is fetched anew and the old blocks
 * are never served; a recorded validator that no longer matches is still refused with the same message.
 * The store's file is a plain Node file here, behind the same synchronous interface OPFS's sync handle has.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { closeSync, existsSync, fstatSync, readFileSync, fsyncSync, ftruncateSync, openSync, readSync, statSync, utimesSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { startNginx, type NginxServer } from '../helpers/nginx.js';
import { tempDir } from '../helpers/qemu.js';
import { HttpStore } from '../../src/io/http.js';
import { HEADER_BYTES, PersistentBlocks, lastUsedOf, type SyncFile } from '../../src/io/persistent-blocks.js';

const KiB = 1024;
const BLOCK = 64 * KiB;
const dir = tempDir('qcow86-http-persist-');
const image = join(dir, 'base.img');
let truth = randomBytes(40 * BLOCK + 777);
writeFileSync(image, truth);
let nginx: NginxServer;
let url: string;

beforeAll(async () => {
  nginx = await startNginx(dir);
  url = `${nginx.url}base.img`;
});
afterAll(async () => {
  await nginx?.close();
});

function nodeSyncFile(path: string): SyncFile {
  const fd = openSync(path, existsSync(path) ? 'r+' : 'w+');
  return {
    read: (buffer, { at }) => {
      let got = 0;
      while (got < buffer.length) {
        const n = readSync(fd, buffer, got, buffer.length - got, at + got);
        if (n === 0) break;
        got += n;
      }
      return got;
    },
    write: (buffer, { at }) => writeSync(fd, buffer, 0, buffer.length, at),
    truncate: (size) => ftruncateSync(fd, size),
    getSize: () => fstatSync(fd).size,
    flush: () => fsyncSync(fd),
    close: () => closeSync(fd),
  };
}

const logged = (since: number) => nginx.requests().slice(since).filter((r) => r.uri === '/base.img');
const options = { blockSize: BLOCK, readahead: false as const, retries: 0 };

/** Reads the whole image in a shuffled order of 10 KiB pieces and returns it. */
async function readAll(store: HttpStore, size: number): Promise<Uint8Array> {
  const out = new Uint8Array(size);
  const starts: number[] = [];
  for (let at = 0; at < size; at += 10 * KiB) starts.push(at);
  for (let i = starts.length - 1; i > 0; i--) {
    const j = (i * 7919) % (i + 1);
    [starts[i], starts[j]] = [starts[j]!, starts[i]!];
  }
  for (const at of starts) out.set(await store.read(at, Math.min(10 * KiB, size - at)), at);
  return out;
}

describe('HttpStore with persistent blocks', () => {
  const blocksPath = join(dir, 'base.blocks');

  it('a first open fetches and keeps every block it reads', async () => {
    const before = nginx.requests().length;
    const persist = PersistentBlocks.open(nodeSyncFile(blocksPath));
    expect(persist.stored).toBeUndefined();
    const store = await HttpStore.open(url, { ...options, persist });
    expect(Buffer.from(await readAll(store, truth.length)).equals(truth)).toBe(true);
    expect(store.stats().bytesRestored).toBe(0);
    await store.close();
    const requests = logged(before);
    expect(requests.every((r) => r.status === 206)).toBe(true);
    expect(requests.reduce((sum, r) => sum + r.bytes, 0)).toBe(truth.length);
    const reopened = PersistentBlocks.open(nodeSyncFile(blocksPath));
    expect(reopened.stored).toMatchObject({ url, size: truth.length, blockSize: BLOCK });
    expect(reopened.count).toBe(41);
    reopened.close();
  });

  it('a reopen costs one 304 with no body; every byte comes from the stored blocks', async () => {
    const before = nginx.requests().length;
    const store = await HttpStore.open(url, { ...options, persist: PersistentBlocks.open(nodeSyncFile(blocksPath)) });
    expect(Buffer.from(await readAll(store, truth.length)).equals(truth)).toBe(true);
    expect(store.stats()).toMatchObject({ requests: 1, bytesFetched: 0, bytesRestored: truth.length });
    await store.close();
    expect(logged(before)).toEqual([expect.objectContaining({ status: 304, range: `bytes=0-${BLOCK - 1}`, bytes: 0 })]);
  });

  it('discarded while the store is open (the site\'s storage is full), the blocks are gone and none is kept again', async () => {
    const path = join(dir, 'discard.blocks');
    const first = await HttpStore.open(url, { ...options, persist: PersistentBlocks.open(nodeSyncFile(path)) });
    await readAll(first, truth.length);
    await first.close();
    expect(statSync(path).size).toBeGreaterThan(truth.length);
    const persist = PersistentBlocks.open(nodeSyncFile(path));
    const store = await HttpStore.open(url, { ...options, persist });
    expect(Buffer.from(await store.read(0, 100)).equals(truth.subarray(0, 100))).toBe(true);
    persist.discard();
    expect(statSync(path).size).toBe(0);
    // The store goes on over the network, with the right bytes, and writes nothing to the discarded file.
    expect(Buffer.from(await readAll(store, truth.length)).equals(truth)).toBe(true);
    expect(store.stats().bytesFetched).toBeGreaterThan(0);
    await store.close();
    persist.close();
    expect(statSync(path).size).toBe(0);
  });

  it('blocks written but never committed (a crash) are not used', async () => {
    const path = join(dir, 'crash.blocks');
    const file = nodeSyncFile(path);
    const persist = PersistentBlocks.open(file);
    persist.use({ url, validator: '"v1"', size: truth.length, blockSize: BLOCK });
    persist.write(0, truth.subarray(0, BLOCK));
    persist.write(1, truth.subarray(BLOCK, 2 * BLOCK));
    persist.commit();
    persist.write(2, truth.subarray(2 * BLOCK, 3 * BLOCK));
    file.close(); // no commit: the bit of block 2 was never written
    const again = PersistentBlocks.open(nodeSyncFile(path));
    expect([again.has(0), again.has(1), again.has(2)]).toEqual([true, true, false]);
    expect(Buffer.from(again.read(1)!).equals(truth.subarray(BLOCK, 2 * BLOCK))).toBe(true);
    expect(again.read(2)).toBeUndefined();
    again.close();
  });

  it('the header records when the store was last opened (which bases\' blocks the browser keeps goes by it)', async () => {
    const path = join(dir, 'used.blocks');
    const header = () => readFileSync(path).subarray(0, HEADER_BYTES);
    const persist = PersistentBlocks.open(nodeSyncFile(path));
    const before = Date.now();
    persist.use({ url: 'http://example/base.qcow2', validator: '"v1"', size: 3 * BLOCK, blockSize: BLOCK });
    persist.write(0, new Uint8Array(BLOCK).fill(7));
    persist.close();
    expect(lastUsedOf(header())).toBeGreaterThanOrEqual(before);
    const reopened = PersistentBlocks.open(nodeSyncFile(path));
    reopened.touch(before + 86_400_000);
    reopened.close();
    expect(lastUsedOf(header())).toBe(before + 86_400_000);
    // The stamp lives after the version line: the store still opens with its version.
    const again = PersistentBlocks.open(nodeSyncFile(path));
    expect(again.stored?.validator).toBe('"v1"');
    again.close();
    // Files that are not block stores (or older ones without a stamp) count as never used.
    expect(lastUsedOf(new Uint8Array(HEADER_BYTES))).toBe(0);
  });

  it('a damaged header makes an empty store', async () => {
    const path = join(dir, 'damaged.blocks');
    writeFileSync(path, Buffer.from('qcow86-blocks 1\n{"url": "x", "valid'));
    const persist = PersistentBlocks.open(nodeSyncFile(path));
    expect(persist.stored).toBeUndefined();
    expect(persist.read(0)).toBeUndefined();
    persist.close();
  });

  it('a base that changed on the server (new ETag) is fetched anew: no stored block of the old version is served', async () => {
    const old = truth;
    truth = randomBytes(old.length);
    writeFileSync(image, truth);
    // nginx's ETag is mtime-size: same size, so move the mtime to be sure the ETag changes.
    const later = new Date(Date.now() + 60_000);
    utimesSync(image, later, later);
    const before = nginx.requests().length;
    const persist = PersistentBlocks.open(nodeSyncFile(blocksPath));
    const oldValidator = persist.stored!.validator;
    const store = await HttpStore.open(url, { ...options, persist });
    expect(store.validator).not.toBe(oldValidator);
    const read = Buffer.from(await readAll(store, truth.length));
    expect(read.equals(truth)).toBe(true);
    expect(store.stats().bytesRestored).toBe(0);
    await store.close();
    const requests = logged(before);
    expect(requests[0]).toMatchObject({ status: 206, bytes: BLOCK });
    expect(requests.reduce((sum, r) => sum + r.bytes, 0)).toBe(truth.length);
    const kept = PersistentBlocks.open(nodeSyncFile(blocksPath));
    expect(kept.stored?.validator).toBe(store.validator);
    expect(Buffer.from(kept.read(0)!).equals(truth.subarray(0, BLOCK))).toBe(true);
    kept.close();
    // An overlay recorded the old version: still refused with the readable message, whatever is stored.
    await expect(HttpStore.open(url, { ...options, persist: PersistentBlocks.open(nodeSyncFile(blocksPath)), expectedValidator: oldValidator })).rejects.toThrow(
      /not the version recorded earlier \(recorded .*\): it changed on the server/,
    );
  });

  it('a change while open fails the store and empties the persistent blocks', async () => {
    const path = join(dir, 'midway.blocks');
    const store = await HttpStore.open(url, { ...options, persist: PersistentBlocks.open(nodeSyncFile(path)) });
    expect(Buffer.from(await store.read(BLOCK, 100)).equals(truth.subarray(BLOCK, BLOCK + 100))).toBe(true);
    writeFileSync(image, randomBytes(truth.length));
    const later = new Date(Date.now() + 120_000);
    utimesSync(image, later, later);
    await expect(store.read(5 * BLOCK, 100)).rejects.toThrow(/changed on the server during this session/);
    await store.close();
    const after = PersistentBlocks.open(nodeSyncFile(path));
    expect(after.stored).toBeUndefined();
    expect(after.count).toBe(0);
    after.close();
  });
});

/**
 * The base image's byte store for the tab. TEMPORARY: a plain Range reader standing in until src/io/http.ts
 * (HttpStore: cache, readahead, coalescing, retries) lands; then this file only adapts its progress events.
 */
import type { ByteStore } from '../qcow2/store.js';
import { ReadOnlyError, StoreError } from '../qcow2/errors.js';

export interface BaseStats {
  fetched: number;
  size: number;
  requests: number;
  hits: number;
  misses: number;
}

const stats = new WeakMap<ByteStore, BaseStats>();

export function baseStats(store: ByteStore): BaseStats {
  return stats.get(store) ?? { fetched: 0, size: 0, requests: 0, hits: 0, misses: 0 };
}

export async function openBaseStore(url: string): Promise<ByteStore> {
  const counters: BaseStats = { fetched: 0, size: 0, requests: 0, hits: 0, misses: 0 };
  const get = async (offset: number, end: number, validator?: string): Promise<Response> => {
    counters.requests++;
    const headers: Record<string, string> = { Range: `bytes=${offset}-${end - 1}` };
    if (validator) headers['If-Range'] = validator;
    const response = await fetch(url, { headers, cache: 'no-store' });
    if (response.status !== 206) throw new StoreError(url, `expected 206 Partial Content, got ${response.status}`);
    return response;
  };
  const first = await get(0, 512);
  const range = /\/(\d+)$/.exec(first.headers.get('Content-Range') ?? '');
  if (!range) throw new StoreError(url, 'the server sent no Content-Range size');
  const size = Number(range[1]);
  const etag = first.headers.get('ETag') ?? undefined;
  const validator = etag && !etag.startsWith('W/') ? etag : undefined;
  counters.size = size;
  counters.fetched += (await first.arrayBuffer()).byteLength;
  const store: ByteStore = {
    name: url,
    readOnly: true,
    validator,
    size: async () => size,
    async read(offset, length) {
      const end = Math.min(size, offset + length);
      if (offset >= end) return new Uint8Array(0);
      counters.misses++;
      const response = await get(offset, end, validator);
      if (validator && response.headers.get('ETag') !== validator) throw new StoreError(url, `the base image has changed on the server (ETag was ${validator}, now ${response.headers.get('ETag')})`);
      const bytes = new Uint8Array(await response.arrayBuffer());
      counters.fetched += bytes.length;
      if (bytes.length !== end - offset) throw new StoreError(url, `short body: ${bytes.length} of ${end - offset} bytes`);
      return bytes;
    },
    write: async () => {
      throw new ReadOnlyError(url, 'the base image is read-only');
    },
    truncate: async () => {
      throw new ReadOnlyError(url, 'the base image is read-only');
    },
    flush: async () => {},
    close: async () => {},
  };
  stats.set(store, counters);
  return store;
}

/**
 * The base image's byte store for the tab: the shared HttpStore (block cache, coalescing, readahead, retries,
 * pinned validator), plus the figures the status panel shows.
 */
import type { ByteStore } from '../qcow2/store.js';
import { HttpStore } from '../io/http.js';

export interface BaseStats {
  fetched: number;
  size: number;
  requests: number;
  hits: number;
  misses: number;
}

export function baseStats(store: ByteStore): BaseStats {
  if (!(store instanceof HttpStore)) return { fetched: 0, size: 0, requests: 0, hits: 0, misses: 0 };
  const stats = store.stats();
  return { fetched: stats.bytesFetched, size: stats.size, requests: stats.requests, hits: stats.hits, misses: stats.misses };
}

export async function openBaseStore(url: string): Promise<ByteStore> {
  return HttpStore.open(url);
}

/**
 * The base image's byte store for the tab: the shared HttpStore (block cache, coalescing, readahead, retries,
 * pinned validator, blocks kept in OPFS across reloads), plus the figures the status panel shows.
 */
import type { ByteStore } from '../qcow2/store.js';
import { BOOT_HTTP_OPTIONS, HttpStore } from '../io/http.js';
import { opfsPersistentBlocks } from '../io/opfs.js';
import type { PersistentBlocks } from '../io/persistent-blocks.js';

export interface BaseStats {
  fetched: number;
  /** Bytes read from the blocks this browser kept from earlier sessions (OPFS) instead of the network. */
  restored: number;
  size: number;
  requests: number;
  hits: number;
  misses: number;
}

export function baseStats(store: ByteStore): BaseStats {
  if (!(store instanceof HttpStore)) return { fetched: 0, restored: 0, size: 0, requests: 0, hits: 0, misses: 0 };
  const stats = store.stats();
  return { fetched: stats.bytesFetched, restored: stats.bytesRestored, size: stats.size, requests: stats.requests, hits: stats.hits, misses: stats.misses };
}

/**
 * Opens the base tuned for booting, as the CLI does, with its blocks kept in OPFS: a reload (or a Reset disk) reads the blocks this browser already
 * fetched from there, after one conditional request confirms the server still has that version.
 */
export async function openBaseStore(url: string): Promise<{ store: ByteStore; kept: PersistentBlocks | undefined }> {
  const kept = await opfsPersistentBlocks(url);
  return { store: await HttpStore.open(url, { ...BOOT_HTTP_OPTIONS, persist: kept }), kept };
}

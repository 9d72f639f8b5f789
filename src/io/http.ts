/**
 * A read-only byte store over HTTP Range requests: the lazily fetched base image. The same code runs in
 * browsers, Workers and Node 20 (global fetch and AbortController only).
 *
 * The file is read in fixed blocks kept in an LRU cache under a byte budget. A read that misses turns its
 * missing blocks into as few requests as possible (adjacent misses coalesce, up to a size cap), joins requests
 * already in flight for the same blocks, and, while access is sequential, extends the last request with a
 * readahead window that doubles per miss. The image's version is pinned at open (strong ETag, or Last-Modified
 * + size) and every response is checked against it, so bytes of two versions are never combined.
 *
 * With a persistent block store (e.g. in the browser's OPFS), blocks fetched in an earlier session are reused:
 * the first request then carries If-None-Match with the stored strong ETag, a 304 confirms the stored blocks are
 * of the version the server has now, and any other answer empties the store before a byte of it is used.
 */
import type { ByteStore, ResolveOptions, StoreResolver } from '../qcow2/store.js';
import { HttpError, ReadOnlyError } from '../qcow2/errors.js';
import { BlockCache } from './block-cache.js';
import { fetchRange, isVersionChange, type Pinned, type RangeContext } from './http-range.js';
import { Readahead, type ReadaheadOptions } from './readahead.js';
import type { PersistentBlocks } from './persistent-blocks.js';

export interface HttpStoreOptions {
  /**
   * Cache and request granularity in bytes (default 256 KiB). A file system's scattered reads cluster: a boot of
   * the default guest touches its ext4 root in a few MiB, and 256 KiB blocks take it in about half the requests
   * of 64 KiB ones for some 10% more bytes (bench/boot-http.mjs).
   */
  blockSize?: number;
  /** Byte budget of the block cache (default 64 MiB). */
  cacheBytes?: number;
  /** Sequential readahead window in bytes, or false for none (default 512 KiB doubling to 4 MiB). */
  readahead?: ReadaheadOptions | false;
  /**
   * A miss that does not continue the previous read fetches every absent block of its aligned chunk of this many
   * bytes (default 0: the demanded blocks only; BOOT_HTTP_OPTIONS uses 512 KiB).
   */
  missChunk?: number;
  /** Largest single request in bytes when coalescing misses (default 8 MiB). */
  maxRequestBytes?: number;
  /** Per attempt, the longest wait for the response or for the next body chunk (default 30 s). */
  timeoutMs?: number;
  /**
   * Per attempt, a total deadline too: four timeoutMs, or timeoutMs plus the body's length at this rate (default
   * 32 KiB/s) when longer, so a server that trickles bytes cannot hold a read for ever.
   */
  minBytesPerSecond?: number;
  /** Further attempts for network errors, timeouts, short bodies, 408, 429 and 5xx (default 4). */
  retries?: number;
  /** First retry delay, doubling per retry (default 250 ms). */
  backoffMs?: number;
  /** Cancels the store: every request in flight and every later read fails with the signal's reason. */
  signal?: AbortSignal;
  /** The validator recorded earlier (e.g. in an overlay): open refuses a different one unless `force`. */
  expectedValidator?: string | undefined;
  force?: boolean;
  /** Called after every request (and retry) with fresh statistics, for progress displays. */
  onProgress?: (stats: HttpStats) => void;
  /** Replaces the global fetch (tests, custom agents). */
  fetch?: typeof fetch;
  /**
   * Blocks kept across sessions; the store takes it over (closes it). Used only with a strong ETag; any failure
   * of it (quota, I/O) turns it off and reads go on over the network.
   */
  persist?: PersistentBlocks | undefined;
}

export interface HttpStats {
  url: string;
  size: number;
  /** HTTP requests sent, retries included. */
  requests: number;
  retries: number;
  /** Body bytes received. */
  bytesFetched: number;
  /** read() calls that needed bytes. */
  reads: number;
  /** Reads served entirely from the cache. */
  hits: number;
  /** Reads that waited for the network (their own request or one already in flight). */
  misses: number;
  /** hits / reads (0 before any read). */
  hitRate: number;
  cachedBytes: number;
  /** Requests currently in flight. */
  inFlight: number;
  /** The current readahead window in bytes. */
  readahead: number;
  /** Bytes taken from the persistent block store instead of the network. */
  bytesRestored: number;
}

interface Counters {
  requests: number;
  retries: number;
  bytesFetched: number;
  reads: number;
  hits: number;
  misses: number;
  inFlight: number;
  bytesRestored: number;
}

const DEFAULTS = {
  blockSize: 256 * 1024,
  cacheBytes: 64 * 1024 * 1024,
  readahead: { initial: 512 * 1024, max: 4 * 1024 * 1024 },
  missChunk: 0,
  maxRequestBytes: 8 * 1024 * 1024,
  timeoutMs: 30_000,
  minBytesPerSecond: 32 * 1024,
  retries: 4,
  backoffMs: 250,
};

/**
 * The tuning for a guest booting from the store (the CLI's `boot --base URL` and the browser tab use the same):
 * a first sequential miss fetches 1 MiB more, doubling to 4 MiB, and a miss elsewhere takes the absent blocks of
 * its aligned 512 KiB with it. A boot's scattered reads cluster: the default guest's last burst (its root file
 * system's tail) jumps around 1.4 MiB of the base, and a block's neighbour is wanted soon after in most such
 * misses. Booting the default guest to its prompt over nginx takes 8, 10 and 12 requests on its compressed
 * base, an uncompressed qcow2 and the raw disk (raw: 10.25 MiB, 1.10x what the guest reads); replaying the same
 * reads with the plain defaults takes 12, 14 and 15 requests for no fewer bytes.
 */
export const BOOT_HTTP_OPTIONS: Readonly<Pick<HttpStoreOptions, 'readahead' | 'missChunk'>> = {
  readahead: { initial: 1024 * 1024, max: 4 * 1024 * 1024 },
  missChunk: 512 * 1024,
};

export class HttpStore implements ByteStore {
  readonly readOnly = true;
  private readonly cache: BlockCache;
  private readonly pending = new Map<number, Promise<Uint8Array>>();
  private readonly readahead: Readahead;
  /** Set once the image is seen to have changed (or the store is closed): every later read fails with it. */
  private failure: Error | undefined;

  private constructor(
    readonly name: string,
    /** The pinned version: the strong ETag verbatim, or `pin:SIZE:HASH` of the first block without one. */
    readonly validator: string | undefined,
    private readonly pinned: Pinned,
    private readonly ctx: RangeContext,
    private readonly closer: AbortController,
    private readonly counters: Counters,
    private readonly options: Required<Pick<HttpStoreOptions, 'blockSize' | 'maxRequestBytes' | 'missChunk'>> & Pick<HttpStoreOptions, 'onProgress'>,
    cacheBytes: number,
    readahead: ReadaheadOptions,
    private persist: PersistentBlocks | undefined,
  ) {
    this.cache = new BlockCache(cacheBytes);
    this.readahead = new Readahead(readahead);
  }

  /** Opens `url` with one small ranged request that yields the size, the validator and the first block. */
  /** Names earlier qcow86 versions recorded for this version (`lm:SIZE:LAST-MODIFIED`): they still match it. */
  legacyValidators: readonly string[] = [];

  static async open(url: string, options: HttpStoreOptions = {}): Promise<HttpStore> {
    const blockSize = options.blockSize ?? DEFAULTS.blockSize;
    if (!Number.isInteger(blockSize) || blockSize < 512) throw new RangeError(`blockSize must be an integer >= 512, not ${blockSize}`);
    const closer = new AbortController();
    const outer = options.signal;
    if (outer) {
      if (outer.aborted) throw outer.reason;
      const forward = () => closer.abort(outer.reason);
      outer.addEventListener('abort', forward, { once: true });
      // A long-lived caller signal must not keep closed stores alive.
      closer.signal.addEventListener('abort', () => outer.removeEventListener('abort', forward), { once: true });
    }
    const counters: Counters = { requests: 0, retries: 0, bytesFetched: 0, reads: 0, hits: 0, misses: 0, inFlight: 0, bytesRestored: 0 };
    // Progress reports start once the store exists; the first request only counts.
    let notify = () => {};
    const ctx: RangeContext = {
      url,
      fetch: options.fetch ?? globalThis.fetch.bind(globalThis),
      timeoutMs: options.timeoutMs ?? DEFAULTS.timeoutMs,
      minBytesPerSecond: options.minBytesPerSecond ?? DEFAULTS.minBytesPerSecond,
      retries: options.retries ?? DEFAULTS.retries,
      backoffMs: options.backoffMs ?? DEFAULTS.backoffMs,
      signal: closer.signal,
      onRequest: () => void counters.requests++,
      onBytes: (count) => {
        counters.bytesFetched += count;
        notify();
      },
      onRetry: () => {
        counters.retries++;
        notify();
      },
    };
    let persist = options.persist;
    const held = persist?.stored;
    const reusable = held && held.url === url && held.blockSize === blockSize ? held : undefined;
    const fail = (error: unknown): never => {
      closer.abort();
      closeQuietly(persist);
      throw error;
    };
    const first = await fetchRange(ctx, 0, blockSize - 1, undefined, undefined, reusable?.validator).catch(fail);
    const strong = first.notModified ? reusable!.validator : first.etag && !first.etag.startsWith('W/') ? first.etag : undefined;
    const size = first.notModified ? reusable!.size : first.size;
    const pinned: Pinned = {
      size,
      etag: strong,
      weakEtag: strong ? undefined : first.etag,
      lastModified: strong ? undefined : first.lastModified,
    };
    // Without a strong ETag the version is pinned by its content: the size and a hash of the first block, which
    // every open reads anyway (for a qcow2 base, its header and tables). A weak ETag or a Last-Modified date alone
    // would let a base that changed on the server silently get an old overlay applied.
    const validator = strong ?? `pin:${size}:${contentHash(first.bytes)}`;
    const legacy = !strong && pinned.lastModified ? [`lm:${size}:${pinned.lastModified}`] : [];
    const matches = (recorded: string) => recorded === validator || legacy.includes(recorded);
    if (options.expectedValidator !== undefined && !matches(options.expectedValidator) && !options.force) {
      fail(new HttpError(url, `the image is not the version recorded earlier (recorded ${options.expectedValidator}, the server now has ${validator ?? 'no validator'}): it changed on the server; open with force to use it anyway`));
    }
    if (persist && !first.notModified) {
      // Another version (or none that can be named): the stored blocks go before any is used.
      try {
        if (strong) persist.use({ url, validator: strong, size, blockSize });
        else {
          persist.clear();
          persist.close();
          persist = undefined;
        }
      } catch {
        closeQuietly(persist);
        persist = undefined;
      }
    }
    const readahead = options.readahead === false ? { initial: 0, max: 0 } : (options.readahead ?? DEFAULTS.readahead);
    const settings = {
      blockSize,
      maxRequestBytes: Math.max(blockSize, options.maxRequestBytes ?? DEFAULTS.maxRequestBytes),
      missChunk: options.missChunk ?? DEFAULTS.missChunk,
      onProgress: options.onProgress,
    };
    const store = new HttpStore(url, validator, pinned, ctx, closer, counters, settings, options.cacheBytes ?? DEFAULTS.cacheBytes, readahead, persist);
    store.legacyValidators = legacy;
    notify = () => store.progress();
    if (first.bytes.length > 0) {
      store.cache.set(0, first.bytes);
      store.keep(0, first.bytes);
      store.commitKept();
    }
    store.progress();
    return store;
  }

  async size(): Promise<number> {
    return this.pinned.size;
  }

  stats(): HttpStats {
    const c = this.counters;
    return {
      url: this.name,
      size: this.pinned.size,
      requests: c.requests,
      retries: c.retries,
      bytesFetched: c.bytesFetched,
      reads: c.reads,
      hits: c.hits,
      misses: c.misses,
      hitRate: c.reads ? c.hits / c.reads : 0,
      cachedBytes: this.cache.bytes,
      inFlight: c.inFlight,
      readahead: this.readahead.current,
      bytesRestored: c.bytesRestored,
    };
  }

  /**
   * Reads [offset, offset + length), shorter at the end of the image. `signal` abandons this read only: a
   * request other reads share keeps going (the store-wide signal given at open cancels requests).
   */
  async read(offset: number, length: number, options: { signal?: AbortSignal } = {}): Promise<Uint8Array> {
    if (this.failure) throw this.failure;
    if (this.closer.signal.aborted) throw this.closer.signal.reason;
    if (!Number.isInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new RangeError(`${this.name}: cannot read ${length} bytes at offset ${offset}`);
    }
    // An offset past 2^53 (a damaged table entry) is past the end, as for every store: the clamp below returns nothing.
    const end = Math.min(this.pinned.size, offset + length);
    if (offset >= end) return new Uint8Array(0);
    const bs = this.options.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((end - 1) / bs);
    const known = new Map<number, Uint8Array | Promise<Uint8Array>>();
    let missing = false;
    let waits = false;
    for (let i = first; i <= last; i++) {
      const block = this.cache.get(i) ?? this.pending.get(i) ?? this.restore(i);
      if (block) {
        known.set(i, block);
        if (block instanceof Promise) waits = true;
      } else missing = true;
    }
    this.counters.reads++;
    if (missing || waits) this.counters.misses++;
    else this.counters.hits++;
    const ahead = this.readahead.next(offset, end, missing, bs);
    if (missing) {
      let from = first;
      let aheadLast = Math.min(this.blockCount() - 1, Math.floor((end - 1 + ahead) / bs));
      const chunkBlocks = Math.floor(this.options.missChunk / bs);
      if (!this.readahead.sequential && chunkBlocks > 1) {
        const chunkStart = Math.floor(first / chunkBlocks) * chunkBlocks;
        // Backwards only from an absent first block, so the chunk joins the demand's own request.
        if (!this.present(first)) while (from > chunkStart && !this.present(from - 1)) from--;
        aheadLast = Math.max(aheadLast, Math.min(this.blockCount() - 1, chunkStart + chunkBlocks - 1));
      }
      this.fetchMissing(from, last, aheadLast);
    }
    const parts: Array<Uint8Array | Promise<Uint8Array>> = [];
    for (let i = first; i <= last; i++) parts.push(known.get(i) ?? this.pending.get(i)!);
    const done = this.assemble(parts, first, offset, new Uint8Array(end - offset));
    return options.signal ? abortable(done, options.signal) : done;
  }

  private async assemble(parts: Array<Uint8Array | Promise<Uint8Array>>, first: number, offset: number, out: Uint8Array): Promise<Uint8Array> {
    const bs = this.options.blockSize;
    const blocks = await Promise.all(parts);
    let index = first;
    for (const block of blocks) {
      const blockStart = index * bs;
      const from = Math.max(offset, blockStart);
      const to = Math.min(offset + out.length, blockStart + block.length);
      out.set(block.subarray(from - blockStart, to - blockStart), from - offset);
      index++;
    }
    return out;
  }

  /**
   * Starts requests for the absent blocks of [first, last] in runs of adjacent blocks (capped at
   * maxRequestBytes), extending the final run into the readahead range up to `aheadLast` while blocks there are
   * absent too (and starts it earlier at `first` when the caller extends a miss to its chunk). Readahead never
   * starts a request of its own: it only lengthens one demand already needs.
   */
  private fetchMissing(first: number, last: number, aheadLast: number): void {
    const maxBlocks = Math.max(1, Math.floor(this.options.maxRequestBytes / this.options.blockSize));
    const limit = Math.max(last, aheadLast);
    const present = (i: number) => this.present(i);
    let i = first;
    while (i <= last) {
      if (present(i)) {
        i++;
        continue;
      }
      const runStart = i;
      while (i <= limit && !present(i) && i - runStart < maxBlocks) i++;
      this.startRun(runStart, i - 1);
    }
  }

  /**
   * One request for blocks [from, to]. Each block is handed out (and cached) as soon as its last byte arrives,
   * so a demanded block never waits for the readahead behind it.
   */
  private startRun(from: number, to: number): void {
    const bs = this.options.blockSize;
    const start = from * bs;
    const end = Math.min(this.pinned.size, (to + 1) * bs) - 1;
    const waiting: Array<{ resolve: (block: Uint8Array) => void; reject: (error: unknown) => void }> = [];
    for (let i = from; i <= to; i++) {
      const block = new Promise<Uint8Array>((resolve, reject) => waiting.push({ resolve, reject }));
      // Readahead blocks nobody waits for must not surface as unhandled rejections.
      block.catch(() => {});
      this.pending.set(i, block);
    }
    let delivered = 0;
    const deliver = (buffer: Uint8Array, filled: number) => {
      for (; from + delivered <= to; delivered++) {
        const blockEnd = Math.min((delivered + 1) * bs, end - start + 1);
        if (filled < blockEnd) break;
        // A copy, so the cache budget counts what is really retained (a view would pin the whole run).
        const block = buffer.slice(delivered * bs, blockEnd);
        this.cache.set(from + delivered, block);
        this.keep(from + delivered, block);
        this.pending.delete(from + delivered);
        waiting[delivered]!.resolve(block);
      }
    };
    this.counters.inFlight++;
    fetchRange(this.ctx, start, end, this.pinned, deliver)
      .then(
        ({ bytes }) => deliver(bytes, bytes.length),
        (error: unknown) => {
          if (isVersionChange(error)) {
            this.failure = error as Error;
            this.cache.clear();
            this.dropPersist(true);
          }
          for (let k = delivered; from + k <= to; k++) waiting[k]!.reject(error);
        },
      )
      .finally(() => {
        this.counters.inFlight--;
        for (let i = from + delivered; i <= to; i++) this.pending.delete(i);
        this.commitKept();
        this.progress();
      });
  }

  /** Held in memory, on its way, or in the persistent store. */
  private present(index: number): boolean {
    return this.cache.has(index) || this.pending.has(index) || (this.persist?.has(index) ?? false);
  }

  /** Block `index` from the persistent store (then held in memory too), or undefined. */
  private restore(index: number): Uint8Array | undefined {
    if (!this.persist) return undefined;
    try {
      const block = this.persist.read(index);
      if (block) {
        this.cache.set(index, block);
        this.counters.bytesRestored += block.length;
      }
      return block;
    } catch {
      this.dropPersist(false);
      return undefined;
    }
  }

  private keep(index: number, block: Uint8Array): void {
    try {
      this.persist?.write(index, block);
    } catch {
      this.dropPersist(false);
    }
  }

  private commitKept(): void {
    try {
      this.persist?.commit();
    } catch {
      this.dropPersist(false);
    }
  }

  /** Stops using the persistent store; `clear` also empties it (its version is no longer the server's). */
  private dropPersist(clear: boolean): void {
    const persist = this.persist;
    this.persist = undefined;
    if (!persist) return;
    try {
      if (clear) persist.clear();
    } catch {
      // Nothing more to do: it is closed below and never read again in this session.
    }
    closeQuietly(persist);
  }

  private blockCount(): number {
    return Math.ceil(this.pinned.size / this.options.blockSize);
  }

  private progress(): void {
    this.options.onProgress?.(this.stats());
  }

  async write(): Promise<void> {
    throw new ReadOnlyError(this.name, 'an HTTP image is read-only');
  }

  async truncate(): Promise<void> {
    throw new ReadOnlyError(this.name, 'an HTTP image is read-only');
  }

  async flush(): Promise<void> {}

  /** Cancels requests in flight; later reads fail. */
  async close(): Promise<void> {
    const closed = new HttpError(this.name, 'the store is closed');
    this.failure ??= closed;
    this.closer.abort(closed);
    this.cache.clear();
    this.dropPersist(false);
  }
}

function closeQuietly(persist: PersistentBlocks | undefined): void {
  try {
    persist?.close();
  } catch {
    // A store that cannot even close has nothing left to lose.
  }
}

function abortable<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise((resolve, reject) => {
    const abort = () => reject(signal.reason);
    signal.addEventListener('abort', abort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener('abort', abort));
  });
}

/** 64 bits (two 32-bit lanes) of a fast non-cryptographic hash, in hex: tells versions apart, no more. */
export function contentHash(bytes: Uint8Array): string {
  let a = 0x811c9dc5;
  let b = 0x9747b28c ^ bytes.length;
  for (let i = 0; i < bytes.length; i++) {
    a = Math.imul(a ^ bytes[i]!, 0x01000193);
    b = Math.imul(b ^ bytes[i]!, 0x5bd1e995);
    b ^= b >>> 15;
  }
  const mix = (h: number) => {
    h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
    h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
    return (h ^ (h >>> 16)) >>> 0;
  };
  return mix(a).toString(16).padStart(8, '0') + mix(b ^ a).toString(16).padStart(8, '0');
}

export function isHttpUrl(name: string): boolean {
  return /^https?:\/\//i.test(name);
}

export interface HttpResolveOptions extends ResolveOptions {
  expectedValidator?: string | undefined;
  force?: boolean | undefined;
}

export interface HttpResolver extends StoreResolver {
  open(name: string, relativeTo: ByteStore, options: HttpResolveOptions): Promise<{ store: HttpStore; fullName: string; identity: string }>;
}

/**
 * Resolves backing names for images reached over HTTP: a relative name is taken relative to the naming image's
 * URL (`new URL(name, base)`), an absolute URL stands alone. Everything opened is read-only. An
 * `expectedValidator` (and `force`) passed with a single open, e.g. the one an overlay recorded for its base,
 * overrides the resolver-wide options.
 */
export function httpResolver(options: HttpStoreOptions = {}): HttpResolver {
  return {
    async open(name, relativeTo, open) {
      let url: URL;
      try {
        url = new URL(name, isHttpUrl(relativeTo.name) ? relativeTo.name : undefined);
      } catch (error) {
        throw new HttpError(relativeTo.name, `cannot resolve '${name}' as a URL`, undefined, { cause: error });
      }
      if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new HttpError(relativeTo.name, `'${name}' is not an http(s) URL`);
      url.hash = '';
      if (!open.readOnly) throw new ReadOnlyError(url.href, 'an HTTP image can only be opened read-only');
      const perOpen = open.expectedValidator === undefined ? {} : { expectedValidator: open.expectedValidator, force: open.force ?? options.force ?? false };
      const store = await HttpStore.open(url.href, { ...options, ...perOpen });
      return { store, fullName: url.href, identity: url.href };
    },
  };
}

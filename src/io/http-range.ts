/**
 * One validated `bytes=a-b` request, with retries. Every response is checked against what a ranged read of this
 * exact version of the image must look like before a byte of it is used: 206, no Content-Encoding, not HTML,
 * the Content-Range asked for with the pinned total size, the pinned validator, and a body of exactly that
 * length. Runs on the platform's global fetch (browsers, Workers, Node 20): no Node imports here.
 */
import { HttpError } from '../qcow2/errors.js';

/** What identifies the version of the image pinned at open. */
export interface Pinned {
  size: number;
  /** Strong ETag: sent as If-Range and compared on every response. */
  etag?: string | undefined;
  /** Weak ETag: never sent as If-Range (RFC 9110 forbids it) but a change is still a change. */
  weakEtag?: string | undefined;
  lastModified?: string | undefined;
}

export interface RangeContext {
  url: string;
  fetch: typeof fetch;
  /** Per attempt: the longest wait for the response or the next body chunk (an idle timeout). */
  timeoutMs: number;
  /**
   * Per attempt, a total deadline as well: four idle timeouts, or timeoutMs plus the time the body takes at this
   * many bytes a second if that is longer, so a server that trickles a byte now and then cannot hold a read for ever.
   */
  minBytesPerSecond: number;
  /** Further attempts after the first for network errors, timeouts, short bodies, 408, 429 and 5xx. */
  retries: number;
  /** Delay before the first retry; doubles for each further one. */
  backoffMs: number;
  /** Aborts every request of the store (close(), or the caller's signal given at open). */
  signal: AbortSignal;
  /** Called once per HTTP request sent (retries included), then with the body bytes received. */
  onRequest(): void;
  onBytes(count: number): void;
  onRetry(error: Error): void;
}

/**
 * Sees the body as it arrives: `buffer` holds the range's first `filled` bytes. The headers were validated
 * before the first call, so those bytes are the pinned version's; a retry starts again at filled = 0.
 */
export type DataCallback = (buffer: Uint8Array, filled: number) => void;

export interface RangeResult {
  bytes: Uint8Array;
  /** The total size from Content-Range. */
  size: number;
  etag: string | undefined;
  lastModified: string | undefined;
  /** The server answered 304 to `ifNoneMatch`: the caller already holds this version (no bytes, size unknown). */
  notModified?: boolean;
}

/** An error worth another attempt: the network or the server had a bad moment. */
class Transient extends HttpError {
  constructor(url: string, readonly detail: string, status?: number, options?: { cause?: unknown }) {
    super(url, detail, status, options);
  }
}

/**
 * Whether `error` is a failure of the network or the server that may pass (a connection refused, a timeout, a 5xx
 * ...), retried or given up on after the retries: a caller may try again later. Refusals (a redirect, a changed
 * image, a 404) are not.
 */
export function isPassingFailure(error: unknown): boolean {
  return error instanceof Transient || (error instanceof HttpError && (error as { cause?: unknown }).cause instanceof Transient);
}

const CONTENT_RANGE = /^bytes\s+(\d+)-(\d+)\/(\d+|\*)$/i;
const UNSATISFIED_RANGE = /^bytes\s+\*\/(\d+)$/i;

/**
 * Fetches bytes [start, end] (inclusive). With `pinned`, the response must belong to that version and cover the
 * range exactly; without it (the first request of a store) the server may shorten the range at the end of the
 * file, and the result carries the size and validators to pin.
 */
export async function fetchRange(ctx: RangeContext, start: number, end: number, pinned?: Pinned, onData?: DataCallback, ifNoneMatch?: string): Promise<RangeResult> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await attemptRange(ctx, start, end, pinned, onData, ifNoneMatch);
    } catch (error) {
      if (ctx.signal.aborted) throw ctx.signal.reason;
      if (!(error instanceof Transient)) throw error;
      if (attempt >= ctx.retries) {
        const tries = attempt + 1;
        throw new HttpError(ctx.url, `${error.detail} (gave up after ${tries} attempt${tries === 1 ? '' : 's'})`, error.status, { cause: error });
      }
      ctx.onRetry(error);
      await sleep(ctx.backoffMs * 2 ** attempt, ctx.signal);
    }
  }
}

async function attemptRange(ctx: RangeContext, start: number, end: number, pinned: Pinned | undefined, onData: DataCallback | undefined, ifNoneMatch: string | undefined): Promise<RangeResult> {
  const { url } = ctx;
  const range = `bytes=${start}-${end}`;
  const controller = new AbortController();
  // An idle timeout, re-armed by every body chunk: a large readahead over a slow link is not a stall. And a total
  // deadline that no trickle of bytes re-arms.
  let timedOut: 'idle' | 'deadline' | undefined;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      timedOut ??= 'idle';
      controller.abort();
    }, ctx.timeoutMs);
  };
  const deadlineMs = Math.max(4 * ctx.timeoutMs, ctx.timeoutMs + Math.ceil(((end - start + 1) / ctx.minBytesPerSecond) * 1000));
  const deadline = setTimeout(() => {
    timedOut ??= 'deadline';
    controller.abort();
  }, deadlineMs);
  const cancel = () => controller.abort(ctx.signal.reason);
  ctx.signal.addEventListener('abort', cancel);
  // Browsers drop Accept-Encoding (a forbidden header) and ask for identity on ranged requests themselves; Node's
  // fetch would otherwise offer gzip, and a compressed answer can never be a byte range of the image.
  const headers: Record<string, string> = { Range: range, 'Accept-Encoding': 'identity' };
  // If-Range turns a changed file into a 200 instead of a 206 of the new bytes, so no new byte passes as old.
  const ifRange = pinned?.etag ?? pinned?.lastModified;
  if (ifRange) headers['If-Range'] = ifRange;
  // Only on a first request (unpinned), from a caller holding blocks of that version: a 304 says they still fit.
  if (ifNoneMatch && !pinned) headers['If-None-Match'] = ifNoneMatch;
  let response: Response | undefined;
  try {
    ctx.onRequest();
    arm();
    try {
      response = await fetchFollowingSameOrigin(ctx, headers, controller.signal);
    } catch (error) {
      throw networkError(ctx, range, error, timedOut, deadlineMs);
    }
    if (ifNoneMatch && !pinned && response.status === 304) {
      const etag = response.headers.get('ETag') ?? undefined;
      await response.body?.cancel().catch(() => {});
      if (etag !== undefined && etag !== ifNoneMatch) throw new HttpError(url, `304 Not Modified for If-None-Match ${ifNoneMatch} carries another ETag ${etag}`, 304);
      return { bytes: new Uint8Array(0), size: -1, etag: ifNoneMatch, lastModified: response.headers.get('Last-Modified') ?? undefined, notModified: true };
    }
    if (!pinned && start === 0 && isEmptyFile(response)) {
      await response.body?.cancel().catch(() => {});
      return { bytes: new Uint8Array(0), size: 0, etag: response.headers.get('ETag') ?? undefined, lastModified: response.headers.get('Last-Modified') ?? undefined };
    }
    const { size, wantedEnd } = validateHeaders(ctx, range, start, end, response, pinned);
    const wanted = wantedEnd - start + 1;
    let bytes: Uint8Array;
    try {
      bytes = await readBody(url, response, wanted, (buffer, filled, count) => {
        arm();
        ctx.onBytes(count);
        onData?.(buffer, filled);
      });
    } catch (error) {
      if (error instanceof HttpError) throw error;
      throw networkError(ctx, range, error, timedOut, deadlineMs);
    }
    if (bytes.length < wanted) throw new Transient(url, `short body for ${range}: ${bytes.length} of ${wanted} bytes`, 206);
    if (!pinned && start === 0 && looksLikeHtml(bytes)) {
      throw new HttpError(url, 'the server returned an HTML page where image bytes were expected: is the URL right? (some servers answer a missing file with index.html)', 206);
    }
    return { bytes, size, etag: response.headers.get('ETag') ?? undefined, lastModified: response.headers.get('Last-Modified') ?? undefined };
  } catch (error) {
    // Free the connection of a refused response instead of letting its body trickle in.
    await response?.body?.cancel().catch(() => {});
    throw error;
  } finally {
    clearTimeout(timer);
    clearTimeout(deadline);
    ctx.signal.removeEventListener('abort', cancel);
  }
}

/** Redirects followed within the image's own origin; one to another origin is never followed. */
const MAX_REDIRECTS = 5;

/**
 * Sends the request with redirects handled here: the image's URL is what the user (or the overlay) named, and a
 * server must not be able to send the reader somewhere else. A browser hides where a redirect goes
 * ('opaqueredirect'), so there every redirect is refused.
 */
async function fetchFollowingSameOrigin(ctx: RangeContext, headers: Record<string, string>, signal: AbortSignal): Promise<Response> {
  let target = ctx.url;
  for (let hop = 0; ; hop++) {
    // no-store: a browser's HTTP cache may answer ranges from a different version than the one pinned.
    const response = await ctx.fetch(target, { headers, cache: 'no-store', signal, redirect: 'manual' });
    if (response.type === 'opaqueredirect') throw new HttpError(ctx.url, 'the server answered with a redirect, which is not followed: serve the image at the URL given');
    if (![301, 302, 303, 307, 308].includes(response.status)) return response;
    await response.body?.cancel().catch(() => {});
    const location = response.headers.get('Location');
    if (location === null) throw new HttpError(ctx.url, `redirect (${response.status}) without a Location`, response.status);
    let next: URL;
    try {
      next = new URL(location, target);
    } catch {
      throw new HttpError(ctx.url, `redirect (${response.status}) to an unusable Location '${location}'`, response.status);
    }
    if (next.origin !== new URL(ctx.url).origin) {
      throw new HttpError(ctx.url, `the server redirects to another origin (${next.href}): not followed`, response.status);
    }
    if (hop + 1 >= MAX_REDIRECTS) throw new HttpError(ctx.url, `more than ${MAX_REDIRECTS} redirects`, response.status);
    target = next.href;
  }
}

/**
 * A 0-byte file has no byte 0, so no server can answer the first request with a 206: RFC 9110 servers send
 * 416 whose Content-Range gives the size as 0, nginx sends the whole (empty) file as a 200 with Content-Length 0. Both
 * mean an empty image, which QEMU's curl driver opens as a valid 0-byte raw disk; so do we. A 200 with any
 * other length, or a 416 naming another size, is still the error it was.
 */
function isEmptyFile(response: Response): boolean {
  if (response.status === 416) return Number(UNSATISFIED_RANGE.exec((response.headers.get('Content-Range') ?? '').trim())?.[1] ?? NaN) === 0;
  const type = (response.headers.get('Content-Type') ?? '').toLowerCase();
  return response.status === 200 && response.headers.get('Content-Length') === '0' && !type.startsWith('text/html');
}

/** Everything about a response that can be checked before its body: returns the total size and the range end. */
function validateHeaders(ctx: RangeContext, range: string, start: number, end: number, response: Response, pinned: Pinned | undefined): { size: number; wantedEnd: number } {
  const { url } = ctx;
  const etag = response.headers.get('ETag') ?? undefined;
  const lastModified = response.headers.get('Last-Modified') ?? undefined;
  const type = (response.headers.get('Content-Type') ?? '').toLowerCase();
  // Before the status: a dev server answering a missing file with index.html sends 200, and "the server ignores
  // Range" would send the reader looking in the wrong place.
  if ((response.status === 200 || response.status === 206) && type.startsWith('text/html')) {
    throw new HttpError(url, `the server returned an HTML page (Content-Type: ${type}) where image bytes were expected: is the URL right? (some servers answer a missing file with index.html)`, response.status);
  }
  if (response.status !== 206) throw statusError(ctx, range, response, pinned, etag, lastModified);
  checkVersion(url, pinned, etag, lastModified);
  const encoding = response.headers.get('Content-Encoding');
  if (encoding && encoding.toLowerCase() !== 'identity') {
    throw new HttpError(url, `the server compressed the image (Content-Encoding: ${encoding}); disk images must be served without compression`, 206);
  }
  if (type.startsWith('multipart/')) throw new HttpError(url, `the server answered ${range} with a multipart body (${type})`, 206);
  const contentRange = response.headers.get('Content-Range') ?? '';
  const match = CONTENT_RANGE.exec(contentRange.trim());
  if (!match) {
    // A browser hides Content-Range from a cross-origin page unless the server exposes it.
    throw new HttpError(url, `206 response to ${range} has ${contentRange ? `an unusable Content-Range '${contentRange}'` : 'no Content-Range (a server on another origin must list it in Access-Control-Expose-Headers)'}`, 206);
  }
  const [gotStart, gotEnd] = [Number(match[1]), Number(match[2])];
  if (match[3] === '*') throw new HttpError(url, `the server does not say the image's size (Content-Range '${contentRange}')`, 206);
  const size = Number(match[3]);
  if (pinned && size !== pinned.size) throw changed(url, `its size went from ${pinned.size} to ${size} bytes`);
  // Only the first request (unpinned) may come back shorter: it asks for a block before the size is known.
  const wantedEnd = pinned ? end : Math.min(end, size - 1);
  if (gotStart !== start || gotEnd !== wantedEnd) {
    throw new HttpError(url, `asked for ${range}, the server sent bytes ${gotStart}-${gotEnd} (Content-Range '${contentRange}')`, 206);
  }
  return { size, wantedEnd };
}

/** Reads at most `wanted` bytes into one buffer; a longer body is refused as soon as it overflows. */
async function readBody(url: string, response: Response, wanted: number, onChunk: (buffer: Uint8Array, filled: number, count: number) => void): Promise<Uint8Array> {
  const out = new Uint8Array(wanted);
  if (!response.body) return out.subarray(0, 0);
  const reader = response.body.getReader();
  let got = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (got + value.length > wanted) {
      await reader.cancel().catch(() => {});
      throw new HttpError(url, `the body is longer than the ${wanted} bytes its Content-Range announced`, 206);
    }
    out.set(value, got);
    got += value.length;
    onChunk(out, got, value.length);
  }
  return got === wanted ? out : out.subarray(0, got);
}

function statusError(ctx: RangeContext, range: string, response: Response, pinned: Pinned | undefined, etag: string | undefined, lastModified: string | undefined): Error {
  const { url } = ctx;
  const status = response.status;
  if (status === 200) {
    // With If-Range, a 200 is how a server says the validator no longer matches: the file changed. A 200 that
    // still carries the pinned validator is the same file sent whole: the server ignored the Range.
    if (pinned) checkVersion(url, pinned, etag, lastModified);
    return new HttpError(url, `the server ignores Range requests: it answered ${range} with the whole file (200 OK); serve the image from a server that supports byte ranges`, 200);
  }
  if (status === 416) {
    const total = UNSATISFIED_RANGE.exec((response.headers.get('Content-Range') ?? '').trim());
    if (pinned && total && Number(total[1]) !== pinned.size) return changed(url, `its size went from ${pinned.size} to ${total[1]} bytes`);
    return new HttpError(url, `the server refused ${range} as not satisfiable (416)${total ? `; it says the file is ${total[1]} bytes` : ''}`, 416);
  }
  if (status >= 500 || status === 408 || status === 429) return new Transient(url, `the server answered ${range} with ${status} ${response.statusText}`.trimEnd(), status);
  if (status === 404 || status === 410) return new HttpError(url, `not found (${status})`, status);
  return new HttpError(url, `expected 206 Partial Content for ${range}, got ${status} ${response.statusText}`.trimEnd(), status);
}

/** Throws when a response's validators show another version than the pinned one. */
function checkVersion(url: string, pinned: Pinned | undefined, etag: string | undefined, lastModified: string | undefined): void {
  if (!pinned) return;
  const was = pinned.etag ?? pinned.weakEtag;
  if (was && etag && etag !== was) throw changed(url, `its ETag went from ${was} to ${etag}`);
  if (pinned.etag && !etag) throw changed(url, `it no longer has the ETag ${pinned.etag}`);
  if (pinned.lastModified && lastModified && lastModified !== pinned.lastModified) throw changed(url, `Last-Modified went from ${pinned.lastModified} to ${lastModified}`);
}

const versionChanges = new WeakSet<object>();

/** True for the error that says the image changed on the server: the store stays failed after it. */
export function isVersionChange(error: unknown): boolean {
  return typeof error === 'object' && error !== null && versionChanges.has(error);
}

function changed(url: string, how: string): HttpError {
  const error = new HttpError(url, `the image changed on the server during this session (${how}); refusing to mix bytes of two versions`);
  versionChanges.add(error);
  return error;
}

function networkError(ctx: RangeContext, range: string, error: unknown, timedOut: 'idle' | 'deadline' | undefined, deadlineMs: number): Error {
  if (ctx.signal.aborted) return ctx.signal.reason as Error;
  // A refusal made before the request left (a destination the fetch may not reach) is final.
  if (error instanceof HttpError) return error;
  if (timedOut === 'idle') return new Transient(ctx.url, `the server sent nothing for ${range} in ${ctx.timeoutMs} ms`, undefined, { cause: error });
  if (timedOut === 'deadline') return new Transient(ctx.url, `the server did not finish ${range} within ${deadlineMs} ms`, undefined, { cause: error });
  const cause = (error as { cause?: { code?: string; message?: string } }).cause;
  const detail = cause?.code ?? cause?.message ?? (error as Error).message;
  return new Transient(ctx.url, `network error on ${range}: ${detail}`, undefined, { cause: error });
}

function looksLikeHtml(bytes: Uint8Array): boolean {
  const head = new TextDecoder('latin1').decode(bytes.subarray(0, 64)).trimStart().toLowerCase();
  return head.startsWith('<!doctype html') || head.startsWith('<html');
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const done = () => {
      signal.removeEventListener('abort', abort);
      resolve();
    };
    const abort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener('abort', abort, { once: true });
  });
}

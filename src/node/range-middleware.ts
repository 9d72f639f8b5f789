/**
 * Serves disk images with correct HTTP Range semantics for the Vite dev and preview servers.
 *
 * Vite's own static handler answers explicit ranges but gets suffix and multi-ranges wrong, sends a weak ETag
 * and returns index.html for missing files. Disk images need more: the web app pins the base's strong ETag and
 * sends If-Range, and QEMU's curl driver must be able to open a downloaded overlay whose backing name is the
 * image's URL. `send` implements HEAD, Accept-Ranges, If-Range, 206/416 and conditional requests; this module
 * only supplies a strong ETag and a 404 for what is missing.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Stats } from 'node:fs';
import send from 'send';

export type Next = (error?: unknown) => void;

/**
 * A strong validator from size and modification time (nanosecond precision where the file system has it):
 * the bytes a server returns under it never change without the validator changing, which is what makes
 * If-Range safe. `send`'s default ETag is weak (W/"...") and must not be used with If-Range.
 */
export function strongEtag(stat: Stats): string {
  const mtime = typeof (stat as Stats & { mtimeNs?: bigint }).mtimeNs === 'bigint' ? (stat as Stats & { mtimeNs: bigint }).mtimeNs : BigInt(Math.round(stat.mtimeMs * 1e6));
  return `"${stat.size.toString(16)}-${mtime.toString(16)}"`;
}

/**
 * A Connect-style middleware serving files under `root` at URL prefix `prefix` (e.g. '/images/'). Other URLs
 * pass through to `next`.
 */
export function rangeMiddleware(prefix: string, root: string): (req: IncomingMessage, res: ServerResponse, next: Next) => void {
  return (req, res, next) => {
    const url = new URL(req.url ?? '/', 'http://localhost');
    if (!url.pathname.startsWith(prefix)) {
      next();
      return;
    }
    if (req.method === 'OPTIONS') {
      // CORS preflight: If-Range is not a safelisted request header, so a page elsewhere asks first.
      res.writeHead(204, {
        'Access-Control-Allow-Origin': '*',
        'Access-Control-Allow-Methods': 'GET, HEAD',
        'Access-Control-Allow-Headers': 'Range, If-Range',
        'Access-Control-Max-Age': '600',
      });
      res.end();
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      next();
      return;
    }
    const relative = decodeURIComponent(url.pathname.slice(prefix.length));
    const stream = send(req, relative, { root, dotfiles: 'deny', index: false, acceptRanges: true, cacheControl: true, maxAge: 0 });
    stream.on('headers', (response: ServerResponse, _path: string, stat: Stats) => {
      // Set before send's own (weak) ETag: send keeps an ETag that is already present.
      response.setHeader('ETag', strongEtag(stat));
      // Disk images must reach the client byte for byte: no transform by proxies (a gzip would turn 206 into 200).
      response.setHeader('Cache-Control', 'no-cache, no-transform');
      // Lets pages on other origins (a `?base=URL` elsewhere) read the validator and the range answers.
      response.setHeader('Access-Control-Allow-Origin', '*');
      response.setHeader('Access-Control-Expose-Headers', 'ETag, Content-Range, Content-Length, Accept-Ranges, Last-Modified');
    });
    stream.on('error', (error: { status?: number; message: string }) => {
      res.statusCode = error.status ?? 500;
      res.setHeader('Content-Type', 'text/plain; charset=utf-8');
      res.end(`${res.statusCode === 404 ? 'not found' : error.message}: ${url.pathname}\n`);
    });
    stream.pipe(res);
  };
}

/**
 * A small HTTP server on 127.0.0.1 that serves one file with correct Range and If-Range semantics, and
 * misbehaves on request: ignores Range, answers 416, truncates bodies, resets connections, stalls, fails with
 * 5xx, gzips, serves index.html for missing files, or changes the file mid-session.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { gzipSync } from 'node:zlib';

export type Fault =
  | 'ignore-range' // 200 with the whole file
  | '416' // Range Not Satisfiable
  | 'truncate' // the full Content-Length declared, half the body sent, then the connection closed
  | 'short-length' // an honest Content-Length that is shorter than the Content-Range
  | 'reset' // the connection destroyed before any response
  | 'stall' // never answered
  | '503'
  | 'gzip' // the body gzipped with Content-Encoding: gzip
  | 'wrong-range' // a 206 for a range other than the one asked for
  | 'long-body' // ten bytes more than the Content-Range covers
  | 'trickle' // the right body in 30 pieces, 20 ms apart
  | 'drip' // the right headers, then one body byte every 100 ms (never finishing a range of any size in time)
  | 'redirect-same-origin' // 302 to the same file under another path of this server
  | 'redirect-other-origin'; // 302 to the same file on another origin (http://localhost:PORT/)

export interface FaultServerOptions {
  /** Which validators the server sends (default: a strong ETag and Last-Modified). */
  etag?: 'strong' | 'weak' | 'none';
  lastModified?: boolean;
  /** Answer unknown paths with 200 index.html, as single-page-app dev servers do. */
  htmlForMissing?: boolean;
  /** Serve the new file's bytes even when If-Range names the old version (a server that ignores If-Range). */
  ignoreIfRange?: boolean;
}

export interface LoggedFaultRequest {
  path: string;
  range: string;
  ifRange: string;
  status: number;
  fault: Fault | undefined;
  /** performance.now() when the request arrived. */
  at: number;
}

export interface FaultServer {
  /** URL of the served file. */
  url: string;
  origin: string;
  /** Faults applied to the next requests, one per request, in order. */
  queue(...faults: Fault[]): void;
  /** A fault applied to every request from now on (undefined to stop). */
  always(fault: Fault | undefined): void;
  /** Picks the fault (or none) of each request not covered by queue/always. */
  chooser: ((request: number) => Fault | undefined) | undefined;
  /** Replaces the file: a new version with a new ETag and Last-Modified. */
  setFile(bytes: Uint8Array): void;
  requests: LoggedFaultRequest[];
  close(): Promise<void>;
}

const INDEX_HTML = '<!doctype html>\n<html><head><title>app</title></head><body><div id="app"></div></body></html>\n';

export async function startFaultServer(initial: Uint8Array, options: FaultServerOptions = {}): Promise<FaultServer> {
  let file = initial;
  let version = 1;
  const queued: Fault[] = [];
  let permanent: Fault | undefined;
  const etagOf = () => (options.etag === 'none' ? undefined : `${options.etag === 'weak' ? 'W/' : ''}"v${version}-${file.length}"`);
  // Whole seconds apart: HTTP dates have one-second resolution.
  const lastModifiedOf = () => (options.lastModified === false ? undefined : new Date(Date.UTC(2024, 0, 1, 0, 0, version)).toUTCString());
  const requests: LoggedFaultRequest[] = [];

  const handle = (req: IncomingMessage, res: ServerResponse, self: FaultServer) => {
    const path = new URL(req.url ?? '/', 'http://x').pathname;
    const range = req.headers.range ?? '';
    const ifRange = (req.headers['if-range'] as string | undefined) ?? '';
    const fault = queued.shift() ?? permanent ?? self.chooser?.(requests.length);
    const entry: LoggedFaultRequest = { path, range, ifRange, status: 0, fault, at: performance.now() };
    requests.push(entry);
    const send = (status: number, headers: Record<string, string | number>, body?: Uint8Array | string) => {
      entry.status = status;
      res.writeHead(status, headers);
      res.end(body);
    };
    if (fault === 'redirect-same-origin' || fault === 'redirect-other-origin') {
      const port = (req.socket.localPort ?? 0);
      return send(302, { Location: fault === 'redirect-same-origin' ? '/moved/disk.img' : `http://localhost:${port}/disk.img` });
    }
    if (path !== '/disk.img' && path !== '/moved/disk.img') {
      if (options.htmlForMissing) return send(200, { 'Content-Type': 'text/html; charset=utf-8', 'Content-Length': Buffer.byteLength(INDEX_HTML) }, INDEX_HTML);
      return send(404, { 'Content-Type': 'text/plain' }, 'not found\n');
    }
    if (fault === 'reset') return req.socket.destroy();
    if (fault === 'stall') return;
    if (fault === '503') return send(503, { 'Content-Type': 'text/plain' }, 'busy\n');
    const validators: Record<string, string> = {};
    const etag = etagOf();
    const lastModified = lastModifiedOf();
    if (etag) validators.ETag = etag;
    if (lastModified) validators['Last-Modified'] = lastModified;
    const whole = () => send(200, { ...validators, 'Content-Type': 'application/octet-stream', 'Content-Length': file.length }, file);
    const match = /^bytes=(\d+)-(\d*)$/.exec(range);
    if (!match || fault === 'ignore-range') return whole();
    // If-Range: the range only applies to the version the client names; otherwise the whole current file.
    const current = ifRange === '' || ifRange === etag || ifRange === lastModified;
    if (!current && !options.ignoreIfRange) return whole();
    const start = Number(match[1]);
    const end = Math.min(file.length - 1, match[2] === '' ? file.length - 1 : Number(match[2]));
    if (fault === '416' || start >= file.length) return send(416, { 'Content-Range': `bytes */${file.length}` });
    let body = file.subarray(start, end + 1);
    const headers: Record<string, string | number> = { ...validators, 'Content-Type': 'application/octet-stream', 'Content-Range': `bytes ${start}-${end}/${file.length}` };
    if (fault === 'wrong-range') headers['Content-Range'] = `bytes ${start + 1}-${end + 1}/${file.length}`;
    if (fault === 'gzip') {
      body = gzipSync(body);
      headers['Content-Encoding'] = 'gzip';
    }
    if (fault === 'truncate') {
      entry.status = 206;
      res.writeHead(206, { ...headers, 'Content-Length': body.length });
      res.write(body.subarray(0, body.length >> 1), () => res.destroy());
      return;
    }
    if (fault === 'short-length') body = body.subarray(0, body.length >> 1);
    if (fault === 'long-body') body = Buffer.concat([body, Buffer.alloc(10, 0xee)]);
    if (fault === 'drip') {
      entry.status = 206;
      res.writeHead(206, { ...headers, 'Content-Length': body.length });
      let sent = 0;
      const timer = setInterval(() => {
        if (sent >= body.length || res.destroyed) return clearInterval(timer);
        res.write(body.subarray(sent, ++sent));
      }, 100);
      res.on('close', () => clearInterval(timer));
      return;
    }
    if (fault === 'trickle') {
      entry.status = 206;
      res.writeHead(206, { ...headers, 'Content-Length': body.length });
      const piece = Math.ceil(body.length / 30);
      let sent = 0;
      const next = () => {
        if (sent >= body.length) return void res.end();
        res.write(body.subarray(sent, sent + piece));
        sent += piece;
        setTimeout(next, 20);
      };
      return next();
    }
    send(206, { ...headers, 'Content-Length': body.length }, body);
  };

  const server = createServer((req, res) => handle(req, res, self));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  const origin = `http://127.0.0.1:${port}`;
  const self: FaultServer = {
    url: `${origin}/disk.img`,
    origin,
    queue: (...faults) => void queued.push(...faults),
    always: (fault) => void (permanent = fault),
    chooser: undefined,
    setFile(bytes) {
      file = bytes;
      version++;
    },
    requests,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
  return self;
}

/**
 * A real static server for HTTP tests: Debian's nginx-light serving one directory on 127.0.0.1 at a free port,
 * from a temporary prefix, with an access log the tests read to count requests and statuses.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

const ROOT = resolve(import.meta.dirname, '../..');

export interface LoggedRequest {
  status: number;
  method: string;
  uri: string;
  /** The Range header as sent ('' when absent). */
  range: string;
  ifRange: string;
  /** Body bytes nginx sent. */
  bytes: number;
}

export interface NginxServer {
  /** http://127.0.0.1:PORT/ */
  url: string;
  port: number;
  /** Every request logged so far, oldest first. */
  requests(): LoggedRequest[];
  close(): Promise<void>;
}

// Tab-separated so quoted header values never need unescaping.
const LOG_FORMAT = `'$status\\t$request_method\\t$request_uri\\t$http_range\\t$http_if_range\\t$body_bytes_sent'`;

function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolvePort(port));
    });
  });
}

export interface NginxOptions {
  /**
   * Compress HTML, CSS, JavaScript, JSON and WebAssembly (gzip level 6) as production static servers do; disk
   * images (application/octet-stream) are never compressed. Off by default.
   */
  compressAssets?: boolean;
}

function config(prefix: string, root: string, port: number, options: NginxOptions): string {
  // As root, nginx's workers would drop to 'nobody', which cannot read the tests' private (0700) temp dirs.
  const user = process.getuid?.() === 0 ? 'user root;\n' : '';
  return `daemon off;
${user}worker_processes 1;
pid ${prefix}/nginx.pid;
error_log ${prefix}/error.log warn;
events { worker_connections 256; }
http {
  types { text/html html htm; text/css css; application/javascript js mjs; application/wasm wasm; application/json json; }
  default_type application/octet-stream;
  log_format tests escape=none ${LOG_FORMAT};
  access_log ${prefix}/access.log tests;
  client_body_temp_path ${prefix}/body;
  proxy_temp_path ${prefix}/proxy;
  fastcgi_temp_path ${prefix}/fastcgi;
  scgi_temp_path ${prefix}/scgi;
  uwsgi_temp_path ${prefix}/uwsgi;
  # Disk images must reach the client byte for byte: gzip would turn a 206 into a whole-file 200.
  ${options.compressAssets ? 'gzip on;\n  gzip_comp_level 6;\n  gzip_types text/css application/javascript application/json application/wasm;' : 'gzip off;'}
  sendfile on;
  server {
    listen 127.0.0.1:${port};
    root ${root};
    location / { }
  }
}
`;
}

/** Starts nginx serving `root` (an absolute or repo-relative directory). */
export async function startNginx(root: string, options: NginxOptions = {}): Promise<NginxServer> {
  if (!existsSync('/usr/sbin/nginx')) execFileSync(process.execPath, [join(ROOT, 'scripts/system-deps.mjs'), 'nginx-light'], { stdio: 'inherit' });
  const dir = resolve(ROOT, root);
  for (let attempt = 0; ; attempt++) {
    const prefix = mkdtempSync(join(tmpdir(), 'qcow86-nginx-'));
    const port = await freePort();
    writeFileSync(join(prefix, 'nginx.conf'), config(prefix, dir, port, options));
    const child = spawn('/usr/sbin/nginx', ['-c', join(prefix, 'nginx.conf'), '-p', prefix, '-e', join(prefix, 'error.log')], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    const url = `http://127.0.0.1:${port}/`;
    const up = await waitUp(child, url);
    if (up) return server(child, prefix, url, port);
    rmSync(prefix, { recursive: true, force: true });
    // Another process may have taken the port between probing and binding: try a fresh one.
    if (attempt >= 4) throw new Error(`nginx did not start: ${stderr}`);
  }
}

async function waitUp(child: ChildProcess, url: string): Promise<boolean> {
  let exited = false;
  child.once('exit', () => (exited = true));
  for (let i = 0; i < 200 && !exited; i++) {
    try {
      const response = await fetch(`${url}__qcow86_probe__`);
      await response.body?.cancel();
      return true;
    } catch {
      await new Promise((done) => setTimeout(done, 25));
    }
  }
  if (!exited) child.kill('SIGKILL');
  return false;
}

function server(child: ChildProcess, prefix: string, url: string, port: number): NginxServer {
  const log = join(prefix, 'access.log');
  const exited = new Promise<void>((done) => child.once('exit', () => done()));
  return {
    url,
    port,
    requests() {
      if (!existsSync(log)) return [];
      return readFileSync(log, 'utf8')
        .split('\n')
        .filter(Boolean)
        .map((line) => {
          const [status, method, uri, range, ifRange, bytes] = line.split('\t');
          return { status: Number(status), method: method!, uri: uri!, range: range === '-' ? '' : range!, ifRange: ifRange === '-' ? '' : ifRange!, bytes: Number(bytes) };
        })
        .filter((request) => request.uri !== '/__qcow86_probe__');
    },
    async close() {
      // SIGQUIT: graceful shutdown, so the access log is complete before the prefix goes.
      child.kill('SIGQUIT');
      await exited;
      rmSync(prefix, { recursive: true, force: true });
    },
  };
}

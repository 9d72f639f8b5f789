/**
 * The two ways the tab is served in e2e tests: Vite's dev server (with the Range middleware) and the `vite build`
 * output behind nginx, the kind of static server the app is meant to be deployed on.
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, rmSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';

export const ROOT = resolve(import.meta.dirname, '..');
export const PUBLIC_IMAGES = join(ROOT, 'public/images');
const BUILD_DIR = join(ROOT, 'dist/web');

export interface Server {
  /** Origin + '/', e.g. http://127.0.0.1:5173/ */
  url: string;
  /** The directory this server serves /images/ from: tests put extra base images there. */
  imagesDir: string;
  close(): Promise<void>;
}

export type ServerKind = 'dev' | 'nginx';

export async function startServer(kind: ServerKind): Promise<Server> {
  if (!existsSync(join(PUBLIC_IMAGES, 'base.qcow2'))) {
    throw new Error('public/images/base.qcow2 is missing: run `npm run images` (or `npm start` once) first');
  }
  return kind === 'dev' ? startDev() : startNginx();
}

async function startDev(): Promise<Server> {
  const { createServer } = await import('vite');
  const server = await createServer({
    configFile: join(ROOT, 'vite.config.ts'),
    logLevel: 'warn',
    // No HMR and no file watching: other work in the tree must not reload the page under test.
    server: { host: '127.0.0.1', port: 0, strictPort: false, hmr: false, watch: null },
  });
  await server.listen();
  const url = server.resolvedUrls?.local[0];
  if (!url) throw new Error('the Vite dev server did not report its address');
  return { url, imagesDir: PUBLIC_IMAGES, close: () => server.close() };
}

async function startNginx(): Promise<Server> {
  buildApp();
  const { startNginx: nginx } = await import('../test/helpers/nginx.js');
  const server = await nginx(BUILD_DIR);
  return { url: server.url.endsWith('/') ? server.url : `${server.url}/`, imagesDir: join(BUILD_DIR, 'images'), close: () => server.close() };
}

/** `vite build` into dist/web, unless it is newer than every source it depends on. */
function buildApp(): void {
  const built = join(BUILD_DIR, 'index.html');
  if (existsSync(built) && existsSync(join(BUILD_DIR, 'images/base.qcow2'))) {
    const builtAt = statSync(built).mtimeMs;
    const newest = Math.max(...sources().map((path) => statSync(path).mtimeMs));
    if (newest < builtAt) return;
  }
  execFileSync(process.execPath, [join(ROOT, 'node_modules/vite/bin/vite.js'), 'build', '--logLevel', 'warn'], { cwd: ROOT, stdio: 'inherit' });
}

function sources(): string[] {
  const out = execFileSync('git', ['ls-files', '-co', '--exclude-standard', 'src', 'index.html', 'vite.config.ts'], { cwd: ROOT, encoding: 'utf8' });
  return [...out.split('\n').filter(Boolean).map((path) => join(ROOT, path)).filter((path) => existsSync(path)), join(PUBLIC_IMAGES, 'base.qcow2')];
}

/** Copies the default base under a new name in `server`'s images directory; returns its URL path. */
export function copyBase(server: Server, name: string): { path: string; file: string; remove(): void } {
  const file = join(server.imagesDir, name);
  copyFileSync(join(PUBLIC_IMAGES, 'base.qcow2'), file);
  return { path: `/images/${name}`, file, remove: () => rmSync(file, { force: true }) };
}

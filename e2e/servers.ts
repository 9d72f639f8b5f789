/**
 * The two ways the tab is served in e2e tests: Vite's dev server (with the Range middleware) and the `vite build`
 * output behind nginx, the kind of static server the app is meant to be deployed on.
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join, relative, resolve } from 'node:path';

export const ROOT = resolve(import.meta.dirname, '..');
const PUBLIC_DIR = join(ROOT, 'public');
export const PUBLIC_IMAGES = join(PUBLIC_DIR, 'images');
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

/**
 * `vite build` into dist/web, unless it is newer than every source it depends on and holds a copy of every file
 * in public/ (the guest list and images the image builds made are copied from there: an image rebuilt, a guest
 * added or removed since must not be served from a stale copy).
 */
function buildApp(): void {
  const built = join(BUILD_DIR, 'index.html');
  if (existsSync(built) && staleInputs(statSync(built).mtimeMs).length === 0) return;
  execFileSync(process.execPath, [join(ROOT, 'node_modules/vite/bin/vite.js'), 'build', '--logLevel', 'warn'], { cwd: ROOT, stdio: 'inherit' });
}

/** The build's inputs changed after `builtAt`, and the files of public/ whose copy in the build is missing or differs in size. */
function staleInputs(builtAt: number): string[] {
  const out = execFileSync('git', ['ls-files', '-co', '--exclude-standard', 'src', 'index.html', 'vite.config.ts', 'package-lock.json'], { cwd: ROOT, encoding: 'utf8' });
  const sources = out.split('\n').filter(Boolean).map((path) => join(ROOT, path)).filter((path) => existsSync(path));
  const stale = sources.filter((path) => statSync(path).mtimeMs >= builtAt);
  // public/ is copied as it is, files git ignores included (public/images is the image builds' output).
  for (const file of filesUnder(PUBLIC_DIR)) {
    const copy = join(BUILD_DIR, relative(PUBLIC_DIR, file));
    const source = statSync(file);
    if (source.mtimeMs >= builtAt || !existsSync(copy) || statSync(copy).size !== source.size) stale.push(file);
  }
  return stale;
}

function filesUnder(dir: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return filesUnder(path);
    return entry.isFile() ? [path] : [];
  });
}

/** Copies the default base under a new name in `server`'s images directory; returns its URL path. */
export function copyBase(server: Server, name: string): { path: string; file: string; remove(): void } {
  const file = join(server.imagesDir, name);
  copyFileSync(join(PUBLIC_IMAGES, 'base.qcow2'), file);
  return { path: `/images/${name}`, file, remove: () => rmSync(file, { force: true }) };
}

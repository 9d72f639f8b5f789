#!/usr/bin/env node
// `npm start`: builds what is missing (the default guest image), then serves the web app with Vite's dev server
// on 127.0.0.1 and prints the address to open. Options: --port N (default 5173, or $PORT), --host H.
import { existsSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
process.chdir(root);

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at > 0 && process.argv[at + 1] ? process.argv[at + 1] : fallback;
}

/** The files the page loads from /images/; the images build writes all of them. */
const IMAGE_FILES = ['base.qcow2', 'bios.bin', 'vgabios-stdvga.bin'];

async function ensureImages() {
  const missing = IMAGE_FILES.filter((name) => !existsSync(join(root, 'public/images', name)));
  if (missing.length === 0) return;
  console.log(`qcow86: building the default guest (missing: ${missing.join(', ')}) — this takes a few minutes the first time`);
  const build = join(root, 'images/build.mjs');
  if (!existsSync(build)) throw new Error('images/build.mjs is missing: cannot build the default guest');
  // Prefer the build's own entry point when it exports one (it knows what is up to date); else run it.
  const module = await import(pathToFileURL(build).href).catch(() => ({}));
  const ensure = module.ensureImages ?? module.buildImages ?? module.build;
  if (typeof ensure === 'function') {
    await ensure({ outDir: join(root, 'public/images') });
  } else {
    const run = spawnSync(process.execPath, [build], { stdio: 'inherit' });
    if (run.status !== 0) throw new Error(`images/build.mjs failed (exit ${run.status})`);
  }
  const still = IMAGE_FILES.filter((name) => !existsSync(join(root, 'public/images', name)));
  if (still.length) throw new Error(`the images build did not produce ${still.join(', ')}`);
}

async function main() {
  await ensureImages();
  const { createServer } = await import('vite');
  const server = await createServer({
    configFile: join(root, 'vite.config.ts'),
    server: { host: option('host', '127.0.0.1'), port: Number(option('port', process.env.PORT ?? 5173)) },
  });
  await server.listen();
  const url = server.resolvedUrls?.local[0] ?? `http://${server.config.server.host}:${server.config.server.port}/`;
  console.log(`\n  qcow86 is running. Open ${url} in a browser.\n  The guest boots in the tab; its disk changes stay in that browser until you reset them.\n  Press Ctrl+C to stop.\n`);
  const stop = async () => {
    await server.close();
    process.exit(0);
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

main().catch((error) => {
  console.error(`qcow86: ${error.message}`);
  process.exit(1);
});

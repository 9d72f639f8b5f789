#!/usr/bin/env node
// `npm start`: builds what is missing (the default guest image), then serves the web app with Vite's dev server
// on 127.0.0.1 and prints the address to open. Options: --port N (default 5173, or $PORT), --host H.
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ensureImages } from './ensure-images.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
process.chdir(root);

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at > 0 && process.argv[at + 1] ? process.argv[at + 1] : fallback;
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

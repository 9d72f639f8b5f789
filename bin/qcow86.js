#!/usr/bin/env node
// The CLI is compiled to dist/ and bundled into dist/cli/ (scripts/bundle-cli.mjs) by `npm ci` (the prepare
// script) or `npm run build`. A bundle older than the compiled tree (tsc run on its own since) is not used: the
// compiled tree runs instead, slower to load but never stale.
import { statSync } from 'node:fs';

const dist = new URL('../dist/', import.meta.url);
const mtime = (path) => statSync(new URL(path, dist), { throwIfNoEntry: false })?.mtimeMs ?? -1;
const entry = mtime('cli/cli.js') >= mtime('node/cli.js') ? '../dist/cli/cli.js' : '../dist/node/cli.js';
const { main, exitOnStrayErrors } = await import(entry);

exitOnStrayErrors(process.argv[2]);
process.exitCode = await main(process.argv.slice(2));

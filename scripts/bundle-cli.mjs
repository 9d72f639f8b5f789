#!/usr/bin/env node
// Bundles the compiled CLI (dist/node/cli.js, from tsc) into dist/cli/, which bin/qcow86.js runs. A CLI run
// pays for every module Node's ESM loader resolves, reads and links: `convert` went through 22 files, about a
// third of the time Node itself takes to start. Bundled, the same run loads a handful of chunks; the commands'
// lazy imports stay lazy (each is a chunk loaded only when its command runs). Packages in node_modules stay
// outside the bundle (v86 and zstd-wasm find their .wasm files next to themselves). The cluster worker
// (src/io/cluster-worker.ts) is a second entry: the pool starts it from the directory of its own chunk.
import { build } from 'rolldown';
import { rmSync } from 'node:fs';
import { join, resolve } from 'node:path';

const root = resolve(import.meta.dirname, '..');
const dist = process.argv[2] ? resolve(process.argv[2]) : join(root, 'dist');
const out = join(dist, 'cli');
rmSync(out, { recursive: true, force: true });
await build({
  input: { cli: join(dist, 'node/cli.js'), 'cluster-worker': join(dist, 'io/cluster-worker.js') },
  platform: 'node',
  // Bare specifiers (node: builtins and packages) are imported at run time, not bundled.
  external: (id) => !id.startsWith('.') && !id.startsWith('/'),
  logLevel: 'warn',
  output: { dir: out, format: 'esm', sourcemap: false },
  write: true,
});

/// <reference types="vitest/config" />
import { existsSync, realpathSync } from 'node:fs';
import { resolve } from 'node:path';
import { defineConfig, type Plugin } from 'vite';
import { rangeMiddleware } from './src/node/range-middleware.js';

/**
 * Serves /images/ through a correct Range handler (strong ETag, If-Range, HEAD, 404s) in `vite` and
 * `vite preview`, ahead of Vite's own static handler, which answers suffix ranges wrongly and returns index.html
 * for missing files.
 */
function imageRanges(): Plugin {
  return {
    name: 'qcow86-image-ranges',
    configureServer(server) {
      server.middlewares.use(rangeMiddleware('/images/', resolve(server.config.root, 'public/images')));
    },
    configurePreviewServer(server) {
      server.middlewares.use(rangeMiddleware('/images/', resolve(server.config.root, server.config.build.outDir, 'images')));
    },
  };
}

const nodeModules = resolve(import.meta.dirname, 'node_modules');

// One config for the web app (index.html + src/web) and for Vitest.
export default defineConfig({
  root: '.',
  publicDir: 'public',
  plugins: [imageRanges()],
  // node_modules may be a symlink to a shared install (git worktrees): excluded deps are served from its real path.
  server: { host: '127.0.0.1', fs: { allow: ['.', ...(existsSync(nodeModules) ? [realpathSync(nodeModules)] : [])] } },
  preview: { host: '127.0.0.1' },
  // dist/ also holds the library's tsc output (dist/qcow2, dist/io...): the app gets its own folder.
  build: { outDir: 'dist/web', emptyOutDir: true, target: 'es2022', chunkSizeWarningLimit: 1024 },
  // One file per Worker: the engine's lazily imported parts (codecs, write side) are needed on every boot of the
  // tab, and as separate chunks they cost the cold boot three more requests for ~10 KiB less in the first file.
  worker: { format: 'es', rolldownOptions: { output: { codeSplitting: false } } },
  // zstd's encoder finds its .wasm next to itself (new URL('./zstd.wasm', import.meta.url)): pre-bundling would
  // move the script away from the file, and discovering it only when a session is first saved would reload deps.
  optimizeDeps: { exclude: ['@bokuweb/zstd-wasm'] },
  test: {
    // Tests import the machine library by its package name, as users do (README's example is a test), from source.
    alias: { 'qcow86/machine': resolve(import.meta.dirname, 'src/node/machine.ts') },
    // Every test file's temporary directories are removed when it ends.
    setupFiles: ['test/helpers/cleanup.ts'],
    testTimeout: 60_000,
    hookTimeout: 300_000,
    pool: 'forks',
    // Boot tests (test/boot) start real guests (~20-120 s each, ~400 MiB): they run after the other tests, one
    // file at a time, so they neither starve nor slow down the rest of the suite.
    projects: [
      { extends: true, test: { name: 'unit', include: ['test/**/*.test.ts'], exclude: ['test/boot/**', 'node_modules/**'] } },
      { extends: true, test: { name: 'boot', include: ['test/boot/**/*.test.ts'], fileParallelism: false, sequence: { groupOrder: 1 } } },
    ],
  },
});

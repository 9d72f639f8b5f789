#!/usr/bin/env node
// Makes sure public/images/ holds what the web app loads (the default guest's base image and the BIOS files),
// building them with images/build.mjs when something is missing. Used by `npm start` and the e2e tests.
import { existsSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

/** The files the page loads from /images/; the images build writes all of them. */
const IMAGE_FILES = ['base.qcow2', 'bios.bin', 'vgabios-stdvga.bin'];

export async function ensureImages() {
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

if (import.meta.url === `file://${process.argv[1]}`) {
  ensureImages().catch((error) => {
    console.error(`qcow86: ${error.message}`);
    process.exit(1);
  });
}

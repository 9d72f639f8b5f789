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
  const build = join(root, 'images/build.mjs');
  if (!existsSync(build)) throw new Error('images/build.mjs is missing: cannot build the default guest');
  // The build knows best what a complete, current set is (its manifest): let it decide when it can.
  const module = await import(pathToFileURL(build).href);
  if (typeof module.ensureImages === 'function') {
    await module.ensureImages({ outDir: join(root, 'public/images') });
  } else {
    const missing = IMAGE_FILES.filter((name) => !existsSync(join(root, 'public/images', name)));
    if (missing.length === 0) return;
    console.log(`qcow86: building the default guest (missing: ${missing.join(', ')}) — this takes a few minutes the first time`);
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

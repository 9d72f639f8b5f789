/**
 * What the shared machine (src/v86/machine.ts) needs from Node: the BIOS files as buffers and v86.wasm as a
 * filesystem path (v86's loader in Node reads files, it cannot fetch URLs).
 */
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository's public/images/, where `npm run images` writes the default guest and the BIOS files. */
export const DEFAULT_IMAGES_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '../../public/images');

export function v86WasmPath(): string {
  const require = createRequire(import.meta.url);
  return join(dirname(require.resolve('v86/package.json')), 'build/v86.wasm');
}

export interface NodeMachineAssets {
  bios: ArrayBuffer;
  vgaBios: ArrayBuffer;
  wasmPath: string;
}

async function readBuffer(path: string): Promise<ArrayBuffer> {
  const bytes = await readFile(path);
  // A fresh ArrayBuffer of exactly the file: v86 takes `.buffer` whole, and Node may pool small reads.
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) as ArrayBuffer;
}

/** A file of the machine's firmware: a missing one is named with how to get it, not as a bare ENOENT. */
async function readFirmware(imagesDir: string, name: string): Promise<ArrayBuffer> {
  const path = join(imagesDir, name);
  try {
    return await readBuffer(path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
    throw new Error(`${path} is missing: the BIOS files come with the default guest's build (node scripts/ensure-images.mjs in a checkout, or npm start)`);
  }
}

export async function loadMachineAssets(imagesDir = DEFAULT_IMAGES_DIR): Promise<NodeMachineAssets> {
  return {
    bios: await readFirmware(imagesDir, 'bios.bin'),
    vgaBios: await readFirmware(imagesDir, 'vgabios-stdvga.bin'),
    wasmPath: v86WasmPath(),
  };
}

export { readBuffer as readFileBuffer };

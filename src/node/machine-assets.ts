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

export async function loadMachineAssets(imagesDir = DEFAULT_IMAGES_DIR): Promise<NodeMachineAssets> {
  return {
    bios: await readBuffer(join(imagesDir, 'bios.bin')),
    vgaBios: await readBuffer(join(imagesDir, 'vgabios-stdvga.bin')),
    wasmPath: v86WasmPath(),
  };
}

export { readBuffer as readFileBuffer };

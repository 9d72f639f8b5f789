/**
 * Opening images with our engine in tests, and the oracle's verdict on what we wrote: every image the engine
 * writes goes through `qemu-img check` (no errors, no leaks) before a test may pass.
 */
import { expect } from 'vitest';
import { FileStore, nodeResolver } from '../../src/io/node.js';
import { nodeCodecs } from '../../src/io/node-codecs.js';
import { openImage } from '../../src/qcow2/open.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { createQcow2, type CreateOptions } from '../../src/qcow2/create.js';
import { qemuCheck, run } from './qemu.js';

/** Opens a qcow2 image read-write with its backing chain. */
export async function openRw(path: string): Promise<Qcow2Image> {
  const store = await FileStore.open(path, { readOnly: false });
  const image = await openImage(store, { readOnly: false, resolver: nodeResolver(), codecs: nodeCodecs() });
  if (!(image instanceof Qcow2Image)) throw new Error(`${path} is not a qcow2 image`);
  return image;
}

export async function createFile(path: string, options: CreateOptions): Promise<void> {
  const store = await FileStore.open(path, { readOnly: false, create: true });
  try {
    await createQcow2(store, options);
  } finally {
    await store.close();
  }
}

/** qemu-img check must find neither errors nor leaks. */
export async function expectClean(path: string): Promise<void> {
  const { exitCode, result } = await qemuCheck(path);
  expect({ path, exitCode, errors: result['check-errors'] ?? 0, leaks: result.leaks ?? 0, corruptions: result.corruptions ?? 0 }).toEqual({
    path,
    exitCode: 0,
    errors: 0,
    leaks: 0,
    corruptions: 0,
  });
}

/** qemu-img compare: guest-visible contents equal (exit 0). */
export async function expectSameContents(a: string, b: string, extra: string[] = []): Promise<void> {
  const r = await run('qemu-img', ['compare', ...extra, a, b]);
  expect({ a, b, exitCode: r.exitCode, out: r.exitCode === 0 ? '' : r.stdout + r.stderr }).toEqual({ a, b, exitCode: 0, out: '' });
}

/** A deterministic pattern buffer as qemu-io's `write -P` writes it. */
export function pattern(length: number, value: number): Uint8Array {
  return new Uint8Array(length).fill(value & 0xff);
}

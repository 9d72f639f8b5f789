/**
 * Encrypted images for tests: made and read by qemu-img/qemu-io (the oracle) with QEMU's spelling, and opened with
 * our engine in-process. LUKS images get a small encrypt.iter-time unless a test is about the default: QEMU still
 * spends about a second calibrating each one, ours tens of milliseconds.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FileStore, nodeResolver } from '../../src/io/node.js';
import { nodeCodecs } from '../../src/io/node-codecs.js';
import { nodeCrypto } from '../../src/io/node-crypto.js';
import { openImage } from '../../src/qcow2/open.js';
import type { BlockDevice } from '../../src/qcow2/device.js';
import { createQcow2, type CreateOptions } from '../../src/qcow2/create.js';
import type { CipherSpec, HashAlgorithm } from '../../src/qcow2/crypto.js';
import { ioCommand, qemuImg, qemuIo, tempDir, type ImageWrite } from './qemu.js';

export const PASSWORD = 'correct horse battery';
export const SECRET_ID = 'sec0';
/** The --object argument pair giving PASSWORD as secret `sec0`. */
export const SECRET = ['--object', `secret,id=${SECRET_ID},data=${PASSWORD}`];
export const PASSWORD_BYTES = new TextEncoder().encode(PASSWORD);

/** qemu-img's --image-opts for an encrypted qcow2 (or qcow) image. */
export function imageOpts(path: string, extra = '', driver = 'qcow2'): string {
  return `driver=${driver},file.filename=${path},encrypt.key-secret=${SECRET_ID}${extra}`;
}

/** The -o options for a LUKS parameter set, as qemu-img spells them. */
export function luksOptions(spec: CipherSpec, hash: HashAlgorithm, iterTime = 10): string {
  const parts = ['encrypt.format=luks', `encrypt.key-secret=${SECRET_ID}`, `encrypt.cipher-alg=aes-${spec.aesKeyBytes * 8}`, `encrypt.cipher-mode=${spec.mode}`, `encrypt.ivgen-alg=${spec.ivgen}`];
  if (spec.ivgenHash) parts.push(`encrypt.ivgen-hash-alg=${spec.ivgenHash}`);
  parts.push(`encrypt.hash-alg=${hash}`, `encrypt.iter-time=${iterTime}`);
  return parts.join(',');
}

/** A LUKS image made by qemu-img (extra -o options appended), then written by qemu-io. */
export async function qemuLuks(path: string, size: string | number, options = `encrypt.format=luks,encrypt.key-secret=${SECRET_ID},encrypt.iter-time=10`, writes: ImageWrite[] = [], extraArgs: string[] = []): Promise<string> {
  await qemuImg(['create', '-q', ...SECRET, '-f', 'qcow2', '-o', options, ...extraArgs, path, String(size)]);
  if (writes.length) await qemuWrite(path, writes);
  return path;
}

/** qemu-io writes to an encrypted image. */
export async function qemuWrite(path: string, writes: ImageWrite[], driver = 'qcow2'): Promise<void> {
  await qemuIo([...SECRET, '--image-opts', imageOpts(path, '', driver), ...writes.flatMap((w) => ['-c', ioCommand(w)])]);
}

/** The guest bytes of an encrypted image, as qemu-img convert reads them. */
export async function qemuContents(path: string, options: { driver?: string; snapshot?: string; extra?: string } = {}): Promise<Uint8Array> {
  const out = join(tempDir(), 'out.raw');
  await qemuImg(['convert', ...SECRET, '--image-opts', imageOpts(path, options.extra ?? '', options.driver), ...(options.snapshot ? ['-l', options.snapshot] : []), '-O', 'raw', out]);
  return new Uint8Array(await readFile(out));
}

/** Opens an image with our engine (read-only unless asked), every layer with PASSWORD. */
export async function openEncrypted(path: string, options: { readOnly?: boolean; password?: Uint8Array } = {}): Promise<BlockDevice> {
  const readOnly = options.readOnly ?? true;
  const store = await FileStore.open(path, { readOnly });
  const password = options.password ?? PASSWORD_BYTES;
  return openImage(store, { readOnly, resolver: nodeResolver(), codecs: nodeCodecs(), crypto: nodeCrypto(), passwords: () => password });
}

/** All guest bytes of an image through our engine. */
export async function ourContents(path: string): Promise<Uint8Array> {
  const device = await openEncrypted(path);
  try {
    return await device.read(0, device.virtualSize);
  } finally {
    await device.close();
  }
}

/** Creates a LUKS qcow2 image with our engine. */
export async function ourLuks(path: string, options: Omit<CreateOptions, 'encryption'> & { cipher?: CipherSpec; hash?: HashAlgorithm; iterTimeMs?: number }): Promise<string> {
  const store = await FileStore.open(path, { readOnly: false, create: true });
  const { cipher, hash, iterTimeMs, ...rest } = options;
  try {
    await createQcow2(store, { ...rest, encryption: { password: PASSWORD_BYTES, crypto: nodeCrypto(), cipher, hash, iterTimeMs: iterTimeMs ?? 1 } });
  } finally {
    await store.close();
  }
  return path;
}

/** Applies writes (as qemu-io would) to a plain buffer: what the guest must read afterwards. */
export function applyWrites(image: Uint8Array, writes: ImageWrite[]): void {
  for (const w of writes) {
    if ('pattern' in w) image.fill(w.pattern & 0xff, w.offset, w.offset + w.length);
    else image.fill(0, w.offset, w.offset + w.length);
  }
}

/** First differing byte of two arrays (or -1): a readable failure instead of a megabyte diff. */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

/**
 * Backing chains for commit/rebase tests: built with qemu-img/qemu-io in one directory (relative backing names),
 * copied for the other tool, and compared image by image with what qemu-img did on the copy.
 */
import { expect } from 'vitest';
import { cp, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { makeImage, qemuCheck, qemuConvertToRaw, qemuInfo, qemuMap, run, tempDir, type ImageOptions, type ImageWrite } from './qemu.js';

export interface LayerSpec {
  file: string;
  size: number | string;
  options?: Partial<ImageOptions>;
  writes?: ImageWrite[];
}

/** Builds a chain in `dir`, bottom layer first; each layer backs on the one before it by a relative name. */
export async function buildChain(dir: string, layers: LayerSpec[]): Promise<void> {
  let below: { file: string; format: string } | undefined;
  for (const layer of layers) {
    const format = layer.options?.format ?? 'qcow2';
    await makeImage(
      {
        path: join(dir, layer.file),
        size: layer.size,
        ...(below ? { backing: below.file, backingFormat: below.format } : {}),
        ...layer.options,
      },
      layer.writes ?? [],
    );
    below = { file: layer.file, format };
  }
}

/** A copy of a chain directory for the other tool. */
export async function twin(dir: string): Promise<string> {
  const copy = tempDir();
  await cp(dir, copy, { recursive: true });
  return copy;
}

/** Guest-visible bytes of an image read through its chain. */
export async function contents(path: string): Promise<Uint8Array> {
  return qemuConvertToRaw(path);
}

function infoKeys(info: any): Record<string, unknown> {
  return {
    'virtual-size': info['virtual-size'],
    'backing-filename': info['backing-filename'],
    'backing-filename-format': info['backing-filename-format'],
  };
}

/** Every image in `ours` (or those named in `only`) matches its twin in `theirs`; the images named in `written` pass qemu-img check. */
export async function sameAsQemu(ours: string, theirs: string, written: string[], only?: string[]): Promise<void> {
  for (const file of written.filter((f) => f.endsWith('.qcow2'))) {
    const check = await qemuCheck(join(ours, file));
    expect(check.exitCode, `${file}: ${JSON.stringify(check.result)}`).toBe(0);
    expect(check.result['check-errors'] ?? 0).toBe(0);
    expect(check.result.leaks ?? 0).toBe(0);
    expect(check.result.corruptions ?? 0).toBe(0);
  }
  const files = only ?? (await readdir(ours)).filter((f) => !f.endsWith('.lock')).sort();
  if (!only) expect(files).toEqual((await readdir(theirs)).filter((f) => !f.endsWith('.lock')).sort());
  for (const file of files) {
    const a = await qemuInfo(join(ours, file));
    const b = await qemuInfo(join(theirs, file));
    expect(infoKeys(a), file).toEqual(infoKeys(b));
    // Not -s: strict mode also compares allocation, which legitimately differs between two writers.
    const compare = await run('qemu-img', ['compare', join(ours, file), join(theirs, file)]);
    expect(compare.exitCode, `${file}: ${compare.stdout}${compare.stderr}`).toBe(0);
  }
}

/** qemu-img map without host offsets (they legitimately differ between writers). */
export async function mapShape(path: string) {
  return (await qemuMap(path)).map(({ start, length, depth, present, zero, data }) => ({ start, length, depth, present, zero, data }));
}


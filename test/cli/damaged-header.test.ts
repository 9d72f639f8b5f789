/**
 * Header damage the damaged-image differential found (seeds 2 and 3, long runs), qemu-img 7.2 as the oracle:
 * - version 0 with the qcow magic: neither QEMU probe claims it, so it is a raw file; with -f qcow2 the version is
 *   refused by name;
 * - refcount_table_clusters 0: opening refuses it, but qemu-img check opens images in check mode and reports it;
 * - an l1_size whose second byte changed (1 -> 39681 entries) names ~23,000 "L2 tables", nearly all past the end
 *   of the file: check must list qemu-img's 168,200 findings line for line, and in about the time qemu-img takes
 *   (it took 7-20 s and tripped the differential's 20 s hang guard).
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImg, qemuIo, run, sha256, tempDir } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

let dir: string;
let template: string;

beforeAll(async () => {
  dir = tempDir('qcow86-damaged-header-');
  template = join(dir, 'template.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536,compat=0.10', template, '4M']);
  await qemuIo(['-c', 'write -P 5 0 192k', '-c', 'write -P 6 2M 64k', template]);
  await qemuImg(['snapshot', '-c', 'snap2', template]);
});

async function damaged(name: string, at: number, value: number): Promise<string> {
  const bytes = await readFile(template);
  bytes[at] = value;
  const path = join(dir, name);
  await writeFile(path, bytes);
  return path;
}

describe('damaged header fields', () => {
  it('version 0 is probed as raw, as by qemu-img; -f qcow2 refuses the version', async () => {
    const path = await damaged('v0.qcow2', 7, 0);
    for (const args of [['info', '--output=json'], ['map', '--output=json'], ['check']]) {
      const theirs = await run('qemu-img', [...args, path]);
      const ours = await qcow86([...args, path]);
      expect(ours.stdout).toBe(theirs.stdout);
      expect(ours.exitCode).toBe(theirs.exitCode);
    }
    const theirRaw = join(dir, 'v0-theirs.raw');
    const ourRaw = join(dir, 'v0-ours.raw');
    await qemuImg(['convert', '-O', 'raw', path, theirRaw]);
    expect((await qcow86(['convert', '-O', 'raw', path, ourRaw])).exitCode).toBe(0);
    expect(await sha256(ourRaw)).toBe(await sha256(theirRaw));
    const forced = await qcow86(['info', '-f', 'qcow2', path]);
    expect(forced.exitCode).toBe(1);
    expect(forced.stderr).toMatch(/unsupported qcow2 version 0/);
  });

  it('refcount_table_clusters 0: check reports every cluster as qemu-img check does (it opens such an image in check mode), convert is refused by both', async () => {
    const path = await damaged('no-reftable.qcow2', 59, 0);
    const theirs = await run('qemu-img', ['check', path]);
    const ours = await qcow86(['check', path]);
    expect(theirs.exitCode).toBe(2);
    expect(ours.exitCode).toBe(2);
    expect(ours.stdout).toBe(theirs.stdout);
    expect(ours.stderr).toBe(theirs.stderr);
    expect((await run('qemu-img', ['convert', '-O', 'raw', path, join(dir, 'nr-theirs.raw')])).exitCode).toBe(1);
    const converted = await qcow86(['convert', '-O', 'raw', path, join(dir, 'nr-ours.raw')]);
    expect(converted.exitCode).toBe(1);
    expect(converted.stderr).toMatch(/refcount_table_clusters at offset 56 is 0/);
  });

  it('l1_size 39681: check lists the same 168,200 findings and summary as qemu-img, within 10 s', async () => {
    const path = await damaged('l1size.qcow2', 38, 155);
    const theirs = await run('qemu-img', ['check', path]);
    const started = performance.now();
    const ours = await qcow86(['check', path]);
    const ms = performance.now() - started;
    expect(ours.exitCode).toBe(theirs.exitCode);
    expect(ours.stdout).toBe(theirs.stdout);
    expect(ours.stderr.split('\n').length).toBe(theirs.stderr.split('\n').length);
    expect(ours.stderr === theirs.stderr, 'findings differ').toBe(true);
    expect(ms).toBeLessThan(10_000);
  });
});

/**
 * One writer at a time, for every command that writes an image: while another live process holds an image's
 * write lock, each writing command exits 1 with a message naming the lock file and the holder, and the image (or
 * the destination it would truncate) is left byte for byte as it was.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { makeImage, qemuImg, sha256, tempDir } from '../helpers/qemu.js';
import { buildEngine } from '../helpers/build.js';
import { lockPathOf } from '../../src/io/lock.js';
import { qcow86 } from './cli.js';

const holderScript = resolve(import.meta.dirname, '../io/lock-holder.mjs');
const holders: ChildProcess[] = [];

/** A process that takes `path`'s write lock and keeps it until killed; resolves with its PID once it holds it. */
function holdLock(path: string): Promise<number> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [holderScript, buildEngine(), path], { stdio: ['ignore', 'pipe', 'pipe'] });
    holders.push(child);
    let err = '';
    child.stderr!.on('data', (chunk: Buffer) => (err += chunk.toString()));
    child.stdout!.on('data', (chunk: Buffer) => chunk.toString().includes('locked') && resolvePromise(child.pid!));
    child.on('close', (code) => reject(new Error(`lock holder exited with ${code}: ${err}`)));
  });
}

afterEach(async () => {
  await Promise.all(holders.splice(0).map((child) => new Promise<void>((done) => {
    if (child.exitCode !== null) return done();
    child.on('close', () => done());
    child.kill('SIGKILL');
  })));
});

describe('a second writer is refused by every writing command', () => {
  it('io, boot --overlay, commit (either image), convert and create (an existing destination is not truncated), amend, resize, rebase, snapshot, check -r', async () => {
    const dir = tempDir('qcow86-writers-');
    const base = await makeImage({ path: join(dir, 'base.qcow2'), size: '4M' }, [{ offset: 0, length: 65536, pattern: 0x11 }]);
    const top = await makeImage({ path: join(dir, 'top.qcow2'), size: '4M', backing: 'base.qcow2', backingFormat: 'qcow2' }, [{ offset: 65536, length: 65536, pattern: 0x22 }]);
    const source = await makeImage({ path: join(dir, 'source.qcow2'), size: '4M' }, [{ offset: 0, length: 4096, pattern: 0x33 }]);
    const raw = join(dir, 'dest.raw');
    copyFileSync(base, raw);
    const cases: { locked: string; args: string[] }[] = [
      { locked: top, args: ['io', '-c', 'write -P 1 0 4k', top] },
      { locked: top, args: ['boot', '--overlay', top, '--timeout', '5', '--expect', 'never'] },
      { locked: top, args: ['commit', top] },
      { locked: base, args: ['commit', top] },
      { locked: raw, args: ['convert', '-O', 'raw', source, raw] },
      { locked: top, args: ['convert', '-O', 'qcow2', source, top] },
      { locked: top, args: ['create', '-f', 'qcow2', top, '1M'] },
      { locked: raw, args: ['create', '-f', 'raw', raw, '1M'] },
      { locked: top, args: ['amend', '-o', 'lazy_refcounts=on', top] },
      { locked: top, args: ['resize', top, '+1M'] },
      { locked: top, args: ['rebase', '-u', '-b', '', top] },
      { locked: top, args: ['snapshot', '-c', 'snap', top] },
      { locked: top, args: ['check', '-r', 'all', top] },
    ];
    for (const { locked, args } of cases) {
      const before = { locked: await sha256(locked), base: await sha256(base), top: await sha256(top) };
      const pid = await holdLock(locked);
      const result = await qcow86(args);
      const what = `qcow86 ${args.join(' ')} (${locked} locked)`;
      expect(result.exitCode, `${what}: ${result.stderr}`).toBe(1);
      expect(result.stderr, what).toContain(`Failed to get "write" lock: the image is in use by process ${pid}`);
      expect(result.stderr, what).toContain(`lock file ${lockPathOf(locked)}`);
      expect(await sha256(locked), what).toBe(before.locked);
      expect(await sha256(base), what).toBe(before.base);
      expect(await sha256(top), what).toBe(before.top);
      holders.pop()!.kill('SIGKILL');
      await new Promise((done) => setTimeout(done, 50));
    }
    // Once the holders are gone, the same commands go ahead (the lock of a killed holder is taken over at once).
    expect((await qcow86(['io', '-c', 'write -P 1 0 4k', top])).exitCode).toBe(0);
    expect((await qcow86(['convert', '-O', 'raw', source, raw])).exitCode).toBe(0);
    await qemuImg(['check', top]);
    expect(existsSync(lockPathOf(top))).toBe(false);
  });
});

/**
 * One writer per image in Node: a second live writer is refused with a message naming the lock; a lock whose
 * holder was SIGKILLed is taken over at once.
 */
import { describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { makeImage, qemuIo, tempDir } from '../helpers/qemu.js';
import { buildEngine } from '../helpers/build.js';
import { WriteLock, lockPathOf, openForWriting } from '../../src/io/lock.js';
import { LockError } from '../../src/qcow2/errors.js';
import { expectClean } from '../helpers/engine.js';

const holder = resolve(import.meta.dirname, 'lock-holder.mjs');

function startHolder(path: string): Promise<{ pid: number; kill: () => Promise<void> }> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [holder, buildEngine(), path], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    child.stderr.on('data', (chunk: Buffer) => (err += chunk.toString()));
    child.stdout.on('data', (chunk: Buffer) => {
      if (chunk.toString().includes('locked')) {
        resolvePromise({
          pid: child.pid!,
          kill: () => new Promise((done) => {
            child.on('close', () => done());
            child.kill('SIGKILL');
          }),
        });
      }
    });
    child.on('close', (code) => reject(new Error(`lock holder exited with ${code}: ${err}`)));
  });
}

async function refused(promise: Promise<unknown>): Promise<LockError> {
  try {
    await promise;
  } catch (error) {
    expect(error).toBeInstanceOf(LockError);
    return error as LockError;
  }
  throw new Error('a second writer was not refused');
}

describe('write lock', () => {
  it('refuses a second writer in the same process and frees the lock on release', async () => {
    const path = await makeImage({ path: join(tempDir(), 'l.qcow2'), size: '1M' });
    const lock = await WriteLock.acquire(path);
    const error = await refused(WriteLock.acquire(path));
    expect(error.message).toContain(lockPathOf(path));
    expect(error.message).toContain(`process ${process.pid}`);
    await lock.release();
    expect(existsSync(lockPathOf(path))).toBe(false);
    await (await WriteLock.acquire(path)).release();
  });

  it('refuses while another live process holds it, takes it over at once after SIGKILL', async () => {
    const path = await makeImage({ path: join(tempDir(), 'k.qcow2'), size: '1M' });
    const child = await startHolder(path);
    const error = await refused(openForWriting(path));
    expect(error.message).toMatch(/Failed to get "write" lock/);
    expect(error.message).toContain(`process ${child.pid}`);
    expect(error.message).toContain(lockPathOf(path));
    await child.kill();
    const image = await openForWriting(path);
    await image.write(0, new Uint8Array(4096).fill(7));
    await image.close();
    expect(existsSync(lockPathOf(path))).toBe(false);
    await qemuIo(['-c', 'read -P 7 0 4k', path]);
    await expectClean(path);
  });

  it('a lock file left empty or garbled by a dying writer does not block', async () => {
    const path = await makeImage({ path: join(tempDir(), 'g.qcow2'), size: '1M' });
    const { writeFile } = await import('node:fs/promises');
    await writeFile(lockPathOf(path), '');
    const lock = await WriteLock.acquire(path);
    await lock.release();
    await writeFile(lockPathOf(path), JSON.stringify({ pid: 2 ** 22 + 12345, host: (await import('node:os')).hostname(), start: '1' }));
    await (await WriteLock.acquire(path)).release();
  });
});

/**
 * One writer per image in Node: a second live writer is refused with a message naming the lock; a lock whose
 * holder was SIGKILLed is taken over at once.
 */
import { describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import { makeImage, qemuIo, tempDir } from '../helpers/qemu.js';
import { buildEngine } from '../helpers/build.js';
import { WriteLock, lockPathOf, openForWriting } from '../../src/io/lock.js';
import { LockError } from '../../src/qcow2/errors.js';
import { expectClean } from '../helpers/engine.js';

const holder = resolve(import.meta.dirname, 'lock-holder.mjs');
const racer = resolve(import.meta.dirname, 'lock-racer.mjs');

/**
 * Starts `count` processes that all try to take the lock the moment a go file appears; resolves with how many
 * got it and the refusals, then lets the winners go.
 */
async function race(path: string, count: number): Promise<{ winners: number; refusals: string[] }> {
  const go = join(tempDir(), 'go');
  const children = Array.from({ length: count }, () => spawn(process.execPath, [racer, buildEngine(), path, go], { stdio: ['pipe', 'pipe', 'pipe'] }));
  const closed = children.map((child) => new Promise<void>((done) => child.on('close', () => done())));
  const outcomes = children.map((child) => new Promise<string>((resolvePromise, reject) => {
    let out = '';
    let err = '';
    child.stdout!.on('data', (chunk: Buffer) => {
      out += chunk.toString();
      if (out.includes('\n')) resolvePromise(out.trim());
    });
    child.stderr!.on('data', (chunk: Buffer) => (err += chunk.toString()));
    child.on('close', (exitCode) => reject(new Error(`racer exited with ${exitCode} before answering: ${err}`)));
  }));
  // Every racer is polling for the go file by now (module loading takes far less than this).
  await new Promise((done) => setTimeout(done, 1500));
  writeFileSync(go, '');
  const answers = await Promise.all(outcomes);
  for (const child of children) child.stdin!.end();
  await Promise.all(closed);
  return { winners: answers.filter((a) => a === 'locked').length, refusals: answers.filter((a) => a !== 'locked') };
}

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

  it('processes started together never both hold it: a free lock, and a dead holder\'s lock', async () => {
    const dir = tempDir();
    const path = await makeImage({ path: join(dir, 'race.qcow2'), size: '1M' });
    for (let round = 0; round < 4; round++) {
      // Odd rounds: a lock left by a dead process, which every racer wants to take over at once.
      if (round % 2 === 1) writeFileSync(lockPathOf(path), JSON.stringify({ pid: 2 ** 22 + 4321, host: hostname(), start: '1', nonce: `dead-${round}` }));
      const { winners, refusals } = await race(path, 6);
      expect(winners, refusals.join('\n')).toBe(1);
      for (const refusal of refusals) expect(refusal).toMatch(/^refused .*Failed to get "write" lock/);
      expect(existsSync(lockPathOf(path))).toBe(false);
    }
    // Nothing but the image is left behind: no records, no claims.
    expect(readdirSync(dir).sort()).toEqual(['race.qcow2']);
  });

  it('a taker that died holding a claim does not block the next one', async () => {
    const dir = tempDir();
    const path = await makeImage({ path: join(dir, 'claim.qcow2'), size: '1M' });
    const dead = (nonce: string) => JSON.stringify({ pid: 2 ** 22 + 999, host: hostname(), start: '1', nonce });
    const stale = dead('stale');
    writeFileSync(lockPathOf(path), stale);
    const { createHash } = await import('node:crypto');
    const claim = `${lockPathOf(path)}.takeover-${createHash('sha256').update(stale).digest('hex').slice(0, 16)}`;
    writeFileSync(claim, dead('dead-taker'));
    const lock = await WriteLock.acquire(path);
    await refused(WriteLock.acquire(path));
    await lock.release();
    expect(readdirSync(dir).sort()).toEqual(['claim.qcow2']);
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

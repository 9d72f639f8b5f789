/**
 * One writer per image (Node): a lock file next to the image holding the writer's PID, start time and a random
 * nonce. A second live writer is refused with a message naming the lock and its holder; a lock whose holder is
 * gone (killed with SIGKILL, say) is taken over at once, because liveness is checked, not assumed.
 *
 * Atomicity, without a window between "no lock" and "lock written":
 * - A lock file only ever appears whole: the holder's record is written to a private file first and then
 *   hard-linked to the lock's name, which fails if the name exists (link(2) is atomic and exclusive).
 * - Taking over a dead holder's lock must replace exactly that lock and no newer one. The taker first claims
 *   that lock generation exclusively, by linking its record to a claim file named after a hash of the stale
 *   record; only the claim's owner re-reads the lock and, if it is still the stale record, renames its own
 *   record over it (rename(2) replaces atomically, so the lock name never goes missing). A taker that dies while
 *   holding a claim leaves a claim with a dead holder: the next taker claims the next level, named after that
 *   claim's record, and so on. Claims of a generation that is gone are removed by the taker that ends it.
 */
import { link, readFile, rename, stat, unlink, writeFile } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { createHash, randomUUID } from 'node:crypto';
import { hostname } from 'node:os';
import { LockError } from '../qcow2/errors.js';
import type { BlockDevice } from '../qcow2/device.js';
import { openImage, type OpenOptions } from '../qcow2/open.js';
import type { ByteStore } from '../qcow2/store.js';
import { FileStore } from './file.js';
import { nodeResolver } from './node-resolver.js';
import { nodeCodecs } from './node-codecs.js';
import { nodeCrypto } from './node-crypto.js';

export function lockPathOf(imagePath: string): string {
  return `${imagePath}.qcow86.lock`;
}

interface Holder {
  pid: number;
  host: string;
  /** Process start time (Linux /proc), so a recycled PID is not mistaken for the holder. */
  start: string;
  /** Tells two lock generations of one process apart. */
  nonce?: string;
}

function startTimeOf(pid: number): string {
  try {
    // Field 22 of /proc/PID/stat, counted after the parenthesised command name (which may contain spaces).
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? '';
  } catch {
    return '';
  }
}

function isAlive(holder: Holder): boolean {
  if (holder.host !== hostname()) return true; // cannot tell for another machine: assume it is alive
  try {
    process.kill(holder.pid, 0);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  const start = startTimeOf(holder.pid);
  return !(holder.start && start && start !== holder.start);
}

function parseHolder(text: string): Holder | undefined {
  try {
    const value = JSON.parse(text) as Holder;
    return Number.isInteger(value.pid) && typeof value.host === 'string' ? value : undefined;
  } catch {
    return undefined;
  }
}

const code = (error: unknown) => (error as NodeJS.ErrnoException).code;
const readOrUndefined = (path: string) => readFile(path, 'utf8').catch((error: unknown) => {
  if (code(error) === 'ENOENT') return undefined;
  throw error;
});
const claimName = (base: string, record: string) => `${base}.takeover-${createHash('sha256').update(record).digest('hex').slice(0, 16)}`;
const pause = (ms: number) => new Promise((done) => setTimeout(done, ms));

/** How long a taker waits for another live taker of the same stale lock before giving up (it finishes in ms). */
const TAKEOVER_WAIT_MS = 5_000;

export class WriteLock {
  private released = false;
  private constructor(
    readonly imagePath: string,
    readonly lockPath: string,
    private readonly content: string,
  ) {}

  /** Takes the image's write lock, or throws a LockError naming the lock file and the live holder. */
  static async acquire(imagePath: string): Promise<WriteLock> {
    const lockPath = lockPathOf(imagePath);
    const me: Holder = { pid: process.pid, host: hostname(), start: startTimeOf(process.pid), nonce: randomUUID() };
    const content = JSON.stringify(me);
    const record = `${lockPath}.${me.nonce}.tmp`;
    try {
      await writeFile(record, content, { flag: 'wx' });
    } catch (error) {
      throw new LockError(imagePath, `cannot create lock file ${lockPath}: ${(error as Error).message}`);
    }
    try {
      const deadline = Date.now() + TAKEOVER_WAIT_MS;
      for (;;) {
        try {
          await link(record, lockPath);
          return new WriteLock(imagePath, lockPath, content);
        } catch (error) {
          if (code(error) !== 'EEXIST') throw new LockError(imagePath, `cannot create lock file ${lockPath}: ${(error as Error).message}`);
        }
        const stale = await readOrUndefined(lockPath);
        if (stale === undefined) continue; // released meanwhile
        const holder = parseHolder(stale);
        if (holder && isAlive(holder)) {
          throw new LockError(imagePath, `Failed to get "write" lock: the image is in use by process ${holder.pid} on ${holder.host} (lock file ${lockPath})`);
        }
        // Dead holder, or a record no qcow86 writes (damaged): take it over.
        const outcome = await takeOver(lockPath, stale, record);
        if (outcome === 'taken') return new WriteLock(imagePath, lockPath, content);
        if (outcome === 'busy') {
          if (Date.now() > deadline) throw new LockError(imagePath, `Failed to get "write" lock: another process keeps taking over the stale lock file ${lockPath}`);
          await pause(5);
        }
      }
    } finally {
      await unlink(record).catch(() => {});
    }
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    // Only this holder (alive) can change a lock it holds: nobody takes over a live holder's lock.
    const text = await readOrUndefined(this.lockPath).catch(() => undefined);
    if (text === this.content) await unlink(this.lockPath).catch(() => {});
  }
}

/**
 * Replaces the stale lock record `stale` at `lockPath` by `record` (see the header comment): 'taken' when it did,
 * 'changed' when the lock is no longer that stale record (look again), 'busy' when a live taker is at it.
 */
async function takeOver(lockPath: string, stale: string, record: string): Promise<'taken' | 'changed' | 'busy'> {
  const deadClaims: string[] = [];
  let claim = claimName(lockPath, stale);
  for (let level = 0; level < 64; level++) {
    try {
      await link(record, claim);
    } catch (error) {
      if (code(error) !== 'EEXIST') throw error;
      const text = await readOrUndefined(claim);
      if (text === undefined) continue; // its taker finished: claim again
      const taker = parseHolder(text);
      if (taker && isAlive(taker)) return 'busy';
      deadClaims.push(claim);
      claim = claimName(claim, text);
      continue;
    }
    try {
      if ((await readOrUndefined(lockPath)) !== stale) return 'changed';
      await rename(record, lockPath);
      for (const dead of deadClaims) await unlink(dead).catch(() => {});
      return 'taken';
    } finally {
      await unlink(claim).catch(() => {});
    }
  }
  return 'busy';
}

/**
 * The write lock of a file a command is about to create or overwrite (create, convert): taken before the file is
 * truncated, so a file another writer holds is never truncated. A path that exists and is not a regular file (a
 * block device, /dev/null) gets no lock file beside it: there is no image there for another qcow86 to open.
 */
export async function lockOutput(path: string): Promise<WriteLock | undefined> {
  const existing = await stat(path).catch(() => undefined);
  if (existing && !existing.isFile()) return undefined;
  return WriteLock.acquire(path);
}

/** Runs `body` holding the write locks of `paths` (outputs, see lockOutput), released afterwards in any case. */
export async function withOutputLocks<T>(paths: readonly string[], body: () => Promise<T>): Promise<T> {
  const locks: (WriteLock | undefined)[] = [];
  try {
    for (const path of paths) locks.push(await lockOutput(path));
    return await body();
  } finally {
    for (const lock of locks.reverse()) await lock?.release();
  }
}

/**
 * Opens an image file read-write under its write lock; closing the device releases the lock. This is what
 * Node callers that modify images (CLI commands, the harness) use. With `store`, that store (already open on
 * `path`, read-write) is used instead of opening the file, with a resolver the caller chose in `options`.
 */
export async function openForWriting(path: string, options: Omit<OpenOptions, 'readOnly'> = {}, store?: () => Promise<ByteStore>): Promise<BlockDevice> {
  const lock = await WriteLock.acquire(path);
  try {
    const opened = store ? await store() : await FileStore.open(path, { readOnly: false });
    return releasedOnClose(await openImage(opened, { resolver: nodeResolver(), codecs: nodeCodecs(), crypto: nodeCrypto(), ...options, readOnly: false }), lock);
  } catch (error) {
    await lock.release();
    throw error;
  }
}

/** Makes closing `device` release `lock` too (after the device's own close, whatever its outcome). */
export function releasedOnClose<T extends BlockDevice>(device: T, lock: WriteLock | undefined): T {
  if (!lock) return device;
  const close = device.close.bind(device);
  device.close = async () => {
    try {
      await close();
    } finally {
      await lock.release();
    }
  };
  return device;
}

/**
 * One writer per image (Node): a lock file next to the image holding the writer's PID and start time. A second
 * live writer is refused with a message naming the lock; a lock whose holder is gone (killed with SIGKILL, say)
 * is taken over at once, because liveness is checked, not assumed.
 */
import { open, readFile, rename, unlink } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { LockError } from '../qcow2/errors.js';
import type { BlockDevice } from '../qcow2/device.js';
import { openImage, type OpenOptions } from '../qcow2/open.js';
import { FileStore, nodeResolver } from './node.js';
import { nodeCodecs } from './node-codecs.js';

export function lockPathOf(imagePath: string): string {
  return `${imagePath}.qcow86.lock`;
}

interface Holder {
  pid: number;
  host: string;
  /** Process start time (Linux /proc), so a recycled PID is not mistaken for the holder. */
  start: string;
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
    return Number.isInteger(value.pid) ? value : undefined;
  } catch {
    return undefined;
  }
}

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
    const me: Holder = { pid: process.pid, host: hostname(), start: startTimeOf(process.pid) };
    const content = JSON.stringify(me);
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        const handle = await open(lockPath, 'wx');
        try {
          await handle.writeFile(content);
          await handle.sync();
        } finally {
          await handle.close();
        }
        return new WriteLock(imagePath, lockPath, content);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw new LockError(imagePath, `cannot create lock file ${lockPath}: ${(error as Error).message}`);
      }
      const text = await readFile(lockPath, 'utf8').catch(() => undefined);
      if (text === undefined) continue; // released meanwhile
      const holder = parseHolder(text);
      // An empty or half-written file is a writer that died while taking the lock (or is taking it right now).
      if (holder && isAlive(holder)) {
        throw new LockError(imagePath, `Failed to get "write" lock: the image is in use by process ${holder.pid} on ${holder.host} (lock file ${lockPath})`);
      }
      // Stale: move it aside atomically, then make sure what we moved is the stale lock and not a new one.
      const aside = `${lockPath}.stale-${process.pid}-${attempt}`;
      try {
        await rename(lockPath, aside);
      } catch {
        continue;
      }
      const moved = await readFile(aside, 'utf8').catch(() => '');
      if (moved !== text) await rename(aside, lockPath).catch(() => {});
      else await unlink(aside).catch(() => {});
    }
    throw new LockError(imagePath, `Failed to get "write" lock: lock file ${lockPath} keeps changing`);
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    const text = await readFile(this.lockPath, 'utf8').catch(() => undefined);
    if (text === this.content) await unlink(this.lockPath).catch(() => {});
  }
}

/**
 * Opens an image file read-write under its write lock; closing the device releases the lock. This is what
 * Node callers that modify images (CLI commands, the harness) use.
 */
export async function openForWriting(path: string, options: Omit<OpenOptions, 'readOnly'> = {}): Promise<BlockDevice> {
  const lock = await WriteLock.acquire(path);
  try {
    const store = await FileStore.open(path, { readOnly: false });
    const device = await openImage(store, { resolver: nodeResolver(), codecs: nodeCodecs(), ...options, readOnly: false });
    const close = device.close.bind(device);
    device.close = async () => {
      try {
        await close();
      } finally {
        await lock.release();
      }
    };
    return device;
  } catch (error) {
    await lock.release();
    throw error;
  }
}

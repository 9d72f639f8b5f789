/**
 * A read-only tab reads a copy of the stored overlay taken at one moment, never the live file another tab is
 * writing: that tab's engine changes data and metadata in several writes, so a reader of the live file could
 * follow an L2 entry to a cluster not yet written, or to one since reused for something else.
 *
 * The copy is made by whoever may: the tab holding the overlay's writer lock flushes its engine and copies the
 * file between two guest requests (asked over a BroadcastChannel named after the overlay); when no tab writes the
 * disk, the reader takes the writer lock and copies the file itself. The reader holds a Web Lock named after the
 * copy for as long as it reads it, deletes it when it closes, and any tab opening the disk deletes copies whose
 * lock is free (their reader closed without doing so).
 */
import { BlobStore, OpfsStore, opfsNames, opfsRemove, type MakeRoom } from '../io/opfs.js';
import { copyLock, tryLock, writerLock } from './web-locks.js';
import { copyToFile } from './overlay-files.js';

const COPY = '.copy-';
/** A copy's name: the overlay's (which ends in .qcow2), COPY, a time and a random part. No overlay is named so. */
const COPY_NAME = /\.qcow2\.copy-[0-9a-z]+-[0-9a-z]+$/;
/** How long a reader waits for the writing tab's copy (it runs between the writer's guest requests). */
const ANSWER_MS = 30_000;
/** How often a reader waiting for that copy looks whether the writer is still there. */
const POLL_MS = 250;

interface CopyMessage {
  /** A reader's request: copy the overlay into this file. */
  want?: string;
  done?: string;
  failed?: string;
  message?: string;
}

function channelFor(overlay: string): BroadcastChannel {
  return new BroadcastChannel(`qcow86-copies:${overlay}`);
}

/**
 * The writer's side, while it holds the writer lock of `overlay`: answers readers' requests with `copy(into)`,
 * which must run in the Worker's request order after a flush. Returns the function that stops answering.
 */
export function serveCopies(overlay: string, copy: (into: string) => Promise<void>): () => void {
  const channel = channelFor(overlay);
  channel.onmessage = (event: MessageEvent<CopyMessage>) => {
    const into = event.data.want;
    if (typeof into !== 'string' || !into.startsWith(overlay + COPY) || !COPY_NAME.test(into)) return;
    copy(into).then(
      () => channel.postMessage({ done: into } satisfies CopyMessage),
      (error: unknown) => channel.postMessage({ failed: into, message: (error as Error).message ?? String(error) } satisfies CopyMessage),
    );
  };
  return () => channel.close();
}

export interface ReadOnlyCopy {
  store: BlobStore;
  /** When the copy was taken. */
  at: number;
  /** Deletes the copy; call when the tab stops reading it. */
  release(): Promise<void>;
}

/** A consistent copy of `overlay` for a read-only tab (see the module comment). */
export async function takeCopy(dir: FileSystemDirectoryHandle, overlay: string, makeRoom: MakeRoom | undefined): Promise<ReadOnlyCopy> {
  const into = `${overlay}${COPY}${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
  const releaseCopy = await tryLock(copyLock(into));
  if (!releaseCopy) throw new Error(`the copy ${into} is in use`);
  try {
    await copyByWhoeverMay(dir, overlay, into, makeRoom);
    const at = Date.now();
    const file = await (await dir.getFileHandle(into)).getFile();
    const store = new BlobStore(`opfs:${dir.name}/${overlay} (copy of ${new Date(at).toLocaleTimeString()})`, file);
    let released = false;
    return {
      store,
      at,
      release: async () => {
        if (released) return;
        released = true;
        try {
          await opfsRemove(dir, into);
        } finally {
          releaseCopy();
        }
      },
    };
  } catch (error) {
    await opfsRemove(dir, into).catch(() => {});
    releaseCopy();
    throw error;
  }
}

/**
 * Has the writing tab copy `overlay` into `into`, or copies it here once no tab writes it: the writer lock is
 * tried again while the answer is awaited, since a tab that just closed may still hold it for a moment (and then
 * never answers).
 */
async function copyByWhoeverMay(dir: FileSystemDirectoryHandle, overlay: string, into: string, makeRoom: MakeRoom | undefined): Promise<void> {
  const channel = channelFor(overlay);
  let answer: CopyMessage | undefined;
  channel.onmessage = (event: MessageEvent<CopyMessage>) => {
    if (event.data.done === into || event.data.failed === into) answer = event.data;
  };
  try {
    const deadline = Date.now() + ANSWER_MS;
    let asked = false;
    for (;;) {
      if (answer?.done) return;
      if (answer?.failed) throw new Error(`the tab writing this disk could not copy it: ${answer.message}`);
      // A writer copying holds its lock: the lock is free only once it is gone, so there is one copier at a time.
      const releaseWriter = await tryLock(writerLock(overlay));
      if (releaseWriter) {
        // Nobody writes the disk now: the stored file itself is consistent, and stays so while the lock is ours.
        try {
          const stored = await OpfsStore.open(dir, overlay, { readOnly: true });
          try {
            await copyToFile(dir, stored, into, makeRoom);
          } finally {
            await stored.close();
          }
          return;
        } finally {
          releaseWriter();
        }
      }
      if (!asked) {
        channel.postMessage({ want: into } satisfies CopyMessage);
        asked = true;
      }
      if (Date.now() > deadline) {
        throw new Error(`the tab writing this disk did not hand over a copy within ${ANSWER_MS / 1000} s (it may be busy or suspended): try again, or use a fresh disk`);
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  } finally {
    channel.close();
  }
}

/** Deletes the copies no reader holds any more (their tab closed before deleting them), of every overlay. */
export async function sweepCopies(dir: FileSystemDirectoryHandle): Promise<void> {
  for (const name of await opfsNames(dir)) {
    if (!COPY_NAME.test(name)) continue;
    const release = await tryLock(copyLock(name));
    if (!release) continue;
    try {
      await opfsRemove(dir, name);
    } catch {
      // Still being written by the writer for a reader that gave up: the next sweep takes it.
    } finally {
      release();
    }
  }
}

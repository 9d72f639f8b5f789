/**
 * The stored overlay's files in OPFS and the steps that replace or copy it without a moment where the user's
 * disk is lost. Beside the overlay `NAME` live, for a while:
 * - `NAME.incoming`: a file being opened (Open overlay), staged here and opened read-write before it replaces
 *   anything;
 * - `NAME.previous`: the replaced disk, between the two renames of a replacement (a crash in between is undone
 *   by `recoverReplacement` at the next open);
 * - `NAME.copy-ID`: a consistent copy a read-only tab reads (see readonly-copy.ts).
 * Only the holder of the overlay's writer lock creates, renames or deletes the first two.
 */
import type { ByteStore } from '../qcow2/store.js';
import { OpfsStore, opfsExists, opfsRemove, opfsRename, removeKeptBlocks, type MakeRoom } from '../io/opfs.js';
import type { BaseHandle } from './disk-open.js';

/**
 * What a stored overlay may be called: its name comes from the page's address (?disk=), and must never be one of
 * the files kept beside an overlay (which end otherwise), or a file of them would be taken for it and deleted.
 */
const OVERLAY_NAME = /^[\w.-]{0,200}\.qcow2$/;

/** Refuses a name that is not a stored overlay's (see OVERLAY_NAME), with the rule in words. */
export function checkOverlayName(name: string): void {
  if (!OVERLAY_NAME.test(name)) {
    throw new Error(`'${name}' cannot name a disk in this browser: a disk name is letters, digits, '_', '-' and '.', ending in .qcow2`);
  }
}

const INCOMING = '.incoming';
const PREVIOUS = '.previous';
/** Copies are written and read in pieces of this size (a whole overlay may not fit in memory twice). */
const CHUNK = 4 * 1024 * 1024;

/**
 * What the disk Worker does when the site's storage is full: the base's blocks kept in this browser are a
 * cache, so they go first (this base's and every other base's no tab holds open).
 */
export function makeRoomFor(base: BaseHandle): MakeRoom {
  return async () => {
    const dropped = base.dropKeptBlocks();
    const freed = await removeKeptBlocks().catch(() => 0);
    return dropped || freed > 0;
  };
}

/** Puts the overlay's files in order after a replacement a closed tab left half done. Holding the writer lock. */
export async function recoverReplacement(dir: FileSystemDirectoryHandle, name: string): Promise<void> {
  const previous = name + PREVIOUS;
  if (await opfsExists(dir, previous)) {
    // Both present: the new disk was in place (the user had confirmed it), only the old one's removal was left.
    // Only the old one: the tab closed between the renames, before the new disk was in place: it comes back.
    if (await opfsExists(dir, name)) await opfsRemove(dir, previous);
    else await opfsRename(dir, previous, name);
  }
  await opfsRemove(dir, name + INCOMING);
}

/** Writes `file` into the staging file of overlay `name`; the caller opens (and closes) the returned store. */
export async function stageFile(dir: FileSystemDirectoryHandle, name: string, file: Blob, makeRoom: MakeRoom): Promise<OpfsStore> {
  const store = await OpfsStore.open(dir, name + INCOMING, { create: true, makeRoom });
  try {
    await store.truncate(0);
    for (let at = 0; at < file.size; at += CHUNK) {
      await store.write(at, new Uint8Array(await file.slice(at, at + CHUNK).arrayBuffer()));
    }
    await store.flush();
    return store;
  } catch (error) {
    await store.close().catch(() => {});
    await opfsRemove(dir, name + INCOMING).catch(() => {});
    throw error;
  }
}

/** Opens the (emptied) staging file of overlay `name`, for a disk built there (Encrypt disk). */
export async function openStaging(dir: FileSystemDirectoryHandle, name: string, makeRoom: MakeRoom): Promise<OpfsStore> {
  const store = await OpfsStore.open(dir, name + INCOMING, { create: true, makeRoom });
  await store.truncate(0);
  return store;
}

/** Deletes a staged file that will not be used. */
export async function dropStaged(dir: FileSystemDirectoryHandle, name: string): Promise<void> {
  await opfsRemove(dir, name + INCOMING);
}

/**
 * Puts the staged file in the overlay's place, keeping the replaced one as NAME.previous until `dropPrevious`
 * (or `swapBack`). Neither file may be open. On failure the overlay is where it was.
 */
export async function swapIn(dir: FileSystemDirectoryHandle, name: string): Promise<void> {
  await opfsRename(dir, name, name + PREVIOUS);
  try {
    await opfsRename(dir, name + INCOMING, name);
  } catch (error) {
    await opfsRename(dir, name + PREVIOUS, name);
    throw error;
  }
}

/** Undoes `swapIn`: the replaced overlay comes back (the staged file is deleted). */
export async function swapBack(dir: FileSystemDirectoryHandle, name: string): Promise<void> {
  await opfsRename(dir, name + PREVIOUS, name);
}

/** Ends a replacement: the replaced overlay is deleted. */
export async function dropPrevious(dir: FileSystemDirectoryHandle, name: string): Promise<void> {
  await opfsRemove(dir, name + PREVIOUS);
}

/** Writes the whole of `from` into a new file `into` (replacing one of that name), flushed and closed. */
export async function copyToFile(dir: FileSystemDirectoryHandle, from: ByteStore, into: string, makeRoom: MakeRoom | undefined): Promise<void> {
  const size = await from.size();
  const store = await OpfsStore.open(dir, into, { create: true, makeRoom });
  try {
    await store.truncate(0);
    for (let at = 0; at < size; at += CHUNK) await store.write(at, await from.read(at, Math.min(CHUNK, size - at)));
    await store.flush();
    await store.close();
  } catch (error) {
    await store.close().catch(() => {});
    await opfsRemove(dir, into).catch(() => {});
    throw error;
  }
}

/**
 * Open overlay, in the disk Worker. A picked file is checked against the page's base, written into a staging
 * file beside the stored overlay and opened read-write there, as it will be used; the stored disk is not touched
 * until the user confirms. Then the staged file takes the overlay's place by renames (overlay-files.ts) and is
 * opened in place; any failure puts the old disk back and reopens it, so the guest goes on with it.
 */
import type { BlockDevice } from '../qcow2/device.js';
import type { MemoryStore } from '../io/memory.js';
import { OpfsStore, opfsDirectory, quotaErrorIn, type MakeRoom } from '../io/opfs.js';
import { DiskMap } from './disk-map.js';
import { openTop, validateImport, type BaseHandle } from './disk-open.js';
import { dropPrevious, dropStaged, stageFile, swapBack, swapIn } from './overlay-files.js';
import { formatBytes } from './format.js';
import { ProblemError } from './problem.js';

/** The Worker's open disk, as far as replacing it goes: the replacement is opened into it. */
export interface StoredDisk {
  overlayName: string;
  base: BaseHandle;
  makeRoom: MakeRoom;
  overlayStore: OpfsStore | MemoryStore;
  device: BlockDevice;
  map: DiskMap;
}

/** A file staged and open read-write, waiting for the user to confirm the swap. */
export interface Staged {
  store: OpfsStore;
  device: BlockDevice;
  map: DiskMap;
}

/** Checks `file`, stages it beside `disk`'s overlay and opens it read-write there. */
export async function stage(disk: StoredDisk, file: Blob, fileName: string): Promise<Staged> {
  const problem = await validateImport(file, fileName, disk.base.url, disk.base);
  if (problem) throw new ProblemError('foreign-overlay', problem);
  const dir = await opfsDirectory();
  let store: OpfsStore;
  try {
    store = await stageFile(dir, disk.overlayName, file, disk.makeRoom);
  } catch (error) {
    if (quotaErrorIn(error)) {
      throw new ProblemError('quota', `There is not enough browser storage to take in ${fileName} (${formatBytes(file.size)}), even after deleting the base image's blocks kept in this browser. Your disk was not changed. Free space, then try again.`);
    }
    throw error;
  }
  try {
    const device = await openTop(store, disk.base);
    try {
      return { store, device, map: await DiskMap.build(device) };
    } catch (error) {
      await device.close().catch(() => {});
      throw error;
    }
  } catch (error) {
    await store.close().catch(() => {});
    await dropStaged(dir, disk.overlayName).catch(() => {});
    throw new ProblemError('foreign-overlay', `${fileName} cannot be used: ${(error as Error).message}`);
  }
}

/** Closes and deletes a staged file that will not be used. */
export async function unstage(disk: StoredDisk, staged: Staged): Promise<void> {
  await staged.device.close().catch(() => {});
  await staged.store.close().catch(() => {});
  await dropStaged(await opfsDirectory(), disk.overlayName).catch(() => {});
}

/**
 * Puts `staged` in place of `disk`'s overlay and opens it into `disk`. `flushOld` makes the old disk whole first
 * (it must be, should the replacement fail).
 */
export async function swapStaged(disk: StoredDisk, staged: Staged, flushOld: () => Promise<void>): Promise<void> {
  const dir = await opfsDirectory();
  await staged.device.close();
  await staged.store.close();
  await flushOld();
  await disk.device.close();
  await disk.overlayStore.close();
  try {
    await swapIn(dir, disk.overlayName);
  } catch (error) {
    await dropStaged(dir, disk.overlayName).catch(() => {});
    await reopenStored(disk);
    throw new ProblemError('other', `The overlay could not be put in place of the stored disk (${(error as Error).message}); the disk was not changed.`);
  }
  try {
    await reopenStored(disk);
  } catch (error) {
    await disk.overlayStore.close().catch(() => {});
    await swapBack(dir, disk.overlayName);
    await reopenStored(disk);
    throw new ProblemError('foreign-overlay', `The overlay could not be opened in place (${(error as Error).message}); the disk was not changed.`);
  }
  await dropPrevious(dir, disk.overlayName).catch(() => {});
}

/** Opens the stored overlay file again into `disk` (same lock, same base). */
async function reopenStored(disk: StoredDisk): Promise<void> {
  disk.overlayStore = await OpfsStore.open(await opfsDirectory(), disk.overlayName, { makeRoom: disk.makeRoom });
  disk.device = await openTop(disk.overlayStore, disk.base);
  disk.map = await DiskMap.build(disk.device);
}

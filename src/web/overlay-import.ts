/**
 * Open overlay, in the disk Worker. A picked file is checked against the page's base, written into a staging
 * file beside the stored overlay and opened read-write there, as it will be used; the stored disk is not touched
 * until the user confirms. Then the staged file takes the overlay's place by renames (overlay-files.ts) and is
 * opened in place; any failure puts the old disk back and reopens it, so the guest goes on with it.
 * "Encrypt disk" and "Decrypt disk" go the same way: the encrypted (or plain) copy of the disk is built in the
 * staging file, then swapped in.
 */
import type { BlockDevice } from '../qcow2/device.js';
import { KeyError } from '../qcow2/errors.js';
import { Qcow2Image } from '../qcow2/image.js';
import type { MemoryStore } from '../io/memory.js';
import { OpfsStore, opfsDirectory, quotaErrorIn, type MakeRoom } from '../io/opfs.js';
import { DiskMap } from './disk-map.js';
import { makeOverlay, openTop, validateImport, type BaseHandle } from './disk-open.js';
import { dropPrevious, dropStaged, openStaging, stageFile, swapBack, swapIn } from './overlay-files.js';
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
  /** The passphrase of an encrypted overlay, in memory while it is open (never stored): reopening needs it. */
  password: Uint8Array | undefined;
}

/** A file staged and open read-write, waiting for the user to confirm the swap. */
export interface Staged {
  store: OpfsStore;
  device: BlockDevice;
  map: DiskMap;
  /** The passphrase it opened with, when it is encrypted. */
  password: Uint8Array | undefined;
}

/**
 * Checks `file`, stages it beside `disk`'s overlay and opens it read-write there; `password` opens an encrypted
 * one (a KeyError goes to the caller, which asks for the passphrase and tries again).
 */
export async function stage(disk: StoredDisk, file: Blob, fileName: string, password?: Uint8Array): Promise<Staged> {
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
    const device = await openTop(store, disk.base, undefined, password);
    try {
      return { store, device, map: await DiskMap.build(device), password };
    } catch (error) {
      await device.close().catch(() => {});
      throw error;
    }
  } catch (error) {
    await store.close().catch(() => {});
    await dropStaged(dir, disk.overlayName).catch(() => {});
    if (error instanceof KeyError) throw error;
    throw new ProblemError('foreign-overlay', `${fileName} cannot be used: ${(error as Error).message}`);
  }
}

/**
 * "Encrypt disk" and "Decrypt disk": a new overlay holding what `disk`'s overlay holds itself (its data and zero
 * clusters; what it reads from the base stays there), LUKS-encrypted (QEMU's defaults) with `password`, or plain
 * without one, built in the staging file; the caller swaps it in (swapStaged). Sessions are not carried over.
 */
export async function stageCopy(disk: StoredDisk, password: Uint8Array | undefined): Promise<Staged> {
  const dir = await opfsDirectory();
  let store: OpfsStore | undefined;
  try {
    store = await openStaging(dir, disk.overlayName, disk.makeRoom);
    await makeOverlay(store, disk.base.url, disk.base, disk.base.device.virtualSize, password);
    const device = await openTop(store, disk.base, undefined, password);
    try {
      await copyOwnData(disk.device, device);
      await device.flush();
      return { store, device, map: await DiskMap.build(device), password };
    } catch (error) {
      await device.close().catch(() => {});
      throw error;
    }
  } catch (error) {
    await store?.close().catch(() => {});
    await dropStaged(dir, disk.overlayName).catch(() => {});
    const copy = password ? 'encrypted' : 'decrypted';
    if (quotaErrorIn(error)) throw new ProblemError('quota', `There is not enough browser storage for the ${copy} copy of this disk (${(error as Error).message}). Your disk was not changed.`);
    throw error;
  }
}

/** Copies what `source` holds itself (its data and zero clusters, not what it reads from its base) into `target`. */
async function copyOwnData(source: BlockDevice, target: BlockDevice): Promise<void> {
  if (!(source instanceof Qcow2Image) || !(target instanceof Qcow2Image)) throw new ProblemError('other', 'the disk is not a qcow2 overlay');
  const slice = 64 * 1024 * 1024;
  for (let offset = 0; offset < source.virtualSize; offset += slice) {
    for (const extent of await source.mapRange(offset, Math.min(slice, source.virtualSize - offset))) {
      if (extent.kind === 'unallocated') continue;
      if (extent.kind === 'zero') await target.writeZeroes(extent.guestOffset, extent.length);
      else await target.write(extent.guestOffset, await source.read(extent.guestOffset, extent.length));
    }
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
  const oldPassword = disk.password;
  try {
    await swapIn(dir, disk.overlayName);
  } catch (error) {
    await dropStaged(dir, disk.overlayName).catch(() => {});
    await reopenStored(disk);
    throw new ProblemError('other', `The overlay could not be put in place of the stored disk (${(error as Error).message}); the disk was not changed.`);
  }
  try {
    disk.password = staged.password;
    await reopenStored(disk);
  } catch (error) {
    await disk.overlayStore.close().catch(() => {});
    await swapBack(dir, disk.overlayName);
    disk.password = oldPassword;
    await reopenStored(disk);
    throw new ProblemError('foreign-overlay', `The overlay could not be opened in place (${(error as Error).message}); the disk was not changed.`);
  }
  await dropPrevious(dir, disk.overlayName).catch(() => {});
}

/** Opens the stored overlay file again into `disk` (same lock, same base). */
async function reopenStored(disk: StoredDisk): Promise<void> {
  disk.overlayStore = await OpfsStore.open(await opfsDirectory(), disk.overlayName, { makeRoom: disk.makeRoom });
  disk.device = await openTop(disk.overlayStore, disk.base, undefined, disk.password);
  disk.map = await DiskMap.build(disk.device);
}

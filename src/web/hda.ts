/**
 * The object v86 uses as its first hard disk, over any BlockDevice (here the Worker's disk proxy).
 * Contract (npm v86 0.5.462, see /work/shared/guest-recipe.md): `load()` must call `onload()`; the npm build also
 * awaits `get_and_cache(0, 512)` and then reads `get_from_cache(0, 512)` for the CHS geometry; `get` may answer
 * late and ignores answers after its signal aborts (a device reset); PIO writes pass v86's reusable scratch
 * buffer, so `set` copies it before returning.
 */
import type { BlockDevice } from '../qcow2/device.js';

export interface DiskHooks {
  /** A read or write failed: the guest's command stays busy (it never sees half an answer); the page says why. */
  onError(error: unknown): void;
}

export interface V86Disk {
  byteLength: number;
  onload: (() => void) | undefined;
  onprogress: ((event: unknown) => void) | undefined;
  load(): void;
  get(start: number, length: number, callback: (bytes: Uint8Array) => void, options?: { signal?: AbortSignal }): void;
  set(start: number, data: Uint8Array, callback: () => void): void;
  get_and_cache(start: number, length: number, callback: (bytes: Uint8Array) => void): void;
  get_from_cache(start: number, length: number): Uint8Array | undefined;
  get_buffer(callback: (buffer: ArrayBuffer | undefined) => void): void;
  get_state(): unknown[];
  set_state(state: unknown[]): void;
}

export function v86Disk(device: BlockDevice, hooks: DiskHooks): V86Disk {
  let mbr: Uint8Array | undefined;
  const disk: V86Disk = {
    byteLength: device.virtualSize,
    onload: undefined,
    onprogress: undefined,
    load() {
      disk.onload?.();
    },
    get(start, length, callback, options) {
      device.read(start, length).then(
        (bytes) => {
          if (!options?.signal?.aborted) callback(bytes);
        },
        (error) => hooks.onError(error),
      );
    },
    set(start, data, callback) {
      device.write(start, data.slice()).then(callback, (error) => hooks.onError(error));
    },
    get_and_cache(start, length, callback) {
      device.read(start, length).then((bytes) => {
        if (start === 0) mbr = bytes;
        callback(bytes);
      }, (error) => hooks.onError(error));
    },
    get_from_cache(start, length) {
      return start === 0 && mbr && mbr.length >= length ? mbr.subarray(0, length) : undefined;
    },
    get_buffer(callback) {
      callback(undefined);
    },
    // The disk lives in the overlay, never in v86's machine state.
    get_state() {
      return [];
    },
    set_state() {},
  };
  return disk;
}

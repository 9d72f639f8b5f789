/**
 * Rebase (qemu-img rebase): giving an overlay a different backing file, or none. Safe mode first copies into the
 * overlay every range the overlay leaves to its backing chain (at subcluster granularity with extended L2) where
 * the old chain and the new one read differently, so the guest-visible disk stays the same; then the header's
 * backing name, format and qcow86 backing validator are rewritten. Unsafe mode (-u) does the header part only.
 */
import type { BlockDevice } from './device.js';
import type { Qcow2Image } from './image.js';
import { SUBCLUSTERS } from './mapping.js';
import { encodeHeader, setBackingValidator } from './header.js';
import { FormatError } from './errors.js';

/** Guest bytes compared per step (rounded to whole clusters). */
const STEP = 4 * 1024 * 1024;

export interface NewBacking {
  /** The name to record, as given (relative names stay relative); undefined or '' removes the backing file. */
  file?: string | undefined;
  format?: string | undefined;
  /** The new backing store's validator (an HTTP base's ETag...); undefined removes the 'q86v' extension. */
  validator?: string | undefined;
}

/** Reads `length` bytes at `offset` of a backing device, zeros past its end (or everywhere without one). */
async function readBacking(device: BlockDevice | undefined, offset: number, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  if (!device) return out;
  const available = Math.max(0, Math.min(length, device.virtualSize - offset));
  if (available > 0) out.set(await device.read(offset, available), 0);
  return out;
}

function sameBytes(a: Uint8Array, b: Uint8Array, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (a[i] !== b[i]) return false;
  return true;
}

/**
 * Safe-mode copy: for each unit (cluster, or subcluster with extended L2) that `overlay`'s own layer leaves to its
 * backing and where its current (old) backing chain and `newBacking` differ, writes the old contents into the
 * overlay. `overlay` must be open read-write on its old backing chain; `newBacking` undefined means no backing.
 */
export async function copyDifferences(overlay: Qcow2Image, newBacking: BlockDevice | undefined, options: { progress?: (fraction: number) => void } = {}): Promise<void> {
  const size = overlay.virtualSize;
  const cs = overlay.clusterSize;
  const unit = overlay.geometry.extendedL2 ? cs / SUBCLUSTERS : cs;
  const step = Math.max(cs, Math.floor(STEP / cs) * cs);
  const old = overlay.backing;
  options.progress?.(0);
  for (let chunk = 0; chunk < size; chunk += step) {
    const chunkLength = Math.min(step, size - chunk);
    const extents = await overlay.mapRange(chunk, chunkLength);
    for (const extent of extents) {
      if (extent.kind !== 'unallocated') continue;
      const start = extent.guestOffset;
      const before = await readBacking(old, start, extent.length);
      const after = await readBacking(newBacking, start, extent.length);
      // Runs of differing units become one write each. Unallocated extents start and end on unit boundaries
      // (or at the disk's end), so whole units are written: no partial-unit copy-on-write is needed.
      let run: number | undefined;
      for (let at = 0; at <= extent.length; at += unit) {
        const end = Math.min(at + unit, extent.length);
        const differs = at < extent.length && !sameBytes(before, after, at, end);
        if (differs && run === undefined) run = at;
        if (!differs && run !== undefined) {
          await overlay.write(start + run, before.subarray(run, at));
          run = undefined;
        }
      }
    }
    options.progress?.((chunk + chunkLength) / size);
  }
  await overlay.flush();
}

/**
 * Rewrites the overlay's header to name `backing` (or no backing file). The in-memory backing device of `overlay`
 * is not swapped: close the image afterwards. Throws before writing anything when the new header cannot fit.
 */
export async function setBacking(overlay: Qcow2Image, backing: NewBacking): Promise<void> {
  const file = backing.file ? backing.file : undefined;
  checkBackingFits(overlay, backing); // throws (too long a name for one cluster...) while the image is untouched
  const engine = await overlay.writer();
  await engine.exclusive(async () => {
    await engine.begin();
    applyBacking(overlay.header, file, backing);
    await engine.writeHeader();
    await engine.flush();
  });
}

/** The checks setBacking makes, for callers that want to fail before a safe-mode copy. */
export function checkBackingFits(overlay: Qcow2Image, backing: NewBacking): void {
  const trial = structuredClone(overlay.header);
  applyBacking(trial, backing.file ? backing.file : undefined, backing);
  encodeHeader(trial);
}

function applyBacking(header: Qcow2Image['header'], file: string | undefined, backing: NewBacking): void {
  if (file !== undefined && file.includes('\0')) throw new FormatError('', 'a backing file name cannot contain NUL bytes', { field: 'backing_file' });
  header.backingFile = file;
  header.backingFormat = file !== undefined ? backing.format : undefined;
  setBackingValidator(header, file !== undefined ? backing.validator : undefined);
}

/**
 * `qcow86 boot --resume NAME` / `--save-on-exit NAME`: the session steps around a boot script (src/v86/session.ts
 * does the work). Kept out of boot.ts so the command only calls three hooks.
 *
 * --resume is checked before the machine starts (a missing or damaged session fails with nothing changed), and
 * applied once v86 is up: the disk goes back to the session's instant, discarding later disk changes.
 */
import { nodeCodecs } from '../io/node.js';
import type { BlockDevice } from '../qcow2/device.js';
import { Qcow2Image } from '../qcow2/image.js';
import type { Machine } from '../v86/machine.js';
import { SessionError, loadSession, resumeSession, saveSession, trackGuestClock, v86StateMemoryBytes, type LoadedSession } from '../v86/session.js';

export interface BootSessionOptions {
  resume?: string | undefined;
  saveOnExit?: string | undefined;
}

export interface BootSession {
  /** Guest RAM of the session being resumed: v86 restores a state only into a machine of that size. */
  memoryBytes: number | undefined;
  /** Right after bootMachine: restores the session (the console then shows only what the guest prints next). */
  started(machine: Machine): Promise<void>;
  /** After the script's last step: saves the running guest. */
  finished(machine: Machine): Promise<void>;
}

const mib = (bytes: number): string => `${(bytes / 1048576).toFixed(1)} MiB`;

export async function prepareBootSession(options: BootSessionOptions, device: BlockDevice, overlay: string | undefined): Promise<BootSession> {
  const codecs = nodeCodecs();
  const wanted = options.resume ?? options.saveOnExit;
  let image: Qcow2Image | undefined;
  if (wanted !== undefined) {
    if (!(device instanceof Qcow2Image)) throw new SessionError(device.name, wanted, 'needs a qcow2 overlay');
    if (overlay === undefined && options.resume !== undefined) throw new SessionError(device.name, wanted, 'cannot be resumed without --overlay FILE (the file holding it)');
    if (overlay === undefined) console.error('qcow86 boot: note: --save-on-exit without --overlay saves into a throw-away overlay in memory');
    image = device;
  }
  let loaded: LoadedSession | undefined;
  if (image && options.resume !== undefined) loaded = await loadSession(image, options.resume, codecs);

  return {
    memoryBytes: loaded ? v86StateMemoryBytes(loaded.state) : undefined,
    async started(machine) {
      trackGuestClock(machine);
      if (!image || !loaded) return;
      const began = Date.now();
      const info = await resumeSession(machine, image, loaded, codecs);
      const newer = image.snapshots.filter((s) => s.dateSec > info.date.getTime() / 1000).map((s) => s.name);
      console.error(`qcow86 boot: resumed session '${info.name}' of ${info.date.toISOString()} in ${((Date.now() - began) / 1000).toFixed(1)} s (disk changes made after it were discarded${newer.length ? `; newer sessions kept: ${newer.join(', ')}` : ''})`);
    },
    async finished(machine) {
      if (!image || options.saveOnExit === undefined) return;
      const result = await saveSession(machine, image, options.saveOnExit, codecs, { replace: true });
      console.error(`\nqcow86 boot: saved session '${result.name}': VM state ${mib(result.rawBytes)} raw, ${mib(result.vmStateSize)} stored (${result.format}), guest paused ${(result.pausedMs / 1000).toFixed(1)} s`);
    },
  };
}

/**
 * Sessions on the disk Worker's side: the page takes v86's state (the emulator runs outside this Worker) and
 * hands it here to be stored in the overlay, or asks for a session's state back after the disk has been reverted
 * to it. The VM-state format is src/v86/session.ts's, so a session saved in the tab resumes with
 * `qcow86 boot --resume` and the other way round.
 *
 * No Worker globals here: the functions take the open device, so Node tests run the same code.
 */
import type { BlockDevice } from '../qcow2/device.js';
import { Qcow2Image } from '../qcow2/image.js';
import { SessionError, listSessions, loadSession, revertToSession, storeSession, deleteSession, type MachineRecord } from '../v86/session.js';
import type { SessionSummary } from './protocol.js';

function qcow2(device: BlockDevice): Qcow2Image {
  if (!(device instanceof Qcow2Image)) throw new SessionError(device.name, '', 'cannot be kept: the disk is not a qcow2 overlay');
  return device;
}

function summary(s: { id: string; name: string; date: Date; vmStateSize: number; guestClockNsec: number }): SessionSummary {
  return { id: s.id, name: s.name, date: s.date.getTime(), vmStateSize: s.vmStateSize, guestClockNsec: s.guestClockNsec };
}

/** The overlay's sessions, oldest first (an empty list for a device that cannot hold any). */
export function sessionsOf(device: BlockDevice): SessionSummary[] {
  return device instanceof Qcow2Image ? listSessions(device).map(summary) : [];
}

/**
 * Stores `state` (v86's save_state() of a stopped machine whose disk writes have all reached `device`) and the
 * machine record (disk bus, virtio device state) as session `name`, replacing one of that name when `replace` (the old one is deleted only once the new one is
 * written).
 */
export async function saveSessionState(device: BlockDevice, name: string, state: ArrayBuffer, options: { clockNsec: number; replace: boolean; machine?: MachineRecord | undefined }): Promise<SessionSummary & { rawBytes: number }> {
  const image = qcow2(device);
  await image.flush();
  const stored = await storeSession(image, name, new Uint8Array(state), image.codecs, { replace: options.replace, clockNsec: options.clockNsec, ...(options.machine ? { machine: options.machine } : {}) });
  return { ...summary(stored), rawBytes: stored.rawBytes };
}

/**
 * Reverts the disk to session `id` and returns v86's state to restore. The VM state is read and checked first:
 * a damaged session fails with the disk untouched.
 */
export async function resumeSessionState(device: BlockDevice, id: string): Promise<{ session: SessionSummary; state: ArrayBuffer; machine: MachineRecord }> {
  const image = qcow2(device);
  const loaded = await loadSession(image, id, image.codecs);
  await image.flush();
  const info = await revertToSession(image, loaded);
  return { session: summary(info), state: loaded.state, machine: loaded.machine };
}

export async function deleteSessionById(device: BlockDevice, id: string): Promise<void> {
  await deleteSession(qcow2(device), id);
}

/**
 * The page's side of encrypted disks: asking for the passphrase when the disk Worker says a disk (or a picked
 * overlay file) is encrypted, again when the one given was wrong. The passphrase is handed to the one request
 * that needs it and kept nowhere.
 */
import { DiskProblem } from './remote-disk.js';
import { askPassphrase } from './status-view.js';

/** True for the Worker's "this disk is encrypted" answers: missing or wrong passphrase. */
export function needsPassphrase(error: unknown): error is DiskProblem {
  return error instanceof DiskProblem && (error.kind === 'passphrase-needed' || error.kind === 'wrong-passphrase');
}

/**
 * Runs `attempt` (an open, or staging a file), asking for the passphrase while `what` turns out to be encrypted and
 * the one given does not open it. Undefined when the person gives up.
 */
export async function withPassphrase<T>(what: string, attempt: (passphrase: string | undefined) => Promise<T>): Promise<T | undefined> {
  let passphrase: string | undefined;
  for (;;) {
    try {
      return await attempt(passphrase);
    } catch (error) {
      if (!needsPassphrase(error)) throw error;
      const body =
        error.kind === 'wrong-passphrase'
          ? "Wrong passphrase: it opens none of the disk's key slots. Try again."
          : `${what} is encrypted: enter its passphrase to open it. The passphrase is not stored anywhere.`;
      passphrase = await askPassphrase('This disk is encrypted', body, { submit: 'Open' });
      if (passphrase === undefined) return undefined;
    }
  }
}

/**
 * The Web Locks the tab's disk Workers use to agree across tabs (same origin) on who does what with a stored
 * overlay. A lock is released when its holder releases it or its Worker ends (a closed or crashed tab), so no
 * lock outlives the tab that took it.
 */

/** Held by the one tab that writes the overlay `name`. */
export function writerLock(name: string): string {
  return `qcow86-disk:${name}`;
}

/** Held by the read-only tab that reads the copy `file` (while held, nobody deletes it). */
export function copyLock(file: string): string {
  return `qcow86-copy:${file}`;
}

/** Takes the Web Lock `name` if nobody holds it; the returned function releases it. */
export function tryLock(name: string): Promise<(() => void) | undefined> {
  return new Promise((resolve, reject) => {
    navigator.locks
      .request(name, { ifAvailable: true }, (lock) => {
        if (!lock) {
          resolve(undefined);
          return undefined;
        }
        return new Promise<void>((release) => resolve(release));
      })
      .catch(reject);
  });
}

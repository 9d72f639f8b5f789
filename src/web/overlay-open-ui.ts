/**
 * Open overlay on the page (file picker or drop). The disk Worker checks the file and opens it read-write in a
 * staging file while the guest runs on (overlay-import.ts); only a file that opened is offered, and the stored
 * disk is replaced only once the user says so, with the machine stopped. Until then, and whenever a step fails,
 * the current disk stays as it is and the machine keeps running.
 */
import type { RemoteDisk } from './remote-disk.js';
import type { SessionUi } from './session-ui.js';
import type { ClusterMap, StagedImport } from './protocol.js';
import { ask, clearProblem, showEncryption } from './status-view.js';
import { withPassphrase } from './passphrase-ui.js';
import { formatBytes } from './format.js';

export interface OpenHooks {
  /** Stops the machine, runs `change`, then restarts it on the new disk ('disk-changed') or lets it go on ('resume'). */
  withMachineStopped(label: string, change: () => Promise<'disk-changed' | 'resume'>): Promise<void>;
  /** Downloads the current disk (offered before it is replaced). */
  download(): Promise<void>;
  /** Bytes of the stored overlay, when known. */
  overlaySize(): number | undefined;
  showMap(map: ClusterMap): void;
}

export class OverlayOpener {
  /** Set while a file is being opened (checked, confirmed, swapped in): another file meanwhile is ignored. */
  private opening = false;

  constructor(
    private readonly disk: RemoteDisk,
    private readonly sessions: SessionUi,
    private readonly hooks: OpenHooks,
  ) {}

  async open(file: File): Promise<void> {
    if (this.opening) return;
    this.opening = true;
    try {
      let staged: StagedImport | undefined;
      try {
        // An encrypted overlay file opens with its passphrase, asked here (again when wrong).
        staged = await withPassphrase(file.name, (passphrase) => this.disk.stageImport(file, file.name, passphrase));
      } catch (error) {
        await refuse((error as Error).message);
        return;
      }
      if (!staged) return;
      const encryption = staged.encryption;
      if (!(await this.confirmReplace(file.name, staged))) return;
      let failure: string | undefined;
      await this.hooks.withMachineStopped(`Opening ${file.name}…`, async () => {
        try {
          this.hooks.showMap(await this.disk.commitImport());
          showEncryption(encryption);
        } catch (error) {
          failure = (error as Error).message;
          return 'resume';
        }
        clearProblem('foreign-overlay');
        clearProblem('quota');
        await this.sessions.offerAfterOpen(file.name);
        return 'disk-changed';
      });
      if (failure) await refuse(failure);
    } finally {
      this.opening = false;
      // Whatever stopped the swap (a cancel, a machine that could not stop), the staged file is not left behind.
      await this.disk.discardImport().catch(() => {});
    }
  }

  /** Asks before a file replaces the stored disk; the current disk can be downloaded first. True to go ahead. */
  private async confirmReplace(fileName: string, staged: StagedImport): Promise<boolean> {
    const held = this.sessions.count();
    const size = this.hooks.overlaySize();
    const current = `${size !== undefined ? `${formatBytes(size)} of changes` : 'its changes'}${held ? ` and ${held} saved session${held > 1 ? 's' : ''}` : ''}`;
    const incoming = `${formatBytes(staged.size)}${staged.sessions ? `, ${staged.sessions} saved session${staged.sessions > 1 ? 's' : ''}` : ''}`;
    for (;;) {
      const choice = await ask(
        `Replace this disk with ${fileName}?`,
        `The disk stored in this browser (${current}) is replaced by ${fileName} (${incoming}), and the machine restarts on it. ` +
          'What the machine is doing now is lost, and so is the current disk unless you download it first.',
        [
          { label: 'Cancel', value: 'cancel' },
          { label: 'Download this disk first', value: 'download' },
          { label: 'Replace disk', value: 'replace', kind: 'danger' },
        ],
      );
      if (choice !== 'download') return choice === 'replace';
      await this.hooks.download();
    }
  }
}

function refuse(message: string): Promise<string> {
  return ask('This overlay cannot be used here', message, [{ label: 'OK', value: 'ok', kind: 'primary' }]);
}

/**
 * Sessions in the tab: save the running machine into the overlay, list, resume and delete saved sessions, and
 * offer to resume when the page opens a disk (or an opened overlay file) that holds one.
 *
 * The machine Worker runs v86 and the disk Worker owns the overlay: saving stops the machine, drains the guest's
 * disk requests, takes v86's state and hands it to the Worker, which stores it as an internal snapshot in
 * src/v86/session.ts's format (so `qcow86 boot --resume NAME` resumes it, and the other way round). Resuming
 * reverts the disk in the Worker first and restores the state into the stopped machine only once that worked.
 */
import type { RemoteDisk } from './remote-disk.js';
import type { ClusterMap, SessionSummary } from './protocol.js';
import { ask, setPhase } from './status-view.js';
import { formatBytes } from './format.js';
import { v86StateMemoryBytes, type MachineRecord } from '../v86/session.js';
import type { MachineState } from './machine-protocol.js';
import type { DiskBus } from '../v86/disk-bus.js';

/**
 * Address parameter naming a session to offer at load: the page reloads itself with it to build a machine of the
 * session's memory size (restoreLater). A link may carry it too, so it reverts the disk only after the user
 * confirms in the page, or when this tab's own reload carries the confirmation given before it (CONFIRMED_KEY).
 */
const RESUME_PARAM = 'resume-session';
/** sessionStorage key: the session id the user confirmed in this tab just before the page reloaded itself. */
const CONFIRMED_KEY = 'qcow86-confirmed-resume';

/** What the session actions need from the emulator (v86's own method names; in-page or in a Worker). */
export interface SessionMachine {
  /** Stops the CPU; resolves once every guest write acknowledged so far has reached the disk Worker. */
  stop(): Promise<void>;
  run(): Promise<void>;
  save_state(): Promise<MachineState>;
  /** Whether the guest was running before a save (a powered-off machine stays off). */
  isRunning(): boolean;
  /** Guest RAM of the running machine. */
  memoryBytes: number;
  /** The bus its disk is on. */
  diskBus: DiskBus;
}

export interface SessionHooks {
  /** Stops the machine, runs `change`, then starts it again: from the pending state when there is one. */
  withMachineStopped(label: string, change: () => Promise<void>): Promise<void>;
  /** The disk was reverted: the map shows the session's disk. */
  showMap(map: ClusterMap): void;
  /** The machine continues from `session` (the page says so instead of showing boot phases). */
  resumed(session: SessionSummary): void;
  /** Loads `url` in this tab (the page's own reload: the disk is saved). */
  navigate(url: URL): void;
}

interface Resumed {
  session: SessionSummary;
  state: ArrayBuffer;
  machine: MachineRecord;
  map: ClusterMap;
}

const machineState = (resumed: Resumed): MachineState => ({ v86: resumed.state, machine: resumed.machine });

const byId = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

export function describeSession(s: SessionSummary): string {
  return `'${s.name}' of ${new Date(s.date).toLocaleString()}`;
}

export class SessionUi {
  private machine: SessionMachine | undefined;
  private sessions: SessionSummary[] = [];
  private pending: MachineState | undefined;
  /** Guest run time recorded with a save: where the running session started from, and since when. */
  private clock = { baseNsec: 0, sinceMs: performance.now() };
  private busy = false;
  private writable = false;

  constructor(
    private readonly disk: RemoteDisk,
    private readonly hooks: SessionHooks,
  ) {
    byId<HTMLFormElement>('session-form').addEventListener('submit', (event) => {
      event.preventDefault();
      void this.guard(() => this.save(byId<HTMLInputElement>('session-name').value.trim()));
    });
    this.update();
  }

  /** The machine exists (its clock starts now unless it was resumed); `writable` is false for a read-only tab. */
  attach(machine: SessionMachine, writable: boolean): void {
    this.machine = machine;
    this.writable = writable;
    this.update();
  }

  /** The machine booted afresh (restart, reset): its guest clock starts again. */
  rebooted(): void {
    this.clock = { baseNsec: 0, sinceMs: performance.now() };
  }

  /** The state to restore instead of booting, once: set by a resume while the machine is stopped. */
  takePendingState(): MachineState | undefined {
    const state = this.pending;
    this.pending = undefined;
    return state;
  }

  /**
   * Before the machine exists: when the stored overlay holds sessions, asks whether to resume the newest (or the
   * one the address names). On yes the disk is already reverted and the state to start from is returned.
   */
  async offerOnLoad(): Promise<MachineState | undefined> {
    await this.refresh();
    const requested = this.takeRequested();
    const offered = requested?.session ?? this.newest();
    if (!offered) return undefined;
    if (!requested?.confirmed && !(await this.askOnLoad(offered, requested !== undefined))) return undefined;
    try {
      const resumed = await this.revert(offered);
      // Said once the machine runs (afterRestart): the page's start-up phases would overwrite it before.
      this.resumedAfterRestart = resumed.session;
      return machineState(resumed);
    } catch (error) {
      await ask('The session cannot be resumed', `${(error as Error).message}. The disk was not changed; the machine starts normally.`, [{ label: 'OK', value: 'ok', kind: 'primary' }]);
      return undefined;
    }
  }

  /** Whether to resume `offered` at load; `named`: the page's address asked for it. */
  private async askOnLoad(offered: SessionSummary, named: boolean): Promise<boolean> {
    const intro = named
      ? `The address of this page asks to resume the saved session ${describeSession(offered)}.`
      : `This disk holds a saved session ${describeSession(offered)}.`;
    const choice = await ask(
      named ? `Resume session '${offered.name}'?` : 'Resume your saved session?',
      `${intro} Resuming continues the machine exactly where it was. ` +
        'The disk goes back to that moment too: disk changes made after the session was saved are discarded. ' +
        'Or start the machine normally on the disk as it is now (the session stays saved).',
      [
        { label: 'Start normally', value: 'boot' },
        { label: `Resume '${offered.name}'`, value: 'resume', kind: 'primary' },
      ],
    );
    return choice === 'resume';
  }

  /**
   * The session the address names (the parameter is removed from the address), and whether this tab's user
   * confirmed resuming it just before the page reloaded itself. A confirmation is used once.
   */
  private takeRequested(): { session: SessionSummary; confirmed: boolean } | undefined {
    const url = new URL(location.href);
    const id = url.searchParams.get(RESUME_PARAM);
    let confirmedId: string | null = null;
    try {
      confirmedId = sessionStorage.getItem(CONFIRMED_KEY);
      sessionStorage.removeItem(CONFIRMED_KEY);
    } catch {
      // No sessionStorage (blocked): every request is asked about.
    }
    if (id === null) return undefined;
    url.searchParams.delete(RESUME_PARAM);
    history.replaceState(null, '', url);
    const session = this.sessions.find((s) => s.id === id);
    return session ? { session, confirmed: confirmedId === id } : undefined;
  }

  /**
   * Inside the page's "machine stopped" step after an overlay file was opened: offers to resume its newest
   * session; on yes the disk is reverted and the machine starts from the session instead of booting.
   */
  async offerAfterOpen(fileName: string): Promise<void> {
    await this.refresh();
    const newest = this.newest();
    if (!newest) return;
    const choice = await ask(
      `Resume the session saved in ${fileName}?`,
      `${fileName} holds a saved session ${describeSession(newest)}${this.sessions.length > 1 ? ` (and ${this.sessions.length - 1} older)` : ''}. ` +
        'Resuming continues that machine where it was, with its disk as of that moment (disk changes saved in the file after the session are discarded). ' +
        'Or boot the machine on the disk as the file has it.',
      [
        { label: 'Boot normally', value: 'boot' },
        { label: `Resume '${newest.name}'`, value: 'resume', kind: 'primary' },
      ],
    );
    if (choice !== 'resume') return;
    this.restoreLater(newest, machineState(await this.revert(newest)));
  }

  /**
   * Keeps `state` for the restart, or, when it was saved from a machine of another memory size (v86 restores
   * only into the same size: a 128 MiB CLI session in this 64 MiB tab) or with its disk on the other bus,
   * reloads the page to build a machine like it, which resumes the session as it starts (the disk is already
   * reverted; reverting again is a no-op).
   */
  private restoreLater(session: SessionSummary, state: MachineState): void {
    const memory = v86StateMemoryBytes(state.v86);
    const otherMemory = memory !== undefined && this.machine !== undefined && memory !== this.machine.memoryBytes;
    const otherBus = this.machine !== undefined && state.machine.diskBus !== this.machine.diskBus;
    if (otherMemory || otherBus) {
      const url = new URL(location.href);
      url.searchParams.set(RESUME_PARAM, session.id);
      // The user confirmed this resume here: the reloaded page goes ahead without asking again.
      try {
        sessionStorage.setItem(CONFIRMED_KEY, session.id);
      } catch {
        // Blocked storage: the reloaded page asks once more.
      }
      this.hooks.navigate(url);
      return;
    }
    this.pending = state;
    this.resumedAfterRestart = session;
  }

  /** Called by the page once the machine runs: after it started, and again after withMachineStopped. */
  afterRestart(): void {
    const session = this.resumedAfterRestart;
    this.resumedAfterRestart = undefined;
    if (session) this.hooks.resumed(session);
    else this.rebooted();
    // The disk may have been replaced (reset, another overlay opened): its sessions are listed afresh.
    void this.refresh().catch(() => {});
  }

  private resumedAfterRestart: SessionSummary | undefined;

  /** How many sessions the open disk holds. */
  count(): number {
    return this.sessions.length;
  }

  async refresh(): Promise<void> {
    this.sessions = await this.disk.call<SessionSummary[]>({ op: 'sessions' });
    this.render();
  }

  private newest(): SessionSummary | undefined {
    return this.sessions.reduce<SessionSummary | undefined>((best, s) => (!best || s.date >= best.date ? s : best), undefined);
  }

  private status(text: string): void {
    byId('session-status').textContent = text;
  }

  private async revert(session: SessionSummary): Promise<Resumed> {
    setPhase(`Resuming session '${session.name}'…`);
    const resumed = await this.disk.call<Resumed>({ op: 'resume-session', id: session.id });
    this.status(`Resumed session ${describeSession(resumed.session)}; the disk is as it was then.`);
    this.hooks.showMap(resumed.map);
    this.clock = { baseNsec: resumed.session.guestClockNsec, sinceMs: performance.now() };
    return resumed;
  }

  async save(name: string): Promise<void> {
    const machine = this.machine;
    if (!machine) return;
    if (!name) name = this.nextName();
    if (this.sessions.some((s) => s.name === name)) {
      const choice = await ask(
        `Replace session '${name}'?`,
        `A session named '${name}' is already saved. Saving replaces it with the machine as it is now (the old one is deleted only once the new one is completely written).`,
        [
          { label: 'Cancel', value: 'cancel' },
          { label: 'Replace', value: 'replace', kind: 'danger' },
        ],
      );
      if (choice !== 'replace') return;
    }
    const wasRunning = machine.isRunning();
    const clockNsec = this.clock.baseNsec + Math.round((performance.now() - this.clock.sinceMs) * 1e6);
    const began = performance.now();
    setPhase(`Saving session '${name}'…`);
    await machine.stop();
    let saved: SessionSummary & { rawBytes: number };
    try {
      const { v86, machine: record } = await machine.save_state();
      // The machine stays stopped until the snapshot exists: its disk requests reach the disk Worker over
      // another channel than this one, so nothing would order them after the save.
      saved = await this.disk.call({ op: 'save-session', name, state: v86, machine: record, clockNsec, replace: true }, [v86]);
    } finally {
      if (wasRunning) await machine.run();
    }
    const pausedMs = performance.now() - began;
    const seconds = (pausedMs / 1000).toFixed(1);
    const message = `Session '${saved.name}' saved: ${formatBytes(saved.vmStateSize)} in the overlay (machine state ${formatBytes(saved.rawBytes)} before compression); machine paused ${seconds} s.`;
    this.status(message);
    setPhase(`Session '${saved.name}' saved`, wasRunning ? 'ready' : 'off');
    byId<HTMLInputElement>('session-name').value = '';
    await this.refresh();
  }

  async resume(session: SessionSummary): Promise<void> {
    const newer = this.sessions.filter((s) => s.date > session.date).map((s) => `'${s.name}'`);
    const choice = await ask(
      `Resume session '${session.name}'?`,
      `The machine continues from ${describeSession(session)}. The disk goes back to that moment: every disk change made since then is discarded` +
        (newer.length ? ` (the newer session${newer.length > 1 ? 's' : ''} ${newer.join(', ')} stay${newer.length > 1 ? '' : 's'} saved and can still be resumed).` : '.') +
        ' What the machine is doing now is lost unless you save it as a session first.',
      [
        { label: 'Cancel', value: 'cancel' },
        { label: `Resume '${session.name}'`, value: 'resume', kind: 'primary' },
      ],
    );
    if (choice !== 'resume') return;
    const machine = this.machine!;
    const wasRunning = machine.isRunning();
    await machine.stop();
    let resumed: Resumed;
    try {
      resumed = await this.revert(session);
    } catch (error) {
      // A damaged session fails before the disk changes: the machine simply goes on.
      if (wasRunning) await machine.run();
      throw error;
    }
    await this.hooks.withMachineStopped(`Resuming session '${session.name}'…`, async () => this.restoreLater(session, machineState(resumed)));
  }

  async remove(session: SessionSummary): Promise<void> {
    const choice = await ask(`Delete session '${session.name}'?`, `The saved machine state ${describeSession(session)} is removed from the overlay. The disk as it is now is not changed.`, [
      { label: 'Cancel', value: 'cancel' },
      { label: 'Delete', value: 'delete', kind: 'danger' },
    ]);
    if (choice !== 'delete') return;
    this.sessions = await this.disk.call<SessionSummary[]>({ op: 'delete-session', id: session.id });
    this.render();
  }

  private nextName(): string {
    for (let n = this.sessions.length + 1; ; n++) if (!this.sessions.some((s) => s.name === `session ${n}`)) return `session ${n}`;
  }

  private update(): void {
    const enabled = this.machine !== undefined && this.writable && !this.busy;
    for (const element of byId('sessions').querySelectorAll<HTMLButtonElement | HTMLInputElement>('button, input')) element.disabled = !enabled;
  }

  private async guard(action: () => Promise<void>): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    this.update();
    try {
      await action();
    } catch (error) {
      await ask('The session action failed', (error as Error).message, [{ label: 'OK', value: 'ok', kind: 'primary' }]);
    } finally {
      this.busy = false;
      this.update();
    }
  }

  private render(): void {
    const list = byId('session-list');
    list.replaceChildren(
      ...this.sessions.map((s) => {
        const item = document.createElement('li');
        item.dataset.session = s.name;
        const label = document.createElement('span');
        label.className = 'label';
        const name = document.createElement('strong');
        name.textContent = s.name;
        const detail = document.createElement('small');
        detail.textContent = `${new Date(s.date).toLocaleString()} · ${formatBytes(s.vmStateSize)}`;
        label.append(name, detail);
        const resume = document.createElement('button');
        resume.type = 'button';
        resume.textContent = 'Resume';
        resume.addEventListener('click', () => void this.guard(() => this.resume(s)));
        const remove = document.createElement('button');
        remove.type = 'button';
        remove.className = 'danger';
        remove.textContent = 'Delete';
        remove.addEventListener('click', () => void this.guard(() => this.remove(s)));
        item.append(label, resume, remove);
        return item;
      }),
    );
    byId('session-empty').hidden = this.sessions.length > 0;
    this.update();
  }
}

/**
 * The qcow86 page: opens the disk in its Worker, boots v86 on it, and wires the console, screen, status, cluster
 * map and actions together.
 */
import './style.css';
import wasmUrl from 'v86/build/v86.wasm?url';
import { RemoteDisk, DiskProblem } from './remote-disk.js';
import { MachineClient } from './machine-client.js';
import { createScreen } from './screen-view.js';
import { createConsole } from './console-view.js';
import { MapView } from './map-view.js';
import { ask, askPassphrase, clearProblem, setPhase, showDisk, showEncryption, showPersistence, showProblem, showStats, type PhaseState } from './status-view.js';
import { withPassphrase } from './passphrase-ui.js';
import { BootPhases } from './boot-phase.js';
import type { OpenMode, OpenResult, Stats } from './protocol.js';
import { OverlayOpener } from './overlay-open-ui.js';
import { SessionUi } from './session-ui.js';
import { v86StateMemoryBytes } from '../v86/session.js';
import { guestAt, loadGuests, showGuestList } from './guest-list.js';
import { chooseDiskBus, keepDiskBus, showDiskBus } from './disk-bus-setting.js';

const byId = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

const params = new URLSearchParams(location.search);
const baseUrl = new URL(params.get('base') ?? '/images/base.qcow2', location.href).href;
const imagesUrl = new URL('/images/', location.href).href;
let overlayName = params.get('disk') ?? overlayNameFor(baseUrl);
/**
 * `?encrypt=1`: the disk this visit creates (the first visit's) is encrypted from the start, its passphrase asked
 * before it is made; a disk that exists already opens as it is (a plain one is offered Encrypt disk). Used once:
 * the page takes it out of its address when the disk is open.
 */
const encryptRequested = params.has('encrypt') && !['0', 'false', 'no'].includes(params.get('encrypt')!.toLowerCase());

/** One stored overlay per base URL; the name says which base it belongs to. */
function overlayNameFor(url: string): string {
  let hash = 0x811c9dc5;
  for (const char of url) hash = Math.imul(hash ^ char.charCodeAt(0), 0x01000193) >>> 0;
  const stem = (new URL(url).pathname.split('/').pop() || 'disk').replace(/\.qcow2$/, '').replace(/[^\w.-]/g, '_').slice(0, 100);
  return `${stem}-${hash.toString(16).padStart(8, '0')}.qcow2`;
}

const terminal = createConsole(byId('terminal'));
const mapView = new MapView(byId<HTMLCanvasElement>('map'), byId('map-legend'), byId('map-hover'), byId('map-scale'));
const disk = new RemoteDisk();
const phases = new BootPhases(terminal);
/** v86 runs in its own Worker; the page draws what it reports (see machine-worker.ts). */
const machine = new MachineClient();
const screenView = createScreen(byId('screen'), machine);
let started = false;
let mode: OpenMode = 'write';
let poweredOff = false;
/** The default guest needs no more; listed guests say what they need (guests.json). */
const DEFAULT_MEMORY_BYTES = 64 * 1024 * 1024;
let guestMemoryBytes = DEFAULT_MEMORY_BYTES;
const sessions = new SessionUi(disk, {
  withMachineStopped: (label, change) =>
    withMachineStopped(label, async () => {
      await change();
      return 'disk-changed';
    }),
  showMap: (map) => mapView.show(map),
  resumed: (session) => phases.resumed(session.name),
  navigate: (url) => {
    // The page reloads itself on purpose (the disk is saved): no 'leave this page?' question.
    leaving = true;
    location.replace(url);
  },
});

const opener = new OverlayOpener(disk, sessions, {
  withMachineStopped: (label, change) => withMachineStopped(label, change),
  download: () => download(),
  overlaySize: () => lastStats?.overlaySize,
  showMap: (map) => mapView.show(map),
});

/** The disk Worker's last report, drawn with the machine's unsaved bytes whenever either changes. */
let lastStats: Stats | undefined;
function drawStats(): void {
  if (lastStats) showStats({ ...lastStats, unsaved: unsavedBytes() }, writesFailed);
}

/** Set once a guest write failed (the machine's disk adapter stops there): unsaved bytes stay unsaved. */
let writesFailed = false;

/** Guest bytes not yet saved in this browser: in the disk Worker, and still held by the machine's disk adapter. */
function unsavedBytes(): number {
  return (lastStats?.unsaved ?? 0) + machine.dirtyBytes;
}

/** Set when the page navigates on purpose (it saved first), so that it does not ask the user to confirm. */
let leaving = false;

disk.on((event) => {
  switch (event.event) {
    case 'stats':
      lastStats = event.stats;
      drawStats();
      phases.noteDiskReads(event.stats.guestReads);
      return;
    case 'map':
      mapView.apply(event.changes);
      return;
    case 'problem':
      showProblem(event.kind, event.message, event.retryAt);
      if (event.kind === 'base-changed') setPhase('Stopped: the base image changed', 'error');
      return;
    case 'problem-cleared':
      clearProblem(event.kind);
      return;
  }
});

const ENCRYPT_EXPLANATION =
  'Your changes will be kept encrypted in this browser (LUKS, as QEMU makes it: AES-256-XTS). The passphrase is asked every time the disk is opened and is not stored anywhere: without it the disk cannot be opened.';
const NEW_DISK_ENCRYPTION = ENCRYPT_EXPLANATION.replace('Your changes', 'The new disk');

/**
 * Opens the disk in `wanted` mode. An encrypted disk asks for its passphrase on every open (passphrase-ui.ts).
 * `encryptNew`: a disk this open creates is encrypted, with the passphrase given, or else one asked for here once
 * the Worker says a disk is really to be created (the first visit with ?encrypt=1).
 */
async function openAs(wanted: OpenMode, encryptNew?: { passphrase?: string }): Promise<OpenResult | undefined> {
  let newPassphrase = encryptNew?.passphrase;
  let noNewPassphrase = false;
  const opened = await withPassphrase('This disk', async (passphrase) => {
    for (;;) {
      try {
        return await disk.open({ base: baseUrl, overlay: overlayName, mode: wanted, passphrase, encryptNew: encryptNew && { passphrase: newPassphrase } });
      } catch (error) {
        if (!(error instanceof DiskProblem) || error.kind !== 'new-passphrase-needed') throw error;
        newPassphrase = await askPassphrase('Encrypt the new disk', `This address asks for an encrypted disk (?encrypt=1). ${NEW_DISK_ENCRYPTION}`, { confirm: true, submit: 'Create encrypted disk' });
        if (newPassphrase === undefined) {
          noNewPassphrase = true;
          return undefined;
        }
      }
    }
  });
  if (!opened) {
    setPhase(
      noNewPassphrase ? 'Not started: no passphrase was chosen for the new encrypted disk (reload to choose one, or leave ?encrypt=1 out of the address for a plain disk)' : 'Not started: the disk is encrypted and stays locked',
      'off',
    );
  }
  return opened;
}

async function openDisk(): Promise<OpenResult | undefined> {
  setPhase('Opening the disk…');
  let result: OpenResult | undefined;
  try {
    result = await openAs(mode, encryptRequested ? {} : undefined);
  } catch (error) {
    if (!(error instanceof DiskProblem) || error.kind !== 'locked') throw error;
    result = await openBesideOtherTab();
  }
  if (result && encryptRequested) {
    // ?encrypt=1 is for the disk being made now: a reload must not ask again.
    const url = new URL(location.href);
    url.searchParams.delete('encrypt');
    history.replaceState(null, '', url);
  }
  return result;
}

/** Another tab writes the disk: this one may read it, or make a fresh disk of its own, plain or encrypted. */
async function openBesideOtherTab(): Promise<OpenResult | undefined> {
  let encryptNew: { passphrase: string } | undefined;
  for (;;) {
    const choice = await ask(
      'This disk is open in another tab',
      'Only one tab at a time may write to a disk, so your changes cannot be saved here while the other tab runs it. ' +
        'You can look at the disk read-only (changes made here are thrown away when you close the tab), or start a fresh, separate disk, encrypted in this browser if you like.',
      [
        { label: 'Open read-only', value: 'readonly' },
        { label: 'Use a fresh encrypted disk…', value: 'fresh-encrypted' },
        { label: 'Use a fresh disk', value: 'fresh', kind: 'primary' },
      ],
    );
    if (choice === 'fresh-encrypted') {
      const passphrase = await askPassphrase('Encrypt the fresh disk', NEW_DISK_ENCRYPTION, { confirm: true, submit: 'Create encrypted disk' });
      // Cancelled: back to the question.
      if (passphrase === undefined) continue;
      encryptNew = { passphrase };
      mode = 'fresh';
      break;
    }
    if (choice !== 'readonly' && choice !== 'fresh') {
      setPhase('Not started: the disk is open in another tab', 'off');
      return undefined;
    }
    mode = choice;
    break;
  }
  const result = await openAs(mode, encryptNew);
  if (!result) return undefined;
  if (mode === 'fresh') {
    // Remember the fresh disk's name in the address, so a reload of this tab finds it again; it keeps the bus.
    keepDiskBus(result.overlay, chooseDiskBus(overlayName, params.get('disk-bus')));
    overlayName = result.overlay;
    mode = 'write';
    const url = new URL(location.href);
    url.searchParams.set('disk', overlayName);
    history.replaceState(null, '', url);
  }
  return result;
}

async function start(): Promise<void> {
  byId('base-url').textContent = baseUrl;
  const guests = await loadGuests(imagesUrl);
  const guest = guestAt(guests, baseUrl, imagesUrl);
  showGuestList(byId<HTMLSelectElement>('guest'), guests, guest, baseUrl, imagesUrl);
  // Without a list (a server that has none), the default guest is still the one the page knows.
  const defaultGuest = guests.length === 0 && baseUrl === new URL('/images/base.qcow2', location.href).href;
  if (!guest && !defaultGuest) phases.unknownGuest();
  guestMemoryBytes = (guest?.memoryMiB ?? DEFAULT_MEMORY_BYTES / 1048576) * 1048576;
  let opened: OpenResult | undefined;
  try {
    opened = await openDisk();
  } catch (error) {
    const problem = error instanceof DiskProblem ? error : new DiskProblem('other', (error as Error).message);
    showProblem(problem.kind, problem.message);
    setPhase('Could not open the disk', 'error');
    if (problem.kind === 'base-changed' && mode === 'write') await offerWayOutOfChangedBase();
    return;
  }
  if (!opened) return;
  showDisk({ base: baseUrl, overlay: opened.overlay, mode: opened.mode, copiedAt: opened.copiedAt, encryption: opened.encryption });
  mapView.show(opened.map);
  // Before the machine exists: a resumed session starts from its state instead of booting.
  const initialState = opened.mode === 'readonly' ? undefined : await sessions.offerOnLoad();
  // v86 restores a state only into a machine of the memory size it was saved with, and on the same disk bus.
  const memoryBytes = (initialState && v86StateMemoryBytes(initialState.v86)) ?? guestMemoryBytes;
  const diskBus = initialState?.machine.diskBus ?? chooseDiskBus(opened.overlay, params.get('disk-bus'));
  showDiskBus(byId<HTMLSelectElement>('disk-bus'), diskBus, opened.overlay, async (url) => {
    // The bus is fixed when the machine is built: save everything, then a new page builds it.
    if (started) await machine.stop();
    await disk.flush();
    leaving = true;
    location.replace(url);
  });
  setPhase('Loading the firmware…');
  machine.on((event) => {
    switch (event.event) {
      case 'started':
        phases.started();
        showScreenIfSerialSilent();
        return;
      case 'dirty':
        // The saved indicator counts these bytes too: redraw it now, not at the next disk report.
        drawStats();
        return;
      case 'serial':
        serialSeen = true;
        terminal.write(event.bytes);
        return;
      case 'screen':
      case 'frame':
        screenView.apply(event);
        return;
      case 'disk-error':
        // The machine's disk stops at its first failed write: what it still holds will not be saved.
        writesFailed = true;
        drawStats();
        showProblem(event.kind as DiskProblem['kind'], event.message);
        setPhase('Disk error: the guest is waiting', 'error');
        return;
      case 'error':
        showProblem('other', event.message);
        setPhase('The machine stopped with an error', 'error');
        return;
    }
  });
  terminal.onInput((data) => machine.serial0_send(data));
  await machine.start({
    disk: disk.connect(),
    virtualSize: opened.virtualSize,
    name: opened.overlay,
    // A read-only tab's guest sees a read-only disk on virtio (its root is mounted read-only); on IDE, which
    // cannot say so, its writes are kept in memory and thrown away.
    readOnly: opened.mode === 'readonly',
    diskBus,
    discardGranularity: opened.clusterSize,
    wasm: new URL(wasmUrl, location.href).href,
    bios: `${imagesUrl}bios.bin`,
    vgaBios: `${imagesUrl}vgabios-stdvga.bin`,
    memoryBytes,
    initialState,
  });
  started = true;
  sessions.afterRestart();
  sessions.attach(
    {
      stop: () => machine.stop(),
      run: () => machine.run(),
      save_state: () => machine.save_state(),
      isRunning: () => !poweredOff,
      memoryBytes,
      diskBus,
    },
    opened.mode !== 'readonly',
  );
  terminal.focus();
  for (const button of document.querySelectorAll<HTMLButtonElement>('.actions button')) button.disabled = false;
  readOnlyTab = opened.mode === 'readonly';
  updateActions();
  // ?encrypt=1 on a disk made earlier without encryption: it is offered now (the guest runs on meanwhile).
  if (encryptRequested && opened.mode === 'write' && !opened.created && !opened.encryption) {
    await encryptDisk('This disk was made earlier and is not encrypted, while the address asks for an encrypted disk (?encrypt=1). Encrypt it now?');
  }
}

/**
 * The stored disk was made on another version of the base, so it was not opened (and the page's buttons, which
 * work on an open disk, stay off): the user may still download it, then start over on the new base.
 */
async function offerWayOutOfChangedBase(): Promise<void> {
  for (;;) {
    const choice = await ask(
      'The base image has changed',
      'This disk was made on an earlier version of the base image, so its changes no longer fit and it was not opened. ' +
        'You can download it (qemu-img reads it together with the old base), then reset it to start over on the new base.',
      [
        { label: 'Leave it', value: 'leave' },
        { label: 'Download overlay', value: 'download', kind: 'primary' },
        { label: 'Reset disk', value: 'reset', kind: 'danger' },
      ],
    );
    if (choice === 'download') {
      saveOverlay(await disk.exportStored(overlayName));
      continue;
    }
    if (choice !== 'reset') return;
    await disk.discardStored(overlayName);
    clearProblem('base-changed');
    await start();
    return;
  }
}

/**
 * Stops the guest and runs `change`, whose answer says how to go on: 'reboot' (the disk is the same), 'disk-changed'
 * (the disk was replaced underneath: the machine forgets what it read of the old one, then reboots) or 'resume'
 * (nothing changed: the guest carries on where it stopped).
 */
async function withMachineStopped(label: string, change: () => Promise<'reboot' | 'disk-changed' | 'resume'>): Promise<void> {
  if (!started) return;
  // One change at a time (a session resumed while an overlay is swapped in waits for it).
  const turn = changes.then(async () => {
    changing = true;
    updateActions();
    try {
      await changeStopped(label, change);
    } finally {
      changing = false;
      updateActions();
    }
  });
  changes = turn.catch(() => {});
  return turn;
}

let changes: Promise<void> = Promise.resolve();
/** Set while withMachineStopped runs: the machine and disk actions wait (a Power off then would race the restart). */
let changing = false;
/** A read-only tab's disk cannot be downloaded, replaced or reset (it is another tab's). */
let readOnlyTab = false;

function updateActions(): void {
  const ownDisk = new Set(['download', 'open', 'encrypt', 'rekey', 'decrypt', 'reset']);
  for (const id of ['download', 'open', 'encrypt', 'rekey', 'decrypt', 'reset', 'restart', 'power']) {
    byId<HTMLButtonElement>(id).disabled = !started || changing || (readOnlyTab && ownDisk.has(id));
  }
  // Encrypt, or Change passphrase and Decrypt, after the encryption the status panel shows (every change of the
  // disk sets it before the change ends and this runs).
  const encrypted = byId('overlay-encryption').dataset.encrypted === 'true';
  byId('encrypt').hidden = encrypted;
  byId('rekey').hidden = !encrypted;
  byId('decrypt').hidden = !encrypted;
}

async function changeStopped(label: string, change: () => Promise<'reboot' | 'disk-changed' | 'resume'>): Promise<void> {
  const before = { text: byId('phase').querySelector('.text')!.textContent ?? '', state: byId('phase').dataset.state as PhaseState };
  await machine.stop();
  setPhase(label);
  let next: 'reboot' | 'disk-changed' | 'resume' = 'disk-changed';
  try {
    next = await change();
  } finally {
    if (next === 'resume') {
      setPhase(before.text, before.state);
      if (!poweredOff) await machine.run();
    } else {
      terminal.clear();
      phases.reset();
      poweredOff = false;
      // The guest's silence counts from this start (showScreenIfSerialSilent), not from an earlier one.
      lastStartAt = Date.now();
      byId('power').textContent = 'Power off';
      // A session resumed while stopped starts from its state; otherwise the machine boots again.
      const state = sessions.takePendingState();
      if (state) {
        await machine.restore_state(state);
        await machine.run();
      } else {
        await machine.restart(next === 'disk-changed');
      }
      sessions.afterRestart();
    }
  }
}

async function download(): Promise<void> {
  // A machine whose writes failed (storage full) cannot flush: the download is then the disk as last saved.
  if (started) await machine.flush().catch(() => {});
  const { bytes } = await disk.exportOverlay();
  saveOverlay(bytes);
}

/** Hands overlay bytes to the browser as a download named after the base. */
function saveOverlay(bytes: Uint8Array): void {
  const stem = (new URL(baseUrl).pathname.split('/').pop() || 'disk').replace(/\.qcow2$/, '');
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([bytes as Uint8Array<ArrayBuffer>], { type: 'application/octet-stream' }));
  link.download = `${stem}-overlay.qcow2`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

const WRONG_PASSPHRASE = "Wrong passphrase: it opens none of the disk's key slots. Try again. ";

/**
 * Rewrites the disk's overlay while the machine is stopped (`rewrite` makes the new one and returns its map and
 * encryption); the guest's disk reads the same, so it carries on where it stopped. A passphrase that opens no key
 * slot is the caller's to ask again; any other failure is shown under `failedTitle`.
 */
async function rewriteOverlay(label: string, failedTitle: string, rewrite: () => ReturnType<typeof disk.decrypt>): Promise<'done' | 'wrong-passphrase'> {
  let failure: Error | undefined;
  await withMachineStopped(label, async () => {
    try {
      const result = await rewrite();
      mapView.show(result.map);
      showEncryption(result.encryption);
    } catch (error) {
      failure = error as Error;
    }
    await sessions.refresh();
    return 'resume';
  });
  if (failure instanceof DiskProblem && failure.kind === 'wrong-passphrase') return 'wrong-passphrase';
  if (failure) await ask(failedTitle, failure.message, [{ label: 'OK', value: 'ok', kind: 'primary' }]);
  return 'done';
}

/**
 * "Encrypt this disk": the overlay becomes a LUKS qcow2 (QEMU's defaults) holding the same data; from then on
 * the passphrase is asked on every open and a download is the encrypted file, which qemu-img opens with it.
 * `intro` says why it is asked when the page offers it by itself.
 */
async function encryptDisk(intro?: string): Promise<void> {
  const passphrase = await askPassphrase('Encrypt this disk', `${intro ? `${intro} ` : ''}${ENCRYPT_EXPLANATION} Saved sessions are not carried over.`, { confirm: true, submit: 'Encrypt' });
  if (passphrase === undefined) return;
  await rewriteOverlay('Encrypting the disk…', 'The disk could not be encrypted', () => disk.encrypt(passphrase));
}

/**
 * "Change passphrase" on an encrypted disk: the current passphrase first (a wrong one says so and asks again,
 * keeping the new one), then the new one twice; the overlay is rewritten encrypted under it, with a new key, as
 * Encrypt disk does, so the old passphrase opens neither the disk nor anything written from now on.
 */
async function changePassphrase(): Promise<void> {
  let note = '';
  let next: string | undefined;
  for (;;) {
    const current = await askPassphrase('Change the passphrase', `${note}Enter the disk's current passphrase.`, { submit: 'Next' });
    if (current === undefined) return;
    next ??= await askPassphrase(
      'Change the passphrase',
      'Choose the new passphrase. The disk is rewritten encrypted under it, with a new key: the old passphrase no longer opens it (overlays downloaded before keep theirs). Saved sessions are not carried over.',
      { confirm: true, submit: 'Change passphrase' },
    );
    if (next === undefined) return;
    const chosen = next;
    if ((await rewriteOverlay('Changing the passphrase…', 'The passphrase could not be changed', () => disk.encrypt(chosen, current))) === 'done') return;
    note = WRONG_PASSPHRASE;
  }
}

/**
 * "Decrypt this disk", the way back: the overlay becomes a plain qcow2 holding the same data, opened without a
 * passphrase from then on and downloaded in the clear. The passphrase is asked first (a wrong one says so and
 * asks again): whoever finds the tab unlocked cannot strip the encryption.
 */
async function decryptDisk(): Promise<void> {
  const explanation =
    'The disk will be kept in this browser unencrypted (a plain qcow2 overlay holding the same data): it opens without a passphrase, and Download gives a file anyone can read. Saved sessions are not carried over. Enter the passphrase to confirm.';
  let note = '';
  for (;;) {
    const passphrase = await askPassphrase('Decrypt this disk', `${note}${explanation}`, { submit: 'Decrypt' });
    if (passphrase === undefined) return;
    if ((await rewriteOverlay('Decrypting the disk…', 'The disk could not be decrypted', () => disk.decrypt(passphrase))) === 'done') return;
    note = WRONG_PASSPHRASE;
  }
}

/**
 * "Reset disk": a new, empty disk in place of this one. It may be created encrypted ("Encrypt this disk" when a
 * disk is created); an encrypted disk reset without a new passphrase stays encrypted with the one it was opened with.
 */
async function resetDisk(): Promise<void> {
  const choice = await ask(
    'Reset the disk?',
    'Every change made to this disk is thrown away and the machine restarts from the base image. Download the overlay first if you want to keep it. The new disk can be encrypted in this browser (LUKS, as QEMU makes it) with a passphrase of your choice.',
    [
      { label: 'Cancel', value: 'cancel' },
      { label: 'New encrypted disk…', value: 'encrypted' },
      { label: 'Reset disk', value: 'reset', kind: 'danger' },
    ],
  );
  if (choice !== 'reset' && choice !== 'encrypted') return;
  let passphrase: string | undefined;
  if (choice === 'encrypted') {
    passphrase = await askPassphrase('Encrypt this disk', NEW_DISK_ENCRYPTION, { confirm: true, submit: 'Reset and encrypt' });
    if (passphrase === undefined) return;
  }
  await withMachineStopped('Resetting the disk…', async () => {
    const result = await disk.reset(passphrase);
    mapView.show(result.map);
    showEncryption(result.encryption);
    return 'disk-changed';
  });
}

async function togglePower(): Promise<void> {
  if (!started) return;
  if (!poweredOff) {
    await machine.stop();
    await disk.flush();
    poweredOff = true;
    byId('power').textContent = 'Power on';
    setPhase('Powered off — the disk is saved', 'off');
    return;
  }
  await withMachineStopped('Starting…', async () => 'reboot');
}

function guard(action: () => Promise<void>): () => void {
  return () => {
    action().catch((error: unknown) => showProblem('other', (error as Error).message));
  };
}

for (const button of document.querySelectorAll<HTMLButtonElement>('.actions button')) button.disabled = true;
byId('download').addEventListener('click', guard(download));
byId('open').addEventListener('click', () => byId<HTMLInputElement>('open-file').click());
byId<HTMLInputElement>('open-file').addEventListener('change', (event) => {
  const input = event.target as HTMLInputElement;
  const file = input.files?.[0];
  input.value = '';
  if (file) guard(() => opener.open(file))();
});
byId('reset').addEventListener('click', guard(resetDisk));
byId('encrypt').addEventListener('click', guard(() => encryptDisk()));
byId('rekey').addEventListener('click', guard(changePassphrase));
byId('decrypt').addEventListener('click', guard(decryptDisk));
byId('restart').addEventListener('click', guard(() => withMachineStopped('Restarting…', async () => {
  await disk.flush();
  return 'reboot';
})));
byId('power').addEventListener('click', guard(togglePower));

function showView(view: string): void {
  document.querySelector<HTMLElement>('section.displays')!.dataset.view = view;
  for (const other of document.querySelectorAll<HTMLButtonElement>('button[data-view]')) other.setAttribute('aria-pressed', String(other.dataset.view === view));
  if (view === 'screen') byId('screen').focus();
  else terminal.focus();
}

for (const button of document.querySelectorAll<HTMLButtonElement>('[data-view]')) {
  if (!(button instanceof HTMLButtonElement)) continue;
  button.addEventListener('click', () => {
    viewChosen = true;
    showView(button.dataset.view!);
  });
}

/**
 * Guests that never write to the serial port (boot loaders, installers, most operating systems) show their life
 * on the screen only: when the console is still silent this long after the machine started and the screen shows
 * something, the screen is shown, unless the user picked a view. The time counts from the latest start (a
 * restart, Power on, a disk swapped in) and not while the machine is powered off: a machine switched off before
 * its guest said anything has not shown itself silent.
 */
const SILENT_SERIAL_MS = 12_000;
let serialSeen = false;
let viewChosen = false;
let lastStartAt = 0;
let silenceWatch: ReturnType<typeof setInterval> | undefined;
function showScreenIfSerialSilent(): void {
  lastStartAt = Date.now();
  silenceWatch ??= setInterval(() => {
    if (serialSeen || viewChosen) {
      clearInterval(silenceWatch);
      return;
    }
    if (poweredOff || Date.now() - lastStartAt < SILENT_SERIAL_MS || !screenView.hasContent) return;
    clearInterval(silenceWatch);
    showView('screen');
  }, 500);
}

// Drag and drop anywhere on the page opens an overlay.
const dropzone = byId('dropzone');
let dragDepth = 0;
window.addEventListener('dragenter', (event) => {
  if (!event.dataTransfer?.types.includes('Files')) return;
  dragDepth++;
  dropzone.hidden = false;
});
window.addEventListener('dragleave', () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) dropzone.hidden = true;
});
window.addEventListener('dragover', (event) => event.preventDefault());
window.addEventListener('drop', (event) => {
  event.preventDefault();
  dragDepth = 0;
  dropzone.hidden = true;
  const file = event.dataTransfer?.files[0];
  if (file && !readOnlyTab && started && !changing) guard(() => opener.open(file))();
});

// Guest writes reach OPFS within a moment; this makes them durable before the tab goes away.
function saveNow(): void {
  if (started) void machine.flush().catch(() => {});
  void disk.flush().catch(() => {});
}
addEventListener('pagehide', saveNow);
// Bytes the guest wrote that are not yet in the browser's storage are lost if the tab goes now: ask first. (They
// normally stay for under a second; after a failed write, for want of space, they stay until the page goes.)
addEventListener('beforeunload', (event) => {
  if (leaving || unsavedBytes() === 0) return;
  event.preventDefault();
  // Older browsers ask only when a string is set here (they show their own words, not this one).
  event.returnValue = 'The disk has changes that are not saved yet.';
});
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'hidden') saveNow();
});

phases.onChange((text, state) => {
  if (!poweredOff) setPhase(text, state);
});

/**
 * Asks the browser to keep this site's storage (the overlay) under storage pressure, and shows the answer: best
 * effort storage may be evicted, the disk with it, so the page then says so and points at Download.
 */
async function askToKeepStorage(): Promise<void> {
  let granted = false;
  try {
    granted = (await navigator.storage.persisted()) || (await navigator.storage.persist());
  } catch {
    // No StorageManager (or it refused to answer): nothing is promised.
  }
  showPersistence(granted);
}
void askToKeepStorage();

void start();

/**
 * The qcow86 page: opens the disk in its Worker, boots v86 on it, and wires the console, screen, status, cluster
 * map and actions together.
 */
import './style.css';
import type { V86, V86Image } from 'v86';
import wasmUrl from 'v86/build/v86.wasm?url';
import { RemoteDisk, DiskProblem } from './remote-disk.js';
import { v86Disk } from './hda.js';
import { createConsole } from './console-view.js';
import { MapView } from './map-view.js';
import { ask, clearProblem, setPhase, showDisk, showProblem, showStats } from './status-view.js';
import { BootPhases } from './boot-phase.js';
import type { OpenMode, OpenResult } from './protocol.js';

const byId = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

const params = new URLSearchParams(location.search);
const baseUrl = new URL(params.get('base') ?? '/images/base.qcow2', location.href).href;
const imagesUrl = new URL('/images/', location.href).href;
let overlayName = params.get('disk') ?? overlayNameFor(baseUrl);

/** One stored overlay per base URL; the name says which base it belongs to. */
function overlayNameFor(url: string): string {
  let hash = 0x811c9dc5;
  for (const char of url) hash = Math.imul(hash ^ char.charCodeAt(0), 0x01000193) >>> 0;
  const stem = (new URL(url).pathname.split('/').pop() || 'disk').replace(/\.qcow2$/, '').replace(/[^\w.-]/g, '_');
  return `${stem}-${hash.toString(16).padStart(8, '0')}.qcow2`;
}

const terminal = createConsole(byId('terminal'));
const mapView = new MapView(byId<HTMLCanvasElement>('map'), byId('map-legend'), byId('map-hover'), byId('map-scale'));
const disk = new RemoteDisk();
const phases = new BootPhases(terminal);
let emulator: V86 | undefined;
let mode: OpenMode = 'write';
let poweredOff = false;

disk.on((event) => {
  switch (event.event) {
    case 'stats':
      showStats(event.stats);
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

async function openDisk(): Promise<OpenResult | undefined> {
  setPhase('Opening the disk…');
  try {
    return await disk.open({ base: baseUrl, overlay: overlayName, mode });
  } catch (error) {
    if (!(error instanceof DiskProblem) || error.kind !== 'locked') throw error;
    const choice = await ask(
      'This disk is open in another tab',
      'Only one tab at a time may write to a disk, so your changes cannot be saved here while the other tab runs it. ' +
        'You can look at the disk read-only (changes made here are thrown away when you close the tab), or start a fresh, separate disk.',
      [
        { label: 'Open read-only', value: 'readonly' },
        { label: 'Use a fresh disk', value: 'fresh', kind: 'primary' },
      ],
    );
    if (choice !== 'readonly' && choice !== 'fresh') {
      setPhase('Not started: the disk is open in another tab', 'off');
      return undefined;
    }
    mode = choice;
    const result = await disk.open({ base: baseUrl, overlay: overlayName, mode });
    if (mode === 'fresh') {
      // Remember the fresh disk's name in the address, so a reload of this tab finds it again.
      overlayName = result.overlay;
      mode = 'write';
      const url = new URL(location.href);
      url.searchParams.set('disk', overlayName);
      history.replaceState(null, '', url);
    }
    return result;
  }
}

async function start(): Promise<void> {
  byId('base-url').textContent = baseUrl;
  let opened: OpenResult | undefined;
  try {
    opened = await openDisk();
  } catch (error) {
    const problem = error instanceof DiskProblem ? error : new DiskProblem('other', (error as Error).message);
    showProblem(problem.kind, problem.message);
    setPhase('Could not open the disk', 'error');
    return;
  }
  if (!opened) return;
  showDisk({ base: baseUrl, overlay: opened.overlay, mode: opened.mode });
  mapView.show(opened.map);
  const device = disk.device({ virtualSize: opened.virtualSize, name: opened.overlay, readOnly: false });
  const hda = v86Disk(device, {
    onError(error) {
      const problem = error instanceof DiskProblem ? error : new DiskProblem('other', (error as Error).message);
      showProblem(problem.kind, problem.message);
      setPhase('Disk error: the guest is waiting', 'error');
    },
  });
  setPhase('Loading the firmware…');
  // Loaded here rather than at the top: evaluating v86 is a long script, kept out of the page's first task.
  const { V86 } = await import('v86');
  emulator = new V86({
    wasm_path: wasmUrl,
    // The default guest needs no more; a smaller guest memory is also a shorter allocation on the main thread.
    memory_size: 64 * 1024 * 1024,
    vga_memory_size: 8 * 1024 * 1024,
    bios: { url: `${imagesUrl}bios.bin` },
    vga_bios: { url: `${imagesUrl}vgabios-stdvga.bin` },
    hda: hda as unknown as V86Image,
    screen: { container: byId('screen') },
    disable_mouse: true,
    autostart: true,
  });
  const machine = emulator;
  machine.add_listener('emulator-started', () => phases.started());
  machine.add_listener('serial0-output-byte', (byte) => terminal.output(byte));
  terminal.onInput((data) => machine.serial0_send(data));
  // The guest's PS/2 keyboard gets keys only while its screen has focus; the console and buttons keep theirs.
  machine.keyboard_set_enabled(false);
  const screen = byId('screen');
  screen.addEventListener('focus', () => machine.keyboard_set_enabled(true));
  screen.addEventListener('blur', () => machine.keyboard_set_enabled(false));
  screen.addEventListener('mousedown', () => screen.focus());
  terminal.focus();
  for (const button of document.querySelectorAll<HTMLButtonElement>('.actions button')) button.disabled = false;
  byId<HTMLButtonElement>('download').disabled = opened.mode === 'readonly';
  byId<HTMLButtonElement>('open').disabled = opened.mode === 'readonly';
  byId<HTMLButtonElement>('reset').disabled = opened.mode === 'readonly';
}

/** Stops the guest, runs `change` on the disk, then boots again from the changed disk. */
async function withMachineStopped(label: string, change: () => Promise<void>): Promise<void> {
  const machine = emulator;
  if (!machine) return;
  await machine.stop();
  setPhase(label);
  try {
    await change();
  } finally {
    terminal.clear();
    phases.reset();
    poweredOff = false;
    byId('power').textContent = 'Power off';
    machine.restart();
    await machine.run();
  }
}

async function download(): Promise<void> {
  const { bytes } = await disk.exportOverlay();
  const stem = (new URL(baseUrl).pathname.split('/').pop() || 'disk').replace(/\.qcow2$/, '');
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([bytes as Uint8Array<ArrayBuffer>], { type: 'application/octet-stream' }));
  link.download = `${stem}-overlay.qcow2`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
}

async function openOverlay(file: File): Promise<void> {
  let failure: string | undefined;
  await withMachineStopped(`Opening ${file.name}…`, async () => {
    try {
      mapView.show(await disk.importOverlay(file));
      clearProblem('foreign-overlay');
    } catch (error) {
      failure = (error as Error).message;
    }
  });
  if (failure) {
    await ask('This overlay cannot be used here', failure, [{ label: 'OK', value: 'ok', kind: 'primary' }]);
  }
}

async function resetDisk(): Promise<void> {
  const choice = await ask(
    'Reset the disk?',
    'Every change made to this disk is thrown away and the machine restarts from the base image. Download the overlay first if you want to keep it.',
    [
      { label: 'Cancel', value: 'cancel' },
      { label: 'Reset disk', value: 'reset', kind: 'danger' },
    ],
  );
  if (choice !== 'reset') return;
  await withMachineStopped('Resetting the disk…', async () => mapView.show(await disk.reset()));
}

async function togglePower(): Promise<void> {
  const machine = emulator;
  if (!machine) return;
  if (!poweredOff) {
    await machine.stop();
    await disk.flush();
    poweredOff = true;
    byId('power').textContent = 'Power on';
    setPhase('Powered off — the disk is saved', 'off');
    return;
  }
  await withMachineStopped('Starting…', async () => {});
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
  if (file) guard(() => openOverlay(file))();
});
byId('reset').addEventListener('click', guard(resetDisk));
byId('restart').addEventListener('click', guard(() => withMachineStopped('Restarting…', () => disk.flush())));
byId('power').addEventListener('click', guard(togglePower));

for (const button of document.querySelectorAll<HTMLButtonElement>('[data-view]')) {
  if (!(button instanceof HTMLButtonElement)) continue;
  button.addEventListener('click', () => {
    const view = button.dataset.view!;
    document.querySelector<HTMLElement>('section.displays')!.dataset.view = view;
    for (const other of document.querySelectorAll<HTMLButtonElement>('button[data-view]')) other.setAttribute('aria-pressed', String(other === button));
    if (view === 'screen') byId('screen').focus();
    else terminal.focus();
  });
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
  if (file && mode !== 'readonly') guard(() => openOverlay(file))();
});

// Writes are already in the OPFS file; this makes them durable before the tab goes away.
addEventListener('pagehide', () => void disk.flush().catch(() => {}));
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'hidden') void disk.flush().catch(() => {});
});

phases.onChange((text, state) => {
  if (!poweredOff) setPhase(text, state);
});

// Ask the browser not to evict the overlay under storage pressure (granted silently or not at all).
void navigator.storage?.persist?.().catch(() => false);

void start();

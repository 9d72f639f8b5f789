/**
 * The machine Worker: v86 and its disk adapter (the same V86DiskAdapter the Node harness uses) over a RemoteDisk
 * port to the disk Worker. The page only draws what this Worker reports (serial bytes, the VGA text screen) and
 * forwards keys, so the emulator's long instruction slices never block the page.
 */
import { V86, type V86Options } from 'v86';
import { V86DiskAdapter } from '../v86/disk.js';
import { ScreenCapture } from '../v86/screen.js';
import { KeyPacer, v86KeyboardTarget } from '../v86/key-pacing.js';
import { attachDisk, diskBusOptions, restoreV86State, type AttachedDisk } from '../v86/disk-bus.js';
import { restoreDevices, type MachineRecord } from '../v86/session.js';
import { RemoteDisk, DiskProblem } from './remote-disk.js';
import type { MachineEvent, MachineReply, MachineRequest, MachineStart, MachineState } from './machine-protocol.js';

interface WorkerScope {
  postMessage(message: unknown, transfer?: Transferable[]): void;
  onmessage: ((event: MessageEvent) => void) | null;
}
const scope = self as unknown as WorkerScope;

/** Serial output is sent this often at most; the screen and the dirty count a few times a second. */
const SERIAL_BATCH_MS = 16;
const REPORT_MS = 200;

let emulator: V86 | undefined;
let adapter: V86DiskAdapter | undefined;
/** The disk's connection to the guest, once v86's devices exist. */
let attached: Promise<AttachedDisk> | undefined;
/**
 * Keys from the page, fed to the guest as fast as it reads them: they arrive here in bursts between the
 * emulator's slices, and a boot loader reading through the BIOS keeps only 15 (src/v86/key-pacing.ts).
 */
let keys: KeyPacer | undefined;

function emit(event: MachineEvent, transfer: Transferable[] = []): void {
  scope.postMessage(event, transfer);
}

// ---------------------------------------------------------------- serial output, batched

let serial: number[] = [];
let serialTimer: ReturnType<typeof setTimeout> | undefined;
function serialByte(byte: number): void {
  serial.push(byte);
  serialTimer ??= setTimeout(() => {
    serialTimer = undefined;
    // The page must never learn of output the guest printed after a write before it learns of that write: a
    // guest's 'sync; echo done' shown while the page still says 'all saved' invites closing the tab too early.
    reportDirty();
    const bytes = Uint8Array.from(serial);
    serial = [];
    emit({ event: 'serial', bytes }, [bytes.buffer]);
  }, SERIAL_BATCH_MS);
}

// ---------------------------------------------------------------- the VGA screen

/** Graphics frames are sent at most this often (a frame is width x height x 4 bytes). */
const FRAME_MS = 250;
let screen: ScreenCapture | undefined;
let screenDirty = false;
let lastFrame = 0;

/**
 * v86 has no page to draw on here: the screen is watched by the same ScreenCapture the Node harness uses. Text
 * modes go to the page as rows (it shows them as text); graphics modes as RGBA frames from v86's frame buffer,
 * which change without any call the capture could see, so they are sent on a timer while a graphics mode shows.
 */
function watchScreen(machine: V86): void {
  screen = new ScreenCapture(machine as unknown as ConstructorParameters<typeof ScreenCapture>[0]);
  screen.onChange(() => (screenDirty = true));
  screenDirty = true;
  setInterval(() => {
    if (!screen) return;
    const mode = screen.mode;
    if (mode.graphical) {
      if (Date.now() - lastFrame < FRAME_MS) return;
      lastFrame = Date.now();
      const frame = screen.frame();
      emit({ event: 'frame', width: frame.width, height: frame.height, rgba: frame.rgba }, [frame.rgba.buffer as ArrayBuffer]);
      return;
    }
    if (!screenDirty) return;
    screenDirty = false;
    const cursor = screen.cursorState;
    emit({ event: 'screen', rows: screen.textRows(), cursor: cursor.visible ? { row: cursor.row, col: cursor.col } : undefined });
  }, REPORT_MS);
}

// ---------------------------------------------------------------- the machine

let lastDirty = -1;
/** Tells the page how many written bytes this Worker still holds, when that changed. */
function reportDirty(): void {
  const dirty = adapter?.unflushedBytes ?? 0;
  if (dirty === lastDirty) return;
  lastDirty = dirty;
  emit({ event: 'dirty', bytes: dirty });
}
setInterval(reportDirty, REPORT_MS);

function start(request: MachineStart): void {
  const disk = new RemoteDisk(request.disk);
  const device = disk.device({ virtualSize: request.virtualSize, name: request.name, readOnly: request.readOnly });
  const bus = request.initialState?.machine.diskBus ?? request.diskBus;
  adapter = new V86DiskAdapter(device, {
    // The disk Worker makes writes durable shortly after; keeping them here longer only widens the window in
    // which closing the tab loses them.
    flushDelayMs: 100,
    onError(error) {
      const problem = error instanceof DiskProblem ? error : new DiskProblem('other', (error as Error).message);
      emit({ event: 'disk-error', kind: problem.kind, message: problem.message });
    },
  });
  const options: V86Options = {
    wasm_path: request.wasm,
    memory_size: request.memoryBytes,
    vga_memory_size: 8 * 1024 * 1024,
    bios: { url: request.bios },
    vga_bios: { url: request.vgaBios },
    ...diskBusOptions(bus, adapter),
    // A resumed session is restored once v86 is loaded, before it runs (no boot); otherwise it boots at once.
    autostart: !request.initialState,
    // No DOM here: the page turns keys into scancodes (src/v86/keyboard.ts) and forwards them.
    disable_keyboard: true,
    disable_mouse: true,
    disable_speaker: true,
  } as V86Options;
  const machine = new V86(options);
  emulator = machine;
  keys = new KeyPacer(v86KeyboardTarget(machine));
  watchScreen(machine);
  // The guest's flushes reach the disk Worker (the page's 'all saved' then means durable); on virtio the device
  // is ours. A v86 whose internals changed stops here rather than run a guest whose sync promises nothing.
  attached = attachDisk(machine, bus, adapter, { virtio: { discardGranularity: request.discardGranularity } });
  attached.catch((error: unknown) => {
    void machine.stop();
    emit({ event: 'error', message: (error as Error).message });
  });
  if (request.initialState) {
    const state = request.initialState;
    machine.add_listener('emulator-loaded', () => void resume(state));
  }
  machine.add_listener('emulator-started', () => emit({ event: 'started' }));
  machine.add_listener('emulator-stopped', () => emit({ event: 'stopped' }));
  machine.add_listener('serial0-output-byte', serialByte);
}

/** Starts the new machine from a session's state instead of booting. */
async function resume(state: MachineState): Promise<void> {
  try {
    await restoreState(state);
    await need().machine.run();
  } catch (error) {
    emit({ event: 'error', message: `the session cannot be resumed: ${(error as Error).message}` });
  }
}

/** v86's state, then the devices v86 does not save (the virtio disk), into the stopped machine. */
async function restoreState(state: MachineState): Promise<void> {
  const { machine } = need();
  const disk = await attached!;
  if (state.machine.diskBus !== disk.bus) throw new Error(`the session's disk was on ${state.machine.diskBus}, this machine's is on ${disk.bus}`);
  await restoreV86State(machine, state.v86);
  restoreDevices(disk.virtio, state.machine, 'this disk', 'the session');
}

function need(): { machine: V86; disk: V86DiskAdapter } {
  if (!emulator || !adapter) throw new Error('the machine has not been started');
  return { machine: emulator, disk: adapter };
}

async function handle(request: MachineRequest): Promise<{ value?: unknown; transfer?: Transferable[] }> {
  switch (request.op) {
    case 'start':
      start(request);
      return {};
    case 'serial':
      need().machine.serial0_send(request.data);
      return {};
    case 'scancodes':
      need();
      // Queued, not awaited: the page's next key must not wait for the guest to read this one.
      keys!.type([request.codes]).catch(() => {});
      return {};
    case 'stop': {
      const { machine, disk } = need();
      await machine.stop();
      await disk.flush();
      return {};
    }
    case 'restart': {
      const { machine, disk } = need();
      if (request.diskChanged) {
        // Answers to reads of the old disk must not reach the new guest, nor its cached MBR geometry.
        await disk.flush();
        disk.invalidate();
      }
      // Keys typed for the machine before the reset are not for the one that boots now.
      keys?.clear(new Error('the machine was reset'));
      machine.restart();
      await machine.run();
      return {};
    }
    case 'flush':
      if (adapter) await adapter.flush();
      return {};
    case 'run':
      await need().machine.run();
      return {};
    case 'save-state': {
      const { machine, disk } = need();
      // The saved machine must not be waiting for a read that completes only in this session.
      await disk.settle();
      await disk.flush();
      const connected = await attached!;
      const v86 = await machine.save_state();
      const record: MachineRecord = { diskBus: connected.bus, virtio: connected.virtio?.state() };
      const state: MachineState = { v86, machine: record };
      return { value: state, transfer: [v86] };
    }
    case 'restore-state': {
      const { disk } = need();
      // A restored machine has its own idea of the disk (a session reverts the disk with it): answers to reads
      // of the previous machine and the cached MBR must not reach it.
      await disk.flush();
      disk.invalidate();
      keys?.clear(new Error('another session was restored'));
      await restoreState(request.state);
      return {};
    }
  }
}

scope.onmessage = (event: MessageEvent) => {
  const { id, request } = event.data as { id: number; request: MachineRequest };
  handle(request).then(
    ({ value, transfer }) => scope.postMessage({ id, ok: true, value } satisfies MachineReply, transfer ?? []),
    (error: unknown) => scope.postMessage({ id, ok: false, message: (error as Error).message ?? String(error) } satisfies MachineReply),
  );
};

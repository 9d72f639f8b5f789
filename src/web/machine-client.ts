/**
 * The page's handle on the machine Worker (v86 runs there, see machine-worker.ts): requests with replies, and the
 * Worker's events (serial bytes, screen, dirty bytes) to listeners. Method names follow v86's own API where one
 * exists, so page code reads the same as against an in-page emulator.
 */
import type { MachineEvent, MachineReply, MachineRequest, MachineStart, MachineState } from './machine-protocol.js';

export class MachineClient {
  private readonly worker: Worker;
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (value: unknown) => void; reject: (error: Error) => void }>();
  private readonly listeners = new Set<(event: MachineEvent) => void>();
  /** Guest bytes written but still held by the Worker's disk adapter (not yet in the disk Worker). */
  dirtyBytes = 0;

  constructor() {
    this.worker = new Worker(new URL('./machine-worker.ts', import.meta.url), { type: 'module', name: 'qcow86-machine' });
    this.worker.onmessage = (message: MessageEvent) => {
      const data = message.data as MachineReply | MachineEvent;
      if ('event' in data) {
        if (data.event === 'dirty') this.dirtyBytes = data.bytes;
        for (const listener of this.listeners) listener(data);
        return;
      }
      const pending = this.waiting.get(data.id);
      if (!pending) return;
      this.waiting.delete(data.id);
      if (data.ok) pending.resolve(data.value);
      else pending.reject(new Error(data.message));
    };
    this.worker.onerror = (event) => {
      const error = new Error(`the machine worker failed: ${event.message}`);
      for (const pending of this.waiting.values()) pending.reject(error);
      this.waiting.clear();
      for (const listener of this.listeners) listener({ event: 'error', message: error.message });
    };
  }

  on(listener: (event: MachineEvent) => void): void {
    this.listeners.add(listener);
  }

  private call<T>(request: MachineRequest, transfer: Transferable[] = []): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (value: unknown) => void, reject });
      this.worker.postMessage({ id, request }, transfer);
    });
  }

  /** Boots v86 in the Worker on the disk reached through `start.disk` (a port from RemoteDisk.connect()). */
  start(start: Omit<MachineStart, 'op'>): Promise<void> {
    return this.call({ op: 'start', ...start }, start.initialState ? [start.disk, start.initialState.v86] : [start.disk]);
  }

  serial0_send(data: string): void {
    void this.call({ op: 'serial', data }).catch(() => {});
  }

  keyboard_send_scancodes(codes: number[]): void {
    void this.call({ op: 'scancodes', codes }).catch(() => {});
  }

  /** Stops the CPU; resolves once every guest write acknowledged so far is in the disk Worker and flushed. */
  stop(): Promise<void> {
    return this.call({ op: 'stop' });
  }

  /** Every guest write acknowledged so far, in the disk Worker and flushed there. */
  flush(): Promise<void> {
    return this.call({ op: 'flush' });
  }

  run(): Promise<void> {
    return this.call({ op: 'run' });
  }

  /** Resets and runs the machine. `diskChanged`: the disk was replaced while stopped (reset disk, open overlay). */
  restart(diskChanged = false): Promise<void> {
    return this.call({ op: 'restart', diskChanged });
  }

  /**
   * The machine's state (v86's, and the disk bus and virtio device beside it), taken once no disk request is in
   * flight and every write is in the disk Worker.
   */
  save_state(): Promise<MachineState> {
    return this.call({ op: 'save-state' });
  }

  /** Restores a machine state; the disk adapter first forgets reads and geometry of the disk as it was. */
  restore_state(state: MachineState): Promise<void> {
    return this.call({ op: 'restore-state', state }, [state.v86]);
  }
}

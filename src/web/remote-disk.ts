/**
 * The page's side of the disk Worker: request/reply over postMessage, and a BlockDevice proxy so the v86 disk
 * adapter works over the remote disk exactly as over a local image.
 */
import type { BlockDevice } from '../qcow2/device.js';
import type { ClusterMap, OpenRequest, OpenResult, ProblemKind, Reply, Request, StagedImport, WorkerEvent } from './protocol.js';

/** A failure the Worker reported, with its kind so the page can choose what to offer. */
export class DiskProblem extends Error {
  constructor(
    readonly kind: ProblemKind,
    message: string,
  ) {
    super(message);
    this.name = 'DiskProblem';
  }
}

/** Where requests go: the disk Worker itself (the page) or a MessagePort connected to it (the machine Worker). */
type Endpoint = Pick<Worker, 'postMessage'> & { onmessage: ((event: MessageEvent) => void) | null };

export class RemoteDisk {
  private readonly endpoint: Endpoint;
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (value: unknown) => void; reject: (error: Error) => void }>();
  private readonly listeners = new Set<(event: WorkerEvent) => void>();

  /** Starts the disk Worker (from the page), or talks to one over `port` (from another Worker). */
  constructor(port?: MessagePort) {
    if (port) {
      this.endpoint = port;
    } else {
      const worker = new Worker(new URL('./disk-worker.ts', import.meta.url), { type: 'module', name: 'qcow86-disk' });
      worker.onerror = (event) => {
        const error = new DiskProblem('other', `the disk worker failed: ${event.message}`);
        for (const pending of this.waiting.values()) pending.reject(error);
        this.waiting.clear();
      };
      this.endpoint = worker;
    }
    this.endpoint.onmessage = (event: MessageEvent) => {
      const data = event.data as Reply | WorkerEvent;
      if ('event' in data) {
        for (const listener of this.listeners) listener(data);
        return;
      }
      const pending = this.waiting.get(data.id);
      if (!pending) return;
      this.waiting.delete(data.id);
      if (data.ok) pending.resolve(data.value);
      else pending.reject(new DiskProblem(data.kind, data.message));
    };
  }

  /** A port another Worker passes to `new RemoteDisk(port)` to reach the same disk directly. */
  connect(): MessagePort {
    const channel = new MessageChannel();
    this.endpoint.postMessage({ connect: channel.port2 }, [channel.port2]);
    return channel.port1;
  }

  on(listener: (event: WorkerEvent) => void): void {
    this.listeners.add(listener);
  }

  call<T>(request: Request, transfer: Transferable[] = []): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (value: unknown) => void, reject });
      this.endpoint.postMessage({ id, request }, transfer);
    });
  }

  open(request: Omit<OpenRequest, 'op'>): Promise<OpenResult> {
    return this.call<OpenResult>({ op: 'open', ...request });
  }

  /** The overlay's bytes; `asStored`: as last saved, after a write failed for want of space. */
  exportOverlay(): Promise<{ bytes: Uint8Array; name: string; asStored: boolean }> {
    return this.call({ op: 'export' });
  }

  /** Checks `file` and opens it read-write in a staging file; the stored disk is untouched until commitImport. */
  stageImport(file: Blob, name: string, passphrase?: string): Promise<StagedImport> {
    return this.call({ op: 'stage-import', file, name, passphrase });
  }

  /** Rewrites the open overlay encrypted with `passphrase`; an encrypted one only with its `current` passphrase. */
  encrypt(passphrase: string, current?: string): Promise<{ map: ClusterMap; encryption: string | undefined }> {
    return this.call({ op: 'encrypt', passphrase, current });
  }

  /** Rewrites the open, encrypted overlay as a plain one; `passphrase` must unlock it. */
  decrypt(passphrase: string): Promise<{ map: ClusterMap; encryption: string | undefined }> {
    return this.call({ op: 'decrypt', passphrase });
  }

  /** Puts the staged file in place of the stored disk; replies with its map. On failure the old disk stays open. */
  commitImport(): Promise<ClusterMap> {
    return this.call({ op: 'commit-import' });
  }

  discardImport(): Promise<void> {
    return this.call({ op: 'discard-import' });
  }

  /** Replaces the disk with an empty one; encrypted with `passphrase` when one is given. */
  reset(passphrase?: string): Promise<{ map: ClusterMap; encryption: string | undefined }> {
    return this.call({ op: 'reset', passphrase });
  }

  /** The bytes of a stored overlay that is not open (one whose base changed), for a download. */
  exportStored(overlay: string): Promise<Uint8Array> {
    return this.call({ op: 'export-stored', overlay });
  }

  /** Deletes a stored overlay that is not open, so the next open starts a new one. */
  discardStored(overlay: string): Promise<void> {
    return this.call({ op: 'discard-stored', overlay });
  }

  flush(): Promise<void> {
    return this.call({ op: 'flush' });
  }

  /** A BlockDevice whose reads and writes run in the Worker. */
  device(info: { virtualSize: number; name: string; readOnly: boolean }): BlockDevice {
    return {
      name: info.name,
      format: 'qcow2',
      virtualSize: info.virtualSize,
      readOnly: info.readOnly,
      read: (offset, length) => this.call<Uint8Array>({ op: 'read', offset, length }),
      // The caller may reuse its buffer (v86's PIO scratch): structured clone copies it, so no transfer here.
      write: (offset, data) => this.call<void>({ op: 'write', offset, data }),
      flush: () => this.flush(),
      close: () => this.call<void>({ op: 'close' }),
    };
  }
}

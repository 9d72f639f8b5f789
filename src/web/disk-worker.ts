/**
 * The disk Worker: owns the qcow2 engine, the OPFS overlay (through a synchronous access handle, which only a
 * dedicated Worker may hold) and the HTTP base. The machine Worker's disk adapter (over a port the page hands it) sends the guest's reads and writes here, so no
 * engine, network or storage work ever runs on the page's main thread.
 *
 * One writer per overlay: before opening an overlay for writing the Worker takes the Web Lock named after it and
 * holds it until it closes; a second tab finds the lock taken and is told so.
 */
import { LockError, BackingChainError, KeyError } from '../qcow2/errors.js';
import { MemoryStore } from '../io/memory.js';
import { OpfsStore, BlobStore, opfsDirectory, opfsExists, quotaErrorIn } from '../io/opfs.js';
import { DiskMap } from './disk-map.js';
import { checkPassword, describeBaseProblem, encryptionOf, makeOverlay, openBase, openTop, type BaseHandle } from './disk-open.js';
import type { OpenRequest, OpenResult, ProblemKind, Reply, Request, StagedImport, Stats, WorkerEvent } from './protocol.js';
import { deleteSessionById, resumeSessionState, saveSessionState, sessionsOf } from './disk-sessions.js';
import { tryLock, writerLock } from './web-locks.js';
import { checkOverlayName, copyToFile, makeRoomFor, recoverReplacement } from './overlay-files.js';
import { stage, stageCopy, swapStaged, unstage, type Staged, type StoredDisk } from './overlay-import.js';
import { ProblemError } from './problem.js';
import { serveCopies, sweepCopies, takeCopy } from './readonly-copy.js';

interface WorkerScope {
  postMessage(message: unknown, transfer?: Transferable[]): void;
  onmessage: ((event: MessageEvent) => void) | null;
}
const scope = self as unknown as WorkerScope;

/** Guest writes are made durable this long after the last one (and on request, e.g. when the page hides). */
const FLUSH_DELAY_MS = 400;
/** Stats and map changes are batched: the page redraws a few times a second at most. */
const REPORT_INTERVAL_MS = 250;
/** Network failures reading the base are retried forever with this backoff (ms), shown as a countdown. */
const RETRY_DELAYS = [1000, 2000, 4000, 8000, 15000];

/** What a person reads when the overlay's writes do not fit any more, and what to do about it. */
const QUOTA_MESSAGE =
  "The browser's storage for this site is full, so the guest's latest writes could not be saved (the base image's blocks kept in this browser were already deleted to make room). " +
  "Download overlay now: it holds the disk as last saved. Then free space (on this computer, or other sites' data in the browser's settings) and reload the page to go on; the writes that did not fit are lost.";

/** The open disk: the stored overlay (or a read-only tab's throwaway one) over the base. */
interface Session extends StoredDisk {
  mode: OpenRequest['mode'];
  /** Ends what the session holds besides its stores: the writer lock and copy service, or a read-only copy. */
  release: () => Promise<void>;
  request: OpenRequest;
}

let session: Session | undefined;
let staged: Staged | undefined;
/** The first write the overlay could not take (storage full): from then on Download reads the stored file as it is. */
let writeFailure: unknown;
let unsaved = 0;
let flushTimer: ReturnType<typeof setTimeout> | undefined;
const counters = { guestReads: 0, guestWrites: 0, bytesWritten: 0 };
/** Engine calls run one at a time: v86 has one command in flight per drive, and allocation must not interleave. */
let queue: Promise<unknown> = Promise.resolve();

/** What the Worker is doing right now, so a stall can be named (the page shows it when it lasts). */
let busy: { what: string; since: number } | undefined;

function serial<T>(task: () => Promise<T>, what = 'disk operation'): Promise<T> {
  const timed = async () => {
    busy = { what, since: Date.now() };
    try {
      return await task();
    } finally {
      busy = undefined;
    }
  };
  const run = queue.then(timed, timed);
  queue = run.catch(() => {});
  return run;
}

function emit(event: WorkerEvent, transfer: Transferable[] = []): void {
  scope.postMessage(event, transfer);
}

async function open(request: OpenRequest): Promise<OpenResult> {
  if (request.encryptNew?.passphrase !== undefined) refuseEmpty(request.encryptNew.passphrase);
  if (session) await close();
  const dir = await opfsDirectory();
  let overlayName = request.overlay;
  const releases: Array<() => void | Promise<void>> = [];
  const releaseAll = async () => {
    for (const release of releases.splice(0).reverse()) await release();
  };
  if (request.mode === 'fresh') {
    overlayName = request.overlay.replace(/(\.qcow2)?$/, `-${Date.now().toString(36)}.qcow2`);
  }
  nameProblem(overlayName);
  if (request.mode !== 'readonly') {
    const releaseLock = await tryLock(writerLock(overlayName));
    if (!releaseLock) throw new ProblemError('locked', 'This disk is open in another tab. Only one tab at a time may write to it.');
    releases.push(releaseLock);
  }
  let base: BaseHandle | undefined;
  let overlayStore: OpfsStore | MemoryStore | undefined;
  let password = passwordOf(request.passphrase);
  try {
    base = await openBase(request.base);
    const makeRoom = makeRoomFor(base);
    await sweepCopies(dir).catch(() => {});
    let created = false;
    let snapshot: BlobStore | undefined;
    let copiedAt: number | undefined;
    if (request.mode === 'readonly') {
      // Never the live file another tab writes: a copy taken at one moment (readonly-copy.ts).
      if (await storedNonEmpty(dir, overlayName)) {
        let copy;
        try {
          copy = await takeCopy(dir, overlayName, makeRoom);
        } catch (error) {
          if (quotaErrorIn(error)) throw new ProblemError('quota', `There is not enough browser storage for a read-only copy of this disk (${(error as Error).message}). Download the overlay in the tab that writes it, or free space.`);
          throw new ProblemError('other', `No read-only copy of this disk could be made: ${(error as Error).message}`);
        }
        releases.push(copy.release);
        snapshot = copy.store;
        copiedAt = copy.at;
      }
      overlayStore = new MemoryStore('memory:read-only changes');
      await makeOverlay(overlayStore, snapshot ? snapshot.name : request.base, snapshot ? undefined : base, base.device.virtualSize);
    } else {
      await recoverReplacement(dir, overlayName);
      // A new disk wanted encrypted whose passphrase the page has not asked yet: it asks only now that a disk is
      // really to be created, and nothing is created before it has one.
      if (request.encryptNew && request.encryptNew.passphrase === undefined && !(await storedNonEmpty(dir, overlayName))) {
        throw new ProblemError('new-passphrase-needed', 'A new encrypted disk is to be created: choose its passphrase.');
      }
      overlayStore = await OpfsStore.open(dir, overlayName, { create: true, makeRoom });
      if ((await overlayStore.size()) === 0) {
        // Encrypted with its own passphrase when the page asked for an encrypted new disk (see OpenRequest).
        const newPassword = passwordOf(request.encryptNew?.passphrase);
        await makeOverlay(overlayStore, request.base, base, base.device.virtualSize, newPassword);
        if (newPassword) password = newPassword;
        created = true;
      }
    }
    const device = await openTop(overlayStore, base, snapshot, password);
    const map = await DiskMap.build(device);
    if (request.mode !== 'readonly') releases.push(serveCopies(overlayName, (into) => serial(() => copyFor(into), 'copying the disk for a read-only tab')));
    // The passphrase goes no further than this session: the request it keeps has none.
    session = { device, base, overlayStore, overlayName, mode: request.mode, map, release: releaseAll, request: { ...request, passphrase: undefined, encryptNew: undefined }, makeRoom, password };
    unsaved = 0;
    writeFailure = undefined;
    const clusterSize = (device as { clusterSize?: unknown }).clusterSize;
    const encryption = await encryptionOf(device);
    return { virtualSize: device.virtualSize, overlay: overlayName, mode: request.mode, created, encryption, map: map.snapshot(), copiedAt, clusterSize: typeof clusterSize === 'number' ? clusterSize : undefined };
  } catch (error) {
    // The base's block file and the overlay are held through exclusive OPFS sync handles: a failed open (a
    // changed base refused, a damaged overlay) must let the next open, or another tab, have them.
    await overlayStore?.close().catch(() => {});
    await base?.store.close().catch(() => {});
    await releaseAll().catch(() => {});
    throw error;
  }
}

async function close(): Promise<void> {
  const current = session;
  if (!current) return;
  await discardStaged();
  session = undefined;
  clearTimeout(flushTimer);
  try {
    // Images opened over the shared stores only flush them on close (see disk-open.ts): close the stores here.
    await current.device.close();
    await current.overlayStore.close();
    await current.base.store.close();
  } finally {
    await current.release();
  }
}

/** True when `name` is a stored overlay with bytes in it (an empty file is a disk not yet made). */
async function storedNonEmpty(dir: FileSystemDirectoryHandle, name: string): Promise<boolean> {
  if (!(await opfsExists(dir, name))) return false;
  return (await (await dir.getFileHandle(name)).getFile()).size > 0;
}

/** A read-only tab asked for a copy: the overlay as of now, flushed, into the file `into`. */
async function copyFor(into: string): Promise<void> {
  const s = need();
  await flushUnlessFailed();
  await copyToFile(await opfsDirectory(), s.overlayStore, into, s.makeRoom);
}

/** A disk name from the address that is not one this page keeps is refused before any file is touched. */
function nameProblem(name: string): void {
  try {
    checkOverlayName(name);
  } catch (error) {
    throw new ProblemError('other', (error as Error).message);
  }
}

function need(): Session {
  if (!session) throw new ProblemError('other', 'the disk is not open');
  return session;
}

async function read(offset: number, length: number): Promise<Uint8Array> {
  const s = need();
  counters.guestReads++;
  for (let attempt = 0; ; attempt++) {
    try {
      const bytes = await s.device.read(offset, length);
      if (attempt > 0) emit({ event: 'problem-cleared', kind: 'network' });
      s.map.noteRead(offset, length);
      return bytes;
    } catch (error) {
      const problem = describeBaseProblem(error);
      if (problem.kind !== 'network') throw new ProblemError(problem.kind, problem.message);
      // The guest waits (its drive stays busy) while the network is down: better than an I/O error in the guest.
      const delay = RETRY_DELAYS[Math.min(attempt, RETRY_DELAYS.length - 1)]!;
      emit({ event: 'problem', kind: 'network', message: problem.message, retryAt: Date.now() + delay });
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

async function write(offset: number, data: Uint8Array): Promise<void> {
  const s = need();
  counters.guestWrites++;
  counters.bytesWritten += data.length;
  try {
    await s.device.write(offset, data);
  } catch (error) {
    if (quotaErrorIn(error)) {
      writeFailure ??= error;
      throw new ProblemError('quota', QUOTA_MESSAGE);
    }
    throw error;
  }
  s.map.noteWrite(offset, data.length);
  // The page hears of unsaved bytes before the machine Worker hears the write is done (and stops counting it as
  // its own): otherwise the page could show 'all saved' in between.
  if (unsaved === 0) emit({ event: 'stats', stats: stats() });
  unsaved += data.length;
  clearTimeout(flushTimer);
  flushTimer = setTimeout(() => void serial(flush, 'flush').catch(reportError), FLUSH_DELAY_MS);
}

async function flush(): Promise<void> {
  if (!session) return;
  const had = unsaved;
  try {
    await session.device.flush();
  } catch (error) {
    if (quotaErrorIn(error)) writeFailure ??= error;
    throw error;
  }
  unsaved = 0;
  if (had) emit({ event: 'stats', stats: stats() });
}

/**
 * Flushes, unless a write already failed for want of space: then the stored file stays as the engine's last
 * flush left it (consistent; the engine orders its writes so that a failed one leaves at most leaked clusters),
 * and reading it needs no write, so Download still works on a full storage.
 */
async function flushUnlessFailed(): Promise<void> {
  if (writeFailure) return;
  try {
    await flush();
  } catch (error) {
    writeFailure ??= error;
  }
}

/**
 * A failed session operation is about the session (its VM state, the codec, the overlay's space), never the
 * base image's server, whatever type the error has: only a full disk keeps its own kind.
 */
function sessionProblem(error: unknown): unknown {
  if (quotaErrorIn(error)) {
    return new ProblemError('quota', "There is not enough browser storage to save this session, even after deleting the base image's blocks kept in this browser: it was not saved. Download overlay to keep the disk, free space, then save again.");
  }
  if (error instanceof ProblemError) return error;
  return new ProblemError('other', error instanceof Error ? error.message : String(error));
}

/** Sessions live in the stored overlay: a read-only tab's changes (and sessions) would vanish with it. */
function writable(what: string): Session {
  const s = need();
  if (s.mode === 'readonly') throw new ProblemError('other', `This tab is read-only: ${what} in the tab that is writing the disk.`);
  return s;
}

async function exportOverlay(): Promise<{ bytes: Uint8Array; name: string; asStored: boolean }> {
  const s = need();
  if (s.mode === 'readonly') throw new ProblemError('other', 'This tab is read-only: download the overlay from the tab that is writing it.');
  await flushUnlessFailed();
  const size = await s.overlayStore.size();
  return { bytes: await s.overlayStore.read(0, size), name: s.overlayName, asStored: writeFailure !== undefined };
}

/** The stored overlay's bytes, read without opening it as an image (it may be one that cannot be opened). */
async function exportStored(name: string): Promise<Uint8Array> {
  nameProblem(name);
  const dir = await opfsDirectory();
  if (!(await opfsExists(dir, name))) throw new ProblemError('other', `There is no stored disk named ${name}.`);
  const file = await (await dir.getFileHandle(name)).getFile();
  return new Uint8Array(await file.arrayBuffer());
}

/** Deletes a stored overlay that is not open here, once no other tab is writing it. */
async function discardStored(name: string): Promise<void> {
  nameProblem(name);
  if (session?.overlayName === name) throw new ProblemError('other', 'This disk is open: use Reset to start it over.');
  const release = await tryLock(writerLock(name));
  if (!release) throw new ProblemError('locked', 'This disk is open in another tab. Only one tab at a time may write to it.');
  try {
    const dir = await opfsDirectory();
    if (await opfsExists(dir, name)) await dir.removeEntry(name);
  } finally {
    release();
  }
}

/** Open overlay, first step (overlay-import.ts): the file staged and opened; the user is asked next. */
async function stageImport(file: Blob, fileName: string, passphrase: string | undefined): Promise<StagedImport> {
  const s = writable('open an overlay');
  await discardStaged();
  staged = await stage(s, file, fileName, passwordOf(passphrase));
  return { sessions: sessionsOf(staged.device).length, size: file.size, encryption: await encryptionOf(staged.device) };
}

/**
 * "Encrypt disk" (overlay-import.ts): the encrypted copy is staged, then replaces the stored disk as a file would.
 * On an encrypted disk this changes its passphrase, given the `current` one (as Decrypt disk asks for it).
 */
async function encryptDisk(passphrase: string, current: string | undefined): Promise<void> {
  const s = writable('encrypt the disk');
  refuseEmpty(passphrase);
  if (s.password) {
    if (current === undefined) throw new ProblemError('passphrase-needed', 'This disk is encrypted: its current passphrase is needed to change it.');
    await checkPassword(s.device, passwordOf(current)!);
  }
  await replaceWithCopy(s, passwordOf(passphrase));
}

/**
 * "Decrypt disk" (overlay-import.ts): a plain copy is staged, then replaces the stored disk. Only with a passphrase
 * that unlocks the disk: an unlocked tab left alone does not give its disk away in the clear to whoever sits at it.
 */
async function decryptDisk(passphrase: string): Promise<void> {
  const s = writable('decrypt the disk');
  if (!s.password) throw new ProblemError('other', 'This disk is not encrypted.');
  await checkPassword(s.device, passwordOf(passphrase)!);
  await replaceWithCopy(s, undefined);
}

/** The stored disk rewritten as a copy of itself, encrypted with `password` or plain, swapped in as an import is. */
async function replaceWithCopy(s: Session, password: Uint8Array | undefined): Promise<void> {
  if (writeFailure) throw new ProblemError('quota', QUOTA_MESSAGE);
  await discardStaged();
  await flush();
  staged = await stageCopy(s, password);
  await commitImport();
}

function refuseEmpty(passphrase: string): void {
  if (passphrase === '') throw new ProblemError('other', 'An empty passphrase would protect nothing: choose one.');
}

/** What the page shows of the disk after it changed (Encrypt disk, Reset disk): its map and its encryption. */
async function diskView(): Promise<{ map: ReturnType<DiskMap['snapshot']> | undefined; encryption: string | undefined }> {
  return { map: session?.map.snapshot(), encryption: session && (await encryptionOf(session.device)) };
}

/** A passphrase as the engine takes it (UTF-8 bytes). */
function passwordOf(passphrase: string | undefined): Uint8Array | undefined {
  return passphrase === undefined ? undefined : new TextEncoder().encode(passphrase);
}

async function discardStaged(): Promise<void> {
  const current = staged;
  staged = undefined;
  if (current && session) await unstage(session, current);
}

/** Open overlay, confirmed: the staged file replaces the stored disk (or the old disk stays open). */
async function commitImport(): Promise<void> {
  const s = need();
  const incoming = staged;
  staged = undefined;
  if (!incoming) throw new ProblemError('other', 'No overlay file is waiting to be opened.');
  try {
    await swapStaged(s, incoming, flushUnlessFailed);
  } finally {
    unsaved = 0;
  }
  writeFailure = undefined;
}

async function reset(passphrase: string | undefined): Promise<void> {
  const s = need();
  if (passphrase !== undefined) refuseEmpty(passphrase);
  await s.device.flush().catch(() => {});
  await s.overlayStore.truncate(0);
  // A new passphrase makes the new disk an encrypted one; otherwise an encrypted disk stays encrypted, with the
  // passphrase it was opened with.
  if (passphrase !== undefined) s.password = passwordOf(passphrase);
  await makeOverlay(s.overlayStore, s.request.base, s.base, s.base.device.virtualSize, s.password);
  await reopenTop(s);
  writeFailure = undefined;
}

/** Re-reads the overlay's metadata after its bytes were replaced, keeping the same stores and lock. */
async function reopenTop(s: Session): Promise<void> {
  s.device = await openTop(s.overlayStore, s.base, undefined, s.password);
  s.map = await DiskMap.build(s.device);
  unsaved = 0;
}

function stats(): Stats {
  const base = session?.base.stats() ?? { fetched: 0, restored: 0, size: 0, requests: 0, hits: 0, misses: 0 };
  return {
    baseFetched: base.fetched,
    baseRestored: base.restored,
    baseSize: base.size,
    requests: base.requests,
    cacheHits: base.hits,
    cacheMisses: base.misses,
    overlaySize: session ? sizeNow(session.overlayStore) : 0,
    unsaved,
    ...counters,
    busy: busy ? { what: busy.what, ms: Date.now() - busy.since } : undefined,
  };
}

let lastOverlaySize = 0;
function sizeNow(store: OpfsStore | MemoryStore): number {
  void store.size().then((n) => (lastOverlaySize = n), () => {});
  return lastOverlaySize;
}

function reportError(error: unknown): void {
  const { kind, message } = classify(error);
  emit({ event: 'problem', kind, message });
}

function classify(error: unknown): { kind: ProblemKind; message: string } {
  if (error instanceof ProblemError) return { kind: error.kind, message: error.message };
  if (quotaErrorIn(error)) return { kind: 'quota', message: QUOTA_MESSAGE };
  if (error instanceof LockError) return { kind: 'locked', message: 'This disk is open in another tab.' };
  if (error instanceof KeyError) {
    return error.wrongKey
      ? { kind: 'wrong-passphrase', message: "Wrong passphrase: it opens none of the disk's key slots (Invalid password, cannot unlock any keyslot)." }
      : { kind: 'passphrase-needed', message: 'This disk is encrypted: its passphrase is needed to open it.' };
  }
  if (error instanceof BackingChainError) return describeBaseProblem(error);
  return describeBaseProblem(error);
}

setInterval(() => {
  if (!session) return;
  emit({ event: 'stats', stats: stats() });
  const changes = session?.map.takeChanges();
  if (changes) emit({ event: 'map', changes }, [changes.buffer]);
}, REPORT_INTERVAL_MS);

/**
 * Requests come from the page and, over a MessagePort the page hands over ('connect'), from the machine Worker
 * that runs v86: its disk reads and writes then go Worker to Worker without passing the page's main thread.
 */
interface Endpoint {
  postMessage(message: unknown, transfer?: Transferable[]): void;
}

scope.onmessage = (event: MessageEvent) => {
  const data = event.data as { id: number; request: Request } | { connect: MessagePort };
  if ('connect' in data) {
    const port = data.connect;
    port.onmessage = (message) => handle(message.data as { id: number; request: Request }, port);
    return;
  }
  handle(data, scope);
};

function handle({ id, request }: { id: number; request: Request }, endpoint: Endpoint): void {
  const reply = (value: unknown, transfer: Transferable[] = []) => endpoint.postMessage({ id, ok: true, value } satisfies Reply, transfer);
  const fail = (error: unknown) => {
    const { kind, message } = classify(error);
    endpoint.postMessage({ id, ok: false, kind, message } satisfies Reply);
  };
  switch (request.op) {
    case 'open':
      serial(() => open(request)).then((result) => reply(result), fail);
      return;
    case 'read':
      serial(() => read(request.offset, request.length), `read ${request.length} B at ${request.offset}`).then((bytes) => {
        // Transfer rather than copy, but only a buffer the bytes own outright (never a view into a cache).
        const owned = bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength ? bytes : bytes.slice();
        reply(owned, [owned.buffer as ArrayBuffer]);
      }, fail);
      return;
    case 'write':
      serial(() => write(request.offset, request.data), `write ${request.data.length} B at ${request.offset}`).then(() => reply(undefined), fail);
      return;
    case 'flush':
      serial(flush).then(() => reply(undefined), fail);
      return;
    case 'export':
      serial(exportOverlay, 'reading the overlay for a download').then((result) => reply(result, [result.bytes.buffer as ArrayBuffer]), fail);
      return;
    case 'stage-import':
      serial(() => stageImport(request.file, request.name, request.passphrase), `checking ${request.name}`).then((result) => reply(result), fail);
      return;
    case 'encrypt':
      serial(() => encryptDisk(request.passphrase, request.current), 'encrypting the disk').then(diskView).then((view) => reply(view), fail);
      return;
    case 'decrypt':
      serial(() => decryptDisk(request.passphrase), 'decrypting the disk').then(diskView).then((view) => reply(view), fail);
      return;
    case 'commit-import':
      serial(commitImport, 'replacing the disk').then(() => reply(session?.map.snapshot()), fail);
      return;
    case 'discard-import':
      serial(discardStaged).then(() => reply(undefined), fail);
      return;
    case 'reset':
      serial(() => reset(request.passphrase)).then(diskView).then((view) => reply(view), fail);
      return;
    case 'export-stored':
      serial(() => exportStored(request.overlay)).then((bytes) => reply(bytes, [bytes.buffer as ArrayBuffer]), fail);
      return;
    case 'discard-stored':
      serial(() => discardStored(request.overlay)).then(() => reply(undefined), fail);
      return;
    case 'sessions':
      serial(async () => sessionsOf(need().device)).then((list) => reply(list), fail);
      return;
    case 'save-session':
      serial(async () => {
        const s = writable('save a session');
        await flush();
        return saveSessionState(s.device, request.name, request.state, request);
      }, 'saving the session').then((result) => reply(result), (error) => fail(sessionProblem(error)));
      return;
    case 'resume-session':
      serial(async () => {
        const s = writable('resume a session');
        await flush();
        const resumed = await resumeSessionState(s.device, request.id);
        s.map = await DiskMap.build(s.device);
        return { ...resumed, map: s.map.snapshot() };
      }, 'resuming the session').then((value) => reply(value, [value.state]), (error) => fail(sessionProblem(error)));
      return;
    case 'delete-session':
      serial(async () => {
        const s = writable('delete a session');
        await deleteSessionById(s.device, request.id);
        return sessionsOf(s.device);
      }).then((list) => reply(list), fail);
      return;
    case 'close':
      serial(async () => {
        await flush();
        await close();
      }).then(() => reply(undefined), fail);
      return;
  }
}

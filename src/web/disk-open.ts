/**
 * Opening the tab's disk inside the Worker: the base over HTTP, an overlay on top of it, the backing-name
 * resolution between them, and checking an overlay a person picked against the base this page runs.
 */
import type { BlockDevice } from '../qcow2/device.js';
import type { ByteStore, StoreResolver } from '../qcow2/store.js';
import { openImage, probeFormat, Qcow2Image, BackingChainError } from '../qcow2/index.js';
import { sameVersion } from '../qcow2/store.js';
import { isPassingFailure, isVersionChange } from '../io/http-range.js';
import { createQcow2 } from '../qcow2/create.js';
import { encryptionInfo, openQcow2Encryption } from '../qcow2/encryption.js';
import { webCrypto } from '../io/web-crypto.js';
import { backingValidatorOf, INCOMPAT_DATA_FILE } from '../qcow2/header.js';
import { BlobStore } from '../io/opfs.js';
import { openBaseStore, baseStats, type BaseStats } from './base-store.js';
import type { ProblemKind } from './protocol.js';

export interface BaseHandle {
  url: string;
  /** Shared by every image opened over the base; its close() is the Worker's alone (see `shared`). */
  store: ByteStore;
  device: BlockDevice;
  format: 'qcow2' | 'qcow' | 'raw';
  stats(): BaseStats;
  /**
   * Deletes the base's blocks kept in this browser and keeps none from now on (the site's storage is full: the
   * overlay needs the room more). True when there were blocks to delete.
   */
  dropKeptBlocks(): boolean;
}

export async function openBase(url: string): Promise<BaseHandle> {
  const { store, kept } = await openBaseStore(url);
  try {
    const format = await probeFormat(store);
    // The base is the one file this page reaches: a base that names a backing or data file is refused by name.
    const device = await openImage(shared(store), { format, readOnly: true, resolver: refuseNamedFiles(url) });
    return {
      url,
      store,
      device,
      format,
      stats: () => baseStats(store),
      dropKeptBlocks: () => {
        const held = (kept?.count ?? 0) > 0;
        kept?.discard();
        return held;
      },
    };
  } catch (error) {
    await store.close().catch(() => {});
    throw error;
  }
}

/** For the base itself: every file it names is out of reach. */
function refuseNamedFiles(url: string): StoreResolver {
  return {
    async open(name) {
      throw new Error(`the base image ${url} names another file (${name}); this page reaches only the base image itself, never a file an image names`);
    },
  };
}

/** A view of `store` whose close() does nothing: several images open the one base, and closing one must not end it. */
function shared(store: ByteStore): ByteStore {
  return {
    name: store.name,
    readOnly: true,
    get validator() {
      return store.validator;
    },
    size: () => store.size(),
    read: (offset, length) => store.read(offset, length),
    write: (offset, data) => store.write(offset, data),
    truncate: (size) => store.truncate(size),
    flush: async () => {},
    close: async () => {},
  };
}

/**
 * Backing names in our overlays are the base's absolute URL (so QEMU's curl driver opens them too). A relative
 * name (an overlay made with `qemu-img create -b base.qcow2`) is taken relative to the base's URL. `snapshot`
 * stands for the stored overlay when a read-only tab stacks a throwaway overlay on it.
 */
function resolver(base: BaseHandle, snapshot?: BlobStore): StoreResolver {
  return {
    async open(name) {
      if (snapshot && name === snapshot.name) return { store: snapshot, fullName: name, identity: name };
      const url = new URL(name, base.url).href;
      if (url !== base.url) throw new Error(`this page only reaches its own base image ${base.url}, not ${url}`);
      return { store: shared(base.store), fullName: url, identity: url };
    },
  };
}

/** The browser's cryptography for encrypted overlays (web-crypto.ts: WebCrypto's AES for bulk decryption and PBKDF2, @noble/ciphers for the rest). */
const crypto = webCrypto();

/**
 * Writes an empty overlay of `size` bytes backed by `backingName` into `store`, recording the base's validator;
 * encrypted with LUKS (QEMU's defaults: aes-256-xts-plain64, sha256, PBKDF2 calibrated to 2 s) when a password
 * is given.
 */
export async function makeOverlay(store: ByteStore, backingName: string, base: BaseHandle | undefined, size: number, password?: Uint8Array): Promise<void> {
  await createQcow2(store, {
    size,
    backingFile: backingName,
    backingFormat: base ? base.format : 'qcow2',
    backingValidator: base?.store.validator,
    ...(password ? { encryption: { password, crypto } } : {}),
  });
  await store.flush();
}

/**
 * Opens `overlay` over the base (or over a read-only snapshot of the stored overlay) for writing; `password`
 * unlocks whichever of them is encrypted (a KeyError when it is missing or wrong).
 */
export async function openTop(overlay: ByteStore, base: BaseHandle, snapshot?: BlobStore, password?: Uint8Array): Promise<BlockDevice> {
  return openImage(sharedOverlay(overlay), { format: 'qcow2', readOnly: false, resolver: resolver(base, snapshot), crypto, passwords: () => password });
}

/** "LUKS aes-256-xts-plain64" for an encrypted overlay (or the encrypted layer under a read-only tab's), else undefined. */
export async function encryptionOf(device: BlockDevice): Promise<string | undefined> {
  for (let layer: BlockDevice | undefined = device; layer instanceof Qcow2Image; layer = layer.backing) {
    if (layer.header.cryptMethod === 0) continue;
    const info = await encryptionInfo(layer.store, layer.header);
    if (!info || info.format !== 'luks') return 'legacy AES';
    return `LUKS ${info['cipher-alg']}-${info['cipher-mode']}-${info['ivgen-alg']}`;
  }
  return undefined;
}

/**
 * Checks that `password` unlocks one of the key slots of `device`'s own encryption (its top layer, the stored
 * overlay), without touching the open image: a KeyError (wrongKey) when it does not.
 */
export async function checkPassword(device: BlockDevice, password: Uint8Array): Promise<void> {
  if (!(device instanceof Qcow2Image) || device.header.cryptMethod === 0) throw new Error('the disk is not encrypted');
  await openQcow2Encryption(device.store, device.header, crypto, password);
}

/**
 * The overlay's store outlives the images opened over it (reset and import reopen the image on the same
 * handle), so closing an image flushes the store but leaves it open; the Worker closes it at the end.
 */
function sharedOverlay(store: ByteStore): ByteStore {
  return { ...shared(store), readOnly: store.readOnly, flush: () => store.flush(), close: () => store.flush() };
}

/**
 * Checks from its header that a picked file is a qcow2 overlay of this page's base. Returns a sentence for a
 * person when it is not, undefined when it may be (the caller then opens it read-write, in a staging file).
 */
export async function validateImport(file: Blob, fileName: string, baseUrl: string, base: BaseHandle): Promise<string | undefined> {
  const store = new BlobStore(fileName, file);
  if ((await probeFormat(store)) !== 'qcow2') return `${fileName} is not a qcow2 image.`;
  let metadata;
  try {
    metadata = await Qcow2Image.readMetadata(store);
  } catch (error) {
    return `${fileName} is not a valid qcow2 image: ${(error as Error).message}`;
  }
  const { header } = metadata;
  if (header.backingFile === undefined) {
    return `${fileName} has no backing file: it is a whole disk, not an overlay of ${baseUrl}.`;
  }
  let wanted: string;
  try {
    wanted = new URL(header.backingFile, baseUrl).href;
  } catch {
    wanted = header.backingFile;
  }
  if (wanted !== baseUrl) {
    return `${fileName} is an overlay of a different base image (${header.backingFile}); this page runs ${baseUrl}. Open the page with ?base=${header.backingFile} to use it.`;
  }
  if (header.dataFile !== undefined || (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n) {
    // Its data would live in another file, which this page would have to reach: it reaches only its base.
    return `${fileName} keeps its data in an external data file${header.dataFile !== undefined ? ` (${header.dataFile})` : ''}; this page keeps a disk whole in the browser and reaches no file but its base image.`;
  }
  if (header.cryptMethod === 1) {
    return `${fileName} is encrypted with the legacy AES method, which cannot be written: convert it to LUKS (qemu-img or qcow86 convert -O qcow2 -o encrypt.format=luks,...) first.`;
  }
  if (header.size !== base.device.virtualSize) {
    return `${fileName} describes a ${header.size}-byte disk, but the base is ${base.device.virtualSize} bytes: it was not made for this base.`;
  }
  const recorded = backingValidatorOf(header);
  if (recorded !== undefined && base.store.validator !== undefined && !sameVersion(recorded, base.store)) {
    return `${fileName} was made for an earlier version of ${baseUrl} (version ${recorded}; the server now has ${base.store.validator}). Its changes cannot be applied to the new base.`;
  }
  return undefined;
}

/** Puts an error from the base (or the engine) into words for the status panel, and says which kind it is. */
export function describeBaseProblem(error: unknown): { kind: ProblemKind; message: string } {
  const message = error instanceof Error ? error.message : String(error);
  const changedOnServer =
    isVersionChange(error) || (error instanceof BackingChainError && /has changed since this overlay was made/.test(message)) || /not the version recorded earlier/.test(message);
  if (changedOnServer) {
    return {
      kind: 'base-changed',
      message: `The base image on the server has changed since this disk was made, so your saved changes no longer fit it and it was not opened (${message}). Download the overlay to keep it, or reset the disk to start over on the new base.`,
    };
  }
  // Anywhere in the chain: the engine may wrap the store's error in its own.
  for (let at = error, depth = 0; at !== undefined && at !== null && depth < 8; at = (at as { cause?: unknown }).cause, depth++) {
    if (isPassingFailure(at)) return { kind: 'network', message: `Cannot reach the server for the base image (${message}).` };
  }
  return { kind: 'other', message };
}

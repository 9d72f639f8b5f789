/**
 * Opening an image with its whole backing chain: format probing (as QEMU does when a format is not recorded),
 * backing and data-file resolution through the caller's resolver, and loop detection.
 */
import type { BlockDevice } from './device.js';
import { sameVersion, type ByteStore, type StoreResolver } from './store.js';
import { BackingChainError, UnsupportedError } from './errors.js';
import { u32 } from './bytes.js';
import { QCOW2_MAGIC, INCOMPAT_DATA_FILE, backingValidatorOf, type Qcow2Header } from './header.js';
import { PROBE_BYTES, foreignFormatOf, qcowFormatOf, type ImageFormat } from './probe.js';
import { Qcow2Image } from './image.js';
import { QcowV1Image } from './qcow1.js';
import { RawImage } from './raw.js';
import { portableCodecs, type Codecs } from './compression.js';
import type { CryptoProvider } from './crypto.js';

export type { ImageFormat };

/** Chains deeper than this are refused: each layer holds its L1 table in memory. */
export const MAX_CHAIN_DEPTH = 64;

export interface OpenOptions {
  /** Skip probing; the format must match the file. */
  format?: ImageFormat | undefined;
  /** Default true. Backing files are always opened read-only. */
  readOnly?: boolean;
  /** Finds backing and external data files; without one, an image that names a backing file fails to open. */
  resolver?: StoreResolver | undefined;
  /** The top image's canonical identity (a real path or URL), for loop detection; defaults to its store name. */
  identity?: string | undefined;
  codecs?: Codecs | undefined;
  /** Open backing files (default true). */
  openBacking?: boolean;
  /**
   * Open external data files (default true). Inspection (info, check, snapshot -l, measure) passes false: it never
   * opens a file an image names for its data, so such a name - a FIFO, a device, a URL - can neither hang nor
   * reach anything; the image then opens for its metadata only.
   */
  openDataFile?: boolean;
  l2CacheSize?: number | undefined;
  /** Open an overlay even when its base's recorded validator (ETag...) differs from the base's current one. */
  forceBackingChange?: boolean;
  /** Open a qcow2 image marked corrupt (or dirty) read-write in order to repair it (check -r). */
  repair?: boolean;
  /** Open encrypted qcow2 images too, for their metadata only (info): reading their data is refused. */
  metadataOnly?: boolean;
  /** Open the top image as qemu-img check does (see Qcow2OpenOptions.forCheck). */
  forCheck?: boolean;
  /** Cryptography for encrypted images. */
  crypto?: CryptoProvider | undefined;
  /**
   * The password of the encrypted image at `depth` of the chain (0 the top, 1 its backing file...), named `name`;
   * undefined when there is none. An encrypted layer without one fails to open (unless metadataOnly).
   */
  passwords?: ((depth: number, name: string) => Uint8Array | undefined) | undefined;
  /**
   * The encryption format the caller expects of the layer at `depth` (QEMU's encrypt.format option): a layer
   * encrypted otherwise is refused before it is unlocked.
   */
  encryptFormats?: ((depth: number) => 'luks' | 'aes' | undefined) | undefined;
}

/**
 * The format QEMU's probes pick: the qcow magic with version 1 is qcow, with version 2 or more qcow2 (a version
 * this engine does not read is then refused by name); with version 0 neither driver claims it, so it is raw.
 */
export async function probeFormat(store: ByteStore): Promise<ImageFormat> {
  return qcowFormatOf(await store.read(0, 8));
}

/**
 * The QEMU driver that would claim a file this engine does not read (VMDK, VDI, VHDX, VHD, QED, Parallels, LUKS,
 * Bochs), judged from its first 2 KiB as QEMU's probes judge it; undefined when none does (then QEMU takes it as
 * raw too). Probing must not take such an image for a raw disk: its bytes are not the guest's.
 */
export async function probeForeignFormat(store: ByteStore): Promise<string | undefined> {
  return foreignFormatOf(await store.read(0, PROBE_BYTES));
}

/** True when the file starts with the qcow magic, whatever its version. */
async function hasQcowMagic(store: ByteStore): Promise<boolean> {
  const start = await store.read(0, 4);
  return start.length === 4 && u32(start, 0) === QCOW2_MAGIC;
}

export async function openImage(store: ByteStore, options: OpenOptions = {}): Promise<BlockDevice> {
  const codecs = options.codecs ?? portableCodecs();
  return openLayer(store, options.format, options.readOnly ?? true, options.identity ?? store.name, [], { ...options, codecs });
}

async function openLayer(
  store: ByteStore,
  format: ImageFormat | undefined,
  readOnly: boolean,
  identity: string,
  chain: string[],
  options: OpenOptions & { codecs: Codecs },
): Promise<BlockDevice> {
  if (chain.includes(identity)) {
    await store.close();
    throw new BackingChainError(chain[0] ?? identity, `backing chain loop: ${[...chain, identity].join(' -> ')}`);
  }
  if (chain.length >= MAX_CHAIN_DEPTH) {
    await store.close();
    throw new BackingChainError(chain[0] ?? identity, `backing chain is deeper than ${MAX_CHAIN_DEPTH} images`);
  }
  const path = [...chain, identity];
  try {
    const actual = await probeFormat(store);
    const chosen = format ?? actual;
    // Asked for qcow2, a qcow-magic file of version 0 goes to the qcow2 header parser, which names the version.
    const versionZero = chosen === 'qcow2' && actual === 'raw' && (await hasQcowMagic(store));
    if (chosen !== 'raw' && chosen !== actual && !versionZero) {
      throw new UnsupportedError(store.name, 'format', `image is not in ${chosen} format (it looks like ${actual})`);
    }
    if (format === undefined && actual === 'raw') {
      const foreign = await probeForeignFormat(store);
      if (foreign) {
        throw new UnsupportedError(
          store.name,
          'format',
          `this is a ${foreign} image, which qcow86 does not read (it reads qcow2, qcow and raw): convert it with qemu-img convert -O qcow2, or give -f raw to use its bytes as a raw disk`,
        );
      }
    }
    if (chosen === 'raw') return await RawImage.open(store, { readOnly, probed: format === undefined });
    if (chosen === 'qcow') {
      // The header names the backing file; a first open without it learns the name cheaply.
      const probe = await QcowV1Image.open(store, { codecs: options.codecs, metadataOnly: true });
      checkEncryptFormat(store.name, probe.header.cryptMethod, options.encryptFormats?.(chain.length));
      const backingName = probe.backingName;
      const backing = backingName !== undefined && options.openBacking !== false ? await openBacking(store, backingName, undefined, path, options) : undefined;
      return await QcowV1Image.open(store, { backing, codecs: options.codecs, crypto: options.crypto, password: options.passwords?.(chain.length, store.name), metadataOnly: options.metadataOnly === true });
    }
    const forCheck = chain.length === 0 && options.forCheck === true;
    const { header } = await Qcow2Image.readMetadata(store, forCheck);
    checkEncryptFormat(store.name, header.cryptMethod, options.encryptFormats?.(chain.length));
    let dataStore: ByteStore | undefined;
    const skipData = options.openDataFile === false && (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
    if (header.incompatibleFeatures & INCOMPAT_DATA_FILE && header.dataFile !== undefined && !skipData) {
      if (!options.resolver) throw new UnsupportedError(store.name, 'data file', `cannot open external data file '${header.dataFile}': no resolver given`);
      dataStore = (await options.resolver.open(header.dataFile, store, { readOnly, purpose: 'data file' })).store;
    }
    const backing =
      header.backingFile !== undefined && options.openBacking !== false
        ? await openBacking(store, header.backingFile, header.backingFormat, path, options)
        : undefined;
    if (backing) await checkBackingValidator(store, header, backing, options);
    return await Qcow2Image.open(store, {
      readOnly,
      codecs: options.codecs,
      backing,
      dataStore,
      l2CacheSize: options.l2CacheSize,
      repair: chain.length === 0 && options.repair === true,
      metadataOnly: options.metadataOnly === true || skipData,
      forCheck,
      crypto: options.crypto,
      password: header.cryptMethod !== 0 ? options.passwords?.(chain.length, store.name) : undefined,
    });
  } catch (error) {
    await store.close().catch(() => {});
    throw error;
  }
}

/** QEMU's check of encrypt.format against the header (its message). */
function checkEncryptFormat(file: string, cryptMethod: number, expected: 'luks' | 'aes' | undefined): void {
  if (expected === undefined) return;
  const actual = cryptMethod === 2 ? 'luks' : cryptMethod === 1 ? 'aes' : undefined;
  if (actual === undefined) throw new UnsupportedError(file, 'encryption', `encrypt.format=${expected} given, but the image is not encrypted`);
  if (actual !== expected) throw new UnsupportedError(file, 'encryption', `Header reported '${actual}' encryption format but options specify '${expected}'`);
}

async function openBacking(
  store: ByteStore,
  name: string,
  recordedFormat: string | undefined,
  chain: string[],
  options: OpenOptions & { codecs: Codecs },
): Promise<BlockDevice> {
  if (!options.resolver) throw new BackingChainError(store.name, `cannot open backing file '${name}': no resolver given`);
  let format: ImageFormat | undefined;
  if (recordedFormat !== undefined) {
    if (recordedFormat !== 'qcow2' && recordedFormat !== 'raw' && recordedFormat !== 'qcow') {
      throw new UnsupportedError(store.name, 'backing format', `backing file '${name}' has format '${recordedFormat}', which is not supported (qcow2, qcow, raw)`);
    }
    format = recordedFormat;
  }
  let opened: { store: ByteStore; fullName: string; identity: string };
  try {
    opened = await options.resolver.open(name, store, { readOnly: true, purpose: 'backing file' });
  } catch (error) {
    // A chain error (a resolver's refusal says which image named what) is already the whole story.
    if (error instanceof BackingChainError) throw error;
    throw new BackingChainError(store.name, `could not open backing file '${name}': ${(error as Error).message}`);
  }
  const device = await openLayer(opened.store, format, true, opened.identity, chain, options);
  backingNames.set(device, opened.fullName);
  return device;
}

/** Refuses an overlay whose base changed since the overlay was made: its blocks would mix two versions. */
async function checkBackingValidator(store: ByteStore, header: Qcow2Header, backing: BlockDevice, options: OpenOptions): Promise<void> {
  const recorded = backingValidatorOf(header);
  const backingStore = (backing as { store?: ByteStore }).store;
  const current = backingStore?.validator;
  if (recorded === undefined || current === undefined || sameVersion(recorded, backingStore!) || options.forceBackingChange) return;
  await backing.close().catch(() => {});
  throw new BackingChainError(
    store.name,
    `backing file '${header.backingFile}' has changed since this overlay was made (recorded version ${recorded}, now ${current}); reopen with force to use it anyway`,
  );
}

const backingNames = new WeakMap<BlockDevice, string>();

/** The full-backing-filename a backing device was opened under (qemu-img info's key). */
export function fullNameOf(device: BlockDevice): string {
  return backingNames.get(device) ?? device.name;
}

/** The backing device of an image, when it has one. */
export function backingOf(device: BlockDevice): BlockDevice | undefined {
  return (device as { backing?: BlockDevice }).backing;
}

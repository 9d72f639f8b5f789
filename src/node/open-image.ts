/**
 * Opening an image named on a command line: a local path (later a URL), read-only unless asked, with the Node
 * resolver (QEMU-style relative backing names), native zlib and an optional -f format.
 */
import { stat } from 'node:fs/promises';
import { FileStore } from '../io/file.js';
import { nodeResolver } from '../io/node-resolver.js';
import { nodeCodecs } from '../io/node-codecs.js';
import { nodeCrypto } from '../io/node-crypto.js';
import { openImage, type ImageFormat } from '../qcow2/open.js';
import type { BlockDevice } from '../qcow2/device.js';
import type { ByteStore } from '../qcow2/store.js';
import { FormatError } from '../qcow2/errors.js';

export const FORMATS: readonly ImageFormat[] = ['qcow2', 'qcow', 'raw'];

/** Validates a -f/-F/-O value; undefined stays undefined (probe). */
export function parseFormat(value: string | undefined, option = '-f'): ImageFormat | undefined {
  if (value === undefined) return undefined;
  if ((FORMATS as readonly string[]).includes(value)) return value as ImageFormat;
  throw new FormatError('', `Unknown file format '${value}' (option ${option}; supported: ${FORMATS.join(', ')})`);
}

export interface OpenPathOptions {
  format?: ImageFormat | undefined;
  readOnly?: boolean;
  /** Open backing files (default true). */
  openBacking?: boolean;
  /** Open an external data file the image names (default true; inspection passes false). */
  openDataFile?: boolean;
  l2CacheSize?: number;
  /** Open read-write even when marked corrupt or dirty, to repair it (check -r). */
  repair?: boolean;
  /** Open encrypted images for their metadata (info). */
  metadataOnly?: boolean;
  /** Open as qemu-img check does (a missing refcount table is reported by the check, not refused). */
  forCheck?: boolean;
  /** Passwords of encrypted layers by depth (see image-spec.ts). */
  passwords?: ((depth: number) => Uint8Array | undefined) | undefined;
  /** Expected encryption formats by depth (encrypt.format in --image-opts). */
  encryptFormats?: ((depth: number) => 'luks' | 'aes' | undefined) | undefined;
}

export async function openPath(path: string, options: OpenPathOptions = {}): Promise<BlockDevice> {
  const readOnly = options.readOnly ?? true;
  const store = await FileStore.open(path, { readOnly });
  return openImage(store, {
    format: options.format,
    readOnly,
    resolver: nodeResolver(),
    codecs: nodeCodecs(),
    crypto: nodeCrypto(),
    passwords: options.passwords,
    encryptFormats: options.encryptFormats,
    openBacking: options.openBacking ?? true,
    openDataFile: options.openDataFile ?? true,
    repair: options.repair === true,
    metadataOnly: options.metadataOnly === true,
    forCheck: options.forCheck === true,
    ...(options.l2CacheSize !== undefined ? { l2CacheSize: options.l2CacheSize } : {}),
  });
}

/** Bytes a file occupies on disk (st_blocks * 512, qemu-img's actual-size); undefined when unknown. */
export async function allocatedSize(store: ByteStore | string): Promise<number | undefined> {
  try {
    const st = await stat(typeof store === 'string' ? store : store.name);
    return st.blocks * 512;
  } catch {
    return undefined;
  }
}

/** qemu-img's size_to_str: 1024-based units, three significant digits ("396 KiB", "1.5 GiB"). */
export function humanSize(bytes: number): string {
  const units = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  // frexp(val / (1000/1024)) → exponent e; unit index (e - 1) / 10, so values stay below 1000 of the unit.
  const scaled = bytes / (1000 / 1024);
  const exponent = scaled === 0 ? 0 : Math.floor(Math.log2(scaled)) + 1;
  const index = Math.max(0, Math.min(units.length - 1, Math.trunc((exponent - 1) / 10)));
  const value = bytes / 2 ** (index * 10);
  return `${formatG3(value)} ${units[index]}B`;
}

/** printf's %0.3g for the values humanSize produces (0 <= value < 1000). */
function formatG3(value: number): string {
  if (value === 0) return '0';
  return String(Number(value.toPrecision(3)));
}

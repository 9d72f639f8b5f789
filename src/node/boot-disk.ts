/**
 * Opens the disk a `qcow86 boot` runs on: always a qcow2 overlay whose backing file is the base, so the base is
 * never written.
 *
 *   --overlay FILE (exists)   FILE opened read-write on its own recorded backing file (--base must agree if given)
 *   --overlay FILE (missing)  FILE created as a qcow2 overlay on --base (default: public/images/base.qcow2)
 *   no --overlay              a throw-away overlay in memory on --base: the guest's writes vanish at exit
 *
 * A base given as an http(s) URL is opened by the HTTP Range store through nodeResolver (src/io/http.ts).
 */
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { FileStore, HttpStore, MemoryStore, isHttpUrl, nodeCodecs, nodeResolver } from '../io/node.js';
import { createQcow2 } from '../qcow2/create.js';
import { backingOf, openImage, probeFormat } from '../qcow2/open.js';
import type { BlockDevice } from '../qcow2/device.js';
import type { ByteStore } from '../qcow2/store.js';
import { FormatError } from '../qcow2/errors.js';
import { DEFAULT_IMAGES_DIR } from './machine-assets.js';

export const DEFAULT_BASE = resolve(DEFAULT_IMAGES_DIR, 'base.qcow2');

export interface BootDiskOptions {
  base?: string | undefined;
  overlay?: string | undefined;
}

export interface BootDisk {
  device: BlockDevice;
  /** What was opened, for the log: "overlay x.qcow2 (created) on base.qcow2". */
  description: string;
}

/** The base's store: a local file or an http(s) URL (HttpStore: validated Range reads, cache, readahead). */
async function openBaseStore(base: string): Promise<ByteStore> {
  return isHttpUrl(base) ? HttpStore.open(base) : FileStore.open(base, { readOnly: true });
}

/** Virtual size and format of the base, read once to create an overlay of the same size. */
async function describeBase(base: string): Promise<{ size: number; format: string }> {
  const store = await openBaseStore(base);
  try {
    const format = await probeFormat(store);
    const device = await openImage(store, { readOnly: true, resolver: nodeResolver(), codecs: nodeCodecs() });
    const size = device.virtualSize;
    await device.close();
    return { size, format };
  } catch (error) {
    await store.close().catch(() => {});
    throw error;
  }
}

/** The base's name as it is recorded in a new overlay: URLs as given, files as absolute paths. */
function backingName(base: string): string {
  return isHttpUrl(base) ? base : resolve(base);
}

export async function openBootDisk(options: BootDiskOptions): Promise<BootDisk> {
  const base = options.base ?? DEFAULT_BASE;
  if (!isHttpUrl(base) && !existsSync(base)) {
    throw new FormatError(base, options.base ? 'base image not found' : 'default guest not built: run `npm run images`');
  }
  const open = (store: ByteStore) => openImage(store, { readOnly: false, resolver: nodeResolver(), codecs: nodeCodecs(), format: 'qcow2' });

  if (options.overlay && existsSync(options.overlay)) {
    const device = await open(await FileStore.open(options.overlay, { readOnly: false }));
    const backing = backingOf(device);
    if (options.base && backing && backing.name !== backingName(options.base) && backing.name !== options.base) {
      console.error(`qcow86 boot: note: ${options.overlay} is backed by ${backing.name}, not ${options.base}; using its own backing file`);
    }
    return { device, description: `overlay ${options.overlay} on ${backing?.name ?? '(no backing file)'}` };
  }

  const { size, format } = await describeBase(base);
  const spec = { size, backingFile: backingName(base), backingFormat: format };
  if (options.overlay) {
    const store = await FileStore.open(options.overlay, { readOnly: false, create: true });
    await createQcow2(store, spec);
    return { device: await open(store), description: `overlay ${options.overlay} (created) on ${spec.backingFile}` };
  }
  const store = new MemoryStore('memory-overlay.qcow2');
  await createQcow2(store, spec);
  return { device: await open(store), description: `a throw-away overlay in memory on ${spec.backingFile}` };
}

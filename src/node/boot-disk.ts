/**
 * Opens the disk a `qcow86 boot` runs on: always a qcow2 overlay whose backing file is the base, so the base is
 * never written.
 *
 *   --overlay FILE (exists)   FILE opened read-write on its own recorded backing file (--base must agree if given)
 *   --overlay FILE (missing)  FILE created as a qcow2 overlay on --base (default: public/images/base.qcow2)
 *   no --overlay              a throw-away overlay in memory on --base: the guest's writes vanish at exit
 *
 * A base given as an http(s) URL is opened by the HTTP Range store through nodeResolver (src/io/http.ts).
 *
 * The overlay's write lock is held for as long as the device is open (the whole run of the guest).
 *
 * What the guest is given is what the user named (README, Security). Unless `trustImage`, a file an image of the
 * chain names is opened only where it is
 *   - a backing file that resolves, after symlinks, inside the overlay's own directory (without --overlay: the
 *     base's directory), is the --base given, or is the default guest's base; or an http(s) URL whose every
 *     connection goes to an address that is not link-local (cloud metadata services live there);
 *   - a data file that resolves inside the overlay's directory.
 * Anything else is refused before the guest starts, naming the field, the value and --trust-image.
 */
import { existsSync } from 'node:fs';
import { realpath } from 'node:fs/promises';
import { dirname, resolve, sep } from 'node:path';
import { FileStore, HttpStore, MemoryStore, combinePath, isHttpUrl, nodeCodecs, nodeCrypto, nodeResolver } from '../io/node.js';
import { lockOutput, releasedOnClose } from '../io/lock.js';
import { BOOT_HTTP_OPTIONS, type HttpStoreOptions } from '../io/http.js';
import { createQcow2 } from '../qcow2/create.js';
import { backingOf, fullNameOf, openImage, probeFormat } from '../qcow2/open.js';
import type { BlockDevice } from '../qcow2/device.js';
import type { ByteStore, StoreResolver } from '../qcow2/store.js';
import { BackingChainError, FormatError } from '../qcow2/errors.js';
import { DEFAULT_IMAGES_DIR } from './machine-assets.js';

export const DEFAULT_BASE = resolve(DEFAULT_IMAGES_DIR, 'base.qcow2');

export interface BootDiskOptions {
  base?: string | undefined;
  overlay?: string | undefined;
  /** Open an existing overlay even though its base changed (new ETag...) since the overlay was made. */
  forceBaseChange?: boolean | undefined;
  /** Options for an http(s) base (tests and benchmarks pass their own counters or limits). */
  http?: HttpStoreOptions | undefined;
  /** Open every file the images name, wherever it is (`--trust-image`). */
  trustImage?: boolean | undefined;
  /**
   * The password of the encrypted images of the chain (boot --key-secret). A new overlay is then created
   * encrypted with it (LUKS with QEMU's defaults): the guest's writes never reach the disk in the clear.
   */
  password?: Uint8Array | undefined;
}

export interface BootDisk {
  device: BlockDevice;
  /** What was opened, for the log: "overlay x.qcow2 (created) on base.qcow2". */
  description: string;
  /** The base's HTTP store when the base is reached over http(s), for its request and byte counters. */
  http?: HttpStore | undefined;
}

/** The base's name as it is recorded in a new overlay: URLs as given, files as absolute paths. */
function backingName(base: string): string {
  return isHttpUrl(base) ? base : resolve(base);
}

/**
 * The base opened once: its store, format and virtual size. The overlay is then opened through a resolver that
 * hands back this same store for the base's name, so an HTTP base costs one open (and its metadata stays cached)
 * instead of a second first-request and header read.
 */
interface OpenedBase {
  store: ByteStore;
  format: 'qcow2' | 'qcow' | 'raw';
  size: number;
}

async function openBase(base: string, http: HttpStoreOptions | undefined, resolver: StoreResolver, password: Uint8Array | undefined): Promise<OpenedBase> {
  const store = isHttpUrl(base) ? await HttpStore.open(base, http) : await FileStore.open(base, { readOnly: true });
  try {
    const format = await probeFormat(store);
    // A view whose close() is a no-op: closing this probe must not close the store the overlay will use.
    const device = await openImage(keepOpen(store), { readOnly: true, resolver, codecs: nodeCodecs(), format, crypto: nodeCrypto(), passwords: () => password });
    const size = device.virtualSize;
    await device.close();
    return { store, format, size };
  } catch (error) {
    await store.close().catch(() => {});
    throw error;
  }
}

function keepOpen(store: ByteStore): ByteStore {
  return {
    name: store.name,
    readOnly: true,
    validator: store.validator,
    legacyValidators: store.legacyValidators,
    size: () => store.size(),
    read: (offset, length) => store.read(offset, length),
    write: (offset, data) => store.write(offset, data),
    truncate: (size) => store.truncate(size),
    flush: async () => {},
    close: async () => {},
  };
}

/** `resolver`, except that the base's recorded name resolves to the store already open for it (once). */
function reusing(base: OpenedBase, name: string, resolver: StoreResolver): StoreResolver {
  let unused: ByteStore | undefined = base.store;
  return {
    async open(wanted, relativeTo, options) {
      if (unused && wanted === name && options.readOnly) {
        const store = unused;
        unused = undefined;
        return { store, fullName: name, identity: isHttpUrl(name) ? name : await realpath(name).catch(() => name) };
      }
      return resolver.open(wanted, relativeTo, options);
    },
  };
}

/** What `boot` lets the images of a chain name without --trust-image (see the header comment). */
interface TrustPolicy {
  /** Real path of the overlay's directory (without an overlay file, of the base's). */
  directory: string;
  /** Real paths, and URLs as given, of the files the user named: --base and the default guest's base. */
  named: Set<string>;
}

/** Refuses an image-named file the policy does not allow, with the field, the value and the way out. */
export class UntrustedNameError extends BackingChainError {}

async function trustPolicy(anchor: string, named: string[]): Promise<TrustPolicy> {
  const real = async (path: string) => realpath(path).catch(() => resolve(path));
  return {
    directory: await real(dirname(resolve(anchor))),
    named: new Set(await Promise.all(named.map((name) => (isHttpUrl(name) ? name : real(name))))),
  };
}

/** nodeResolver under a TrustPolicy; URLs it lets through are opened with link-local addresses refused. */
function trustingResolver(policy: TrustPolicy, http: HttpStoreOptions): StoreResolver {
  const named = nodeResolver(http);
  let guarded: StoreResolver | undefined;
  return {
    async open(name, relativeTo, options) {
      const purpose = options.purpose ?? 'backing file';
      const refuse = (why: string) => {
        throw new UntrustedNameError(relativeTo.name, `${purpose} '${name}' ${why}: refused (boot with --trust-image to trust every name the image records)`);
      };
      if (isUrlName(name) || isUrlName(relativeTo.name)) {
        const url = resolveUrl(name, relativeTo.name);
        if (purpose === 'data file') refuse('is not a file inside the overlay\'s directory');
        if (url === undefined || !isHttpUrl(url)) refuse('is not an http(s) URL');
        if (policy.named.has(url!)) return named.open(name, relativeTo, options);
        const { linkLocalRefusingFetch, LinkLocalRefusal } = await import('../io/node-fetch.js');
        guarded ??= nodeResolver({ ...http, fetch: linkLocalRefusingFetch() });
        try {
          return await guarded.open(name, relativeTo, options);
        } catch (error) {
          if (error instanceof LinkLocalRefusal) refuse(`connects to ${error.message.replace(/^[^ ]*: /, '').replace(/: refused$/, '')}`);
          throw error;
        }
      }
      const full = combinePath(relativeTo.name, name);
      const real = await realpath(full).catch(() => resolve(full));
      const inside = real.startsWith(policy.directory.endsWith(sep) ? policy.directory : policy.directory + sep);
      if (!inside && !(purpose === 'backing file' && policy.named.has(real))) {
        refuse(`resolves to ${real}, outside the overlay's directory ${policy.directory}${purpose === 'backing file' ? ', and is not the --base given' : ''}`);
      }
      return named.open(name, relativeTo, options);
    },
  };
}

function isUrlName(name: string): boolean {
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(name);
}

function resolveUrl(name: string, relativeTo: string): string | undefined {
  try {
    return new URL(name, isUrlName(relativeTo) ? relativeTo : undefined).href;
  } catch {
    return undefined;
  }
}

function httpOf(device: BlockDevice): HttpStore | undefined {
  for (let layer: BlockDevice | undefined = device; layer; layer = backingOf(layer)) {
    const store = (layer as { store?: ByteStore }).store;
    if (store instanceof HttpStore) return store;
  }
  return undefined;
}

export async function openBootDisk(options: BootDiskOptions): Promise<BootDisk> {
  // The overlay's write lock, taken before the file is created or opened, is held until the device is closed.
  const lock = options.overlay !== undefined ? await lockOutput(options.overlay) : undefined;
  try {
    const disk = await openUnlocked(options);
    releasedOnClose(disk.device, lock);
    return disk;
  } catch (error) {
    await lock?.release();
    throw error;
  }
}

async function openUnlocked(options: BootDiskOptions): Promise<BootDisk> {
  const base = options.base ?? DEFAULT_BASE;
  const http: HttpStoreOptions = { ...BOOT_HTTP_OPTIONS, ...options.http };
  const password = options.password;
  const openOptions = { readOnly: false, codecs: nodeCodecs(), format: 'qcow2' as const, forceBackingChange: options.forceBaseChange === true, crypto: nodeCrypto(), passwords: () => password };
  const policyFor = async (anchor: string) =>
    options.trustImage ? nodeResolver(http) : trustingResolver(await trustPolicy(anchor, options.base !== undefined ? [options.base, DEFAULT_BASE] : [DEFAULT_BASE]), http);

  if (options.overlay && existsSync(options.overlay)) {
    const resolver = await policyFor(options.overlay);
    const device = await openImage(await FileStore.open(options.overlay, { readOnly: false }), { ...openOptions, resolver }).catch((error: unknown) => {
      // The engine says "reopen with force"; a person at the command line needs the flag's name.
      if (error instanceof BackingChainError && /has changed since this overlay was made/.test(error.message)) {
        throw new BackingChainError('', `${error.message.replace(/; reopen with force to use it anyway$/, '')}; boot with --force-base-change to use it anyway`);
      }
      throw error;
    });
    const backing = backingOf(device);
    if (options.base && backing && fullNameOf(backing) !== backingName(options.base) && fullNameOf(backing) !== options.base) {
      console.error(`qcow86 boot: note: ${options.overlay} is backed by ${fullNameOf(backing)}, not ${options.base}; using its own backing file`);
    }
    return { device, description: `overlay ${options.overlay} on ${backing ? fullNameOf(backing) : '(no backing file)'}`, http: httpOf(device) };
  }

  // Checked only here: an existing overlay opens on its own backing file, so the default guest need not exist.
  if (!isHttpUrl(base) && !existsSync(base)) {
    throw new FormatError(base, options.base ? 'base image not found' : 'default guest not built: run `npm run images`');
  }
  const inner = await policyFor(options.overlay ?? (isHttpUrl(base) ? '.' : base));
  const opened = await openBase(base, http, inner, password);
  const name = backingName(base);
  const encryption = password ? { password, crypto: nodeCrypto() } : undefined;
  const spec = { size: opened.size, backingFile: name, backingFormat: opened.format, backingValidator: opened.store.validator, encryption };
  const resolver = reusing(opened, name, inner);
  try {
    let store: ByteStore;
    let description: string;
    if (options.overlay) {
      store = await FileStore.open(options.overlay, { readOnly: false, create: true });
      description = `overlay ${options.overlay} (created) on ${name}`;
    } else {
      store = new MemoryStore('memory-overlay.qcow2');
      description = `a throw-away overlay in memory on ${name}`;
    }
    await createQcow2(store, spec);
    const device = await openImage(store, { ...openOptions, resolver });
    return { device, description, http: httpOf(device) };
  } catch (error) {
    await opened.store.close().catch(() => {});
    throw error;
  }
}

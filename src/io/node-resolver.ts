/**
 * Backing and data file names resolved as QEMU resolves them (Node). The HTTP store is loaded only when a name
 * is a URL: local images, the common case, never pay for loading it.
 */
import { realpath } from 'node:fs/promises';
import { isAbsolute, resolve } from 'node:path';
import type { ByteStore, ResolveOptions, StoreResolver } from '../qcow2/store.js';
import { FileStore } from './file.js';
import type { HttpStoreOptions } from './http.js';

function isUrl(name: string): boolean {
  return /^[a-z][a-z0-9+.-]*:\/\//i.test(name);
}

/**
 * Resolves backing and data file names as QEMU does: for files, relative names are relative to the directory of
 * the image that names them (not to the working directory); URLs, and names inside an image reached by URL, go
 * through the HTTP Range store.
 */
export function nodeResolver(http: HttpStoreOptions = {}): StoreResolver {
  let urls: StoreResolver | undefined;
  return {
    async open(name: string, relativeTo: ByteStore, options: ResolveOptions) {
      if (isUrl(name) || isUrl(relativeTo.name)) {
        urls ??= (await import('./http.js')).httpResolver(http);
        return urls.open(name, relativeTo, options);
      }
      const fullName = combinePath(relativeTo.name, name);
      // A name an image records was chosen by whoever wrote the image: a FIFO or device there is refused unopened.
      const store = await FileStore.open(fullName, { readOnly: options.readOnly, regularFile: options.purpose ?? 'named file' });
      return { store, fullName, identity: await realpath(fullName).catch(() => resolve(fullName)) };
    },
  };
}

/** QEMU's rule: a relative backing name is joined to the naming image's directory as written, unnormalised. */
export function combinePath(imageName: string, name: string): string {
  if (isAbsolute(name)) return name;
  const slash = imageName.lastIndexOf('/');
  return slash < 0 ? name : imageName.slice(0, slash + 1) + name;
}

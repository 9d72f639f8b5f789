/**
 * A new qcow2 image file as `qemu-img create` and `convert -O qcow2` make it: the file (and the external data file
 * its options name, relative to it) locked for writing, opened, truncated, and given an empty image.
 */
import { FileStore, combinePath } from '../io/node.js';
import { withOutputLocks } from '../io/lock.js';
import { createQcow2, type CreateOptions } from '../qcow2/create.js';

/**
 * Creates the image `file` with `options`, then runs `fill` (convert's copy) still holding the locks of the image
 * and its data file, so no other writer sees the new image before it is complete.
 */
export async function withNewQcow2<T>(file: string, options: Omit<CreateOptions, 'dataStore'>, fill: () => Promise<T>): Promise<T> {
  const dataPath = options.dataFile !== undefined ? combinePath(file, options.dataFile) : undefined;
  return withOutputLocks(dataPath !== undefined ? [file, dataPath] : [file], async () => {
    const store = await FileStore.open(file, { readOnly: false, create: true });
    let dataStore: FileStore | undefined;
    try {
      if (dataPath !== undefined) dataStore = await FileStore.open(dataPath, { readOnly: false, create: true });
      await createQcow2(store, { ...options, ...(dataStore ? { dataStore } : {}) });
    } finally {
      await store.close();
      await dataStore?.close();
    }
    return fill();
  });
}

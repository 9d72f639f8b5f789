/**
 * A store that stops taking writes after its first failed write, truncate or flush, until it is reopened.
 *
 * After a failed write the engine cannot know what reached the file (a part of it, or nothing), and after a
 * failed flush the kernel may have dropped the very pages it was asked to make durable while reporting them
 * written before: building more metadata on top of either would turn a crash-safe image (its on-disk tables
 * are written in an order where an interrupted write-back only leaks clusters) into a corrupt one. QEMU stops
 * the same way. Reads go on: they see what was acknowledged.
 */
import type { ByteStore } from './store.js';
import { StoreError } from './errors.js';

/** Thrown by every write, truncate or flush after the first failure; `first` is what failed then. */
export class WriteFailedError extends StoreError {
  constructor(file: string, readonly first: unknown) {
    super(file, `an earlier write to this image failed (${(first as Error)?.message ?? String(first)}); it takes no further writes until it is reopened`, { cause: first });
  }
}

export interface FailStopStore extends ByteStore {
  /** The first failure, once there was one. */
  readonly failure: unknown;
}

export function failStop(store: ByteStore): FailStopStore {
  let failure: unknown;
  const guarded = async <T>(operation: () => Promise<T>): Promise<T> => {
    if (failure !== undefined) throw new WriteFailedError(store.name, failure);
    try {
      return await operation();
    } catch (error) {
      failure ??= error;
      throw error;
    }
  };
  const view: FailStopStore = {
    name: store.name,
    readOnly: store.readOnly,
    validator: store.validator,
    legacyValidators: store.legacyValidators,
    get failure() {
      return failure;
    },
    size: () => store.size(),
    read: (offset, length) => store.read(offset, length),
    write: (offset, data) => guarded(() => store.write(offset, data)),
    truncate: (size) => guarded(() => store.truncate(size)),
    flush: () => guarded(() => store.flush()),
    close: () => store.close(),
  };
  if (store.readInto) view.readInto = store.readInto.bind(store);
  if (store.readIntoSync) view.readIntoSync = store.readIntoSync.bind(store);
  return view;
}

/** Browser and Worker entry point for stores: memory, HTTP Range and the Origin Private File System. */
export { MemoryStore } from './memory.js';
export { HttpStore, httpResolver, isHttpUrl, type HttpStoreOptions, type HttpStats } from './http.js';
export { OpfsStore, BlobStore, QuotaError, opfsDirectory, opfsExists, opfsRemove, opfsPersistentBlocks } from './opfs.js';
export { PersistentBlocks, type SyncFile, type BlockVersion } from './persistent-blocks.js';

/** Browser and Worker entry point for stores (memory, HTTP Range, the Origin Private File System) and cryptography. */
export { MemoryStore } from './memory.js';
export { HttpStore, httpResolver, isHttpUrl, type HttpStoreOptions, type HttpStats } from './http.js';
export { OpfsStore, BlobStore, QuotaError, opfsDirectory, opfsExists, opfsRemove, opfsPersistentBlocks } from './opfs.js';
export { PersistentBlocks, type SyncFile, type BlockVersion } from './persistent-blocks.js';
export { webCrypto } from './web-crypto.js';

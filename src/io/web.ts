/** Browser and Worker entry point for stores: memory, HTTP Range and the Origin Private File System. */
export { MemoryStore } from './memory.js';
export { HttpStore, httpResolver, isHttpUrl, type HttpStoreOptions, type HttpStats } from './http.js';
export { OpfsStore, BlobStore, QuotaError, opfsDirectory, opfsExists, opfsRemove } from './opfs.js';

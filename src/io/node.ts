/** Node entry point for stores: local files and http(s) URLs, plus native codecs and cryptography. */
export { FileStore } from './file.js';
export { MemoryStore } from './memory.js';
export { nodeCodecs } from './node-codecs.js';
export { HttpStore, httpResolver, isHttpUrl } from './http.js';
export { nodeResolver, combinePath } from './node-resolver.js';
export { nodeCrypto } from './node-crypto.js';

/** Node entry point for stores: local files and http(s) URLs, plus native codecs. */
export { FileStore } from './file.js';
export { MemoryStore } from './memory.js';
export { nodeCodecs } from './node-codecs.js';
export { HttpStore, httpResolver, isHttpUrl } from './http.js';
export { nodeResolver, combinePath } from './node-resolver.js';

/**
 * Everything the write side of a qcow2 image needs, in one module that image.ts loads on the first write (or
 * repair): reading an image (convert, map, info, a read-only boot) never loads the allocator, refcounts,
 * snapshot and repair code, which is most of the engine by size.
 */
export { WriteEngine } from './write-path.js';
export { writeCompressed, placeCompressed, checkCompressible } from './compressed-write.js';
export { discard, writeZeroes } from './zero-discard.js';
export { applySnapshot, createSnapshot, deleteSnapshot } from './snapshot-ops.js';
export { growDisk } from './l1-table.js';
export { repairDirtyImage } from './repair.js';

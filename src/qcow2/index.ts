/** The qcow86 engine: pure TypeScript, no platform imports. Byte stores come from the caller (see src/io/). */
export type { ByteStore, NamedFilePurpose, ResolveOptions, StoreResolver } from './store.js';
export type { BlockDevice } from './device.js';
export * from './errors.js';
export { openImage, probeFormat, backingOf, fullNameOf, type OpenOptions, type ImageFormat } from './open.js';
export { Qcow2Image, DEFAULT_L2_CACHE_BYTES } from './image.js';
export { RawImage } from './raw.js';
export { QcowV1Image } from './qcow1.js';
export type { Qcow2Header } from './header.js';
export type { Snapshot } from './snapshots.js';
export type { Extent } from './mapping.js';
export { portableCodecs, type Codecs, type CompressionType } from './compression.js';
export type { CryptoProvider, AesKey, CipherSpec, DataCipher, HashAlgorithm } from './crypto.js';
// Write side: creation, checking/repair, snapshots (methods on Qcow2Image), compressed clusters.
export { createQcow2, type CreateOptions, type NewEncryption } from './create.js';
export { checkImage, checkResultJson, type CheckResult, type RepairMode } from './check.js';
export { vmStateOffset, type SnapshotOptions } from './snapshot-ops.js';
export type { ZeroOptions } from './write-path.js';

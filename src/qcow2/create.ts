/**
 * Creating qcow2 images with the layout `qemu-img create` produces: header in cluster 0, a one-cluster refcount
 * table in cluster 1, the first refcount block in cluster 2, the L1 table allocated first-fit after them (written
 * only as far as its entries, so file sizes match), then metadata preallocation when asked for, then the LUKS
 * area of an encrypted image (whole clusters, zeros where the LUKS header and key material do not reach).
 */
import type { ByteStore } from './store.js';
import { FormatError } from './errors.js';
import { putU64 } from './bytes.js';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_EXTL2,
  MAX_L1_BYTES,
  MAX_OFFSET,
  QEMU_FEATURE_NAMES,
  encodeHeader,
  requiredL1Size,
  setBackingValidator,
  type Qcow2Header,
} from './header.js';
import { Refcounts } from './refcount.js';
import { SUBCLUSTERS } from './mapping.js';
import type { CipherSpec, CryptoProvider, HashAlgorithm } from './crypto.js';
import { DEFAULT_ITER_TIME_MS, newLuksArea } from './luks.js';

/** LUKS encryption for a new image, with QEMU's defaults: aes-256-xts-plain64, sha256, 2000 ms. */
export interface NewEncryption {
  password: Uint8Array;
  crypto: CryptoProvider;
  cipher?: CipherSpec;
  hash?: HashAlgorithm;
  iterTimeMs?: number;
  /** An ivgen hash was asked for: it goes into the mode string even for plain/plain64 (QEMU does the same). */
  nameIvgenHash?: boolean;
}

export const DEFAULT_CIPHER: CipherSpec = { aesKeyBytes: 32, mode: 'xts', ivgen: 'plain64' };

export interface CreateOptions {
  /** Virtual disk size in bytes. */
  size: number;
  /** '1.1' (version 3, the default) or '0.10' (version 2). */
  compat?: '0.10' | '1.1';
  clusterSize?: number;
  refcountBits?: number;
  extendedL2?: boolean;
  lazyRefcounts?: boolean;
  compressionType?: 'deflate' | 'zlib' | 'zstd';
  preallocation?: 'off' | 'metadata';
  /** Backing file name as it is to be written into the header. */
  backingFile?: string;
  backingFormat?: string;
  /**
   * The backing file's version (an HTTP base's ETag, or Last-Modified + size), kept in qcow86's 'q86v' header
   * extension so reopening on a changed base is refused; QEMU preserves unknown extensions and ignores them.
   */
  backingValidator?: string | undefined;
  /** External data file name as written into the header; pass its store as dataStore. */
  dataFile?: string;
  dataStore?: ByteStore;
  dataFileRaw?: boolean;
  /** Encrypt the image with LUKS. */
  encryption?: NewEncryption | undefined;
}


/** Writes a new, empty qcow2 image into `store` (which should be empty). */
export async function createQcow2(store: ByteStore, options: CreateOptions): Promise<void> {
  // qemu-img rounds the size up to whole 512-byte sectors.
  const size = Math.ceil(options.size / 512) * 512;
  const clusterSize = options.clusterSize ?? 65536;
  const clusterBits = Math.log2(clusterSize);
  const version = options.compat === '0.10' ? 2 : 3;
  const refcountBits = options.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  const extendedL2 = options.extendedL2 ?? false;
  const zstd = options.compressionType === 'zstd';
  const bad = (message: string, field: string): never => {
    throw new FormatError(store.name, message, { field });
  };
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) bad(`cluster size ${clusterSize} must be a power of two between 512 and 2M`, 'cluster_size');
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) bad(`refcount_bits ${refcountBits} must be a power of two between 1 and 64`, 'refcount_bits');
  if (!(size >= 0) || size >= MAX_OFFSET || !Number.isInteger(options.size)) bad(`invalid image size ${options.size}`, 'size');
  if (version === 2) {
    if (refcountBits !== 16) bad('different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)', 'refcount_bits');
    if (options.lazyRefcounts) bad('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)', 'lazy_refcounts');
    if (extendedL2) bad('Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)', 'extended_l2');
    if (zstd) bad('Compression type selection is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)', 'compression_type');
    if (options.dataFile !== undefined) bad('data-file is only supported with compatibility level 1.1 and above', 'data_file');
  }
  if (extendedL2 && clusterBits < 14) bad('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes', 'extended_l2');
  if (options.dataFileRaw && options.dataFile === undefined) bad('data_file_raw requires data_file', 'data_file_raw');
  if (options.backingFile !== undefined && options.dataFileRaw) bad('Backing file and data_file_raw cannot be used together', 'backing_file');

  let incompatible = 0n;
  if (zstd) incompatible |= INCOMPAT_COMPRESSION;
  if (extendedL2) incompatible |= INCOMPAT_EXTL2;
  if (options.dataFile !== undefined) incompatible |= INCOMPAT_DATA_FILE;
  const header: Qcow2Header = {
    version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits,
    size: 0,
    cryptMethod: 0,
    l1Size: 0,
    l1TableOffset: 0,
    refcountTableOffset: clusterSize,
    refcountTableClusters: 1,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: incompatible,
    compatibleFeatures: options.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: options.dataFileRaw ? AUTOCLEAR_DATA_FILE_RAW : 0n,
    refcountOrder,
    headerLength: 0,
    compressionType: zstd ? 1 : 0,
    unknownHeaderBytes: new Uint8Array(0),
    backingFile: options.backingFile,
    backingFormat: options.backingFile !== undefined ? options.backingFormat : undefined,
    dataFile: options.dataFile,
    featureNames: version === 3 ? QEMU_FEATURE_NAMES : [],
    bitmaps: undefined,
    fde: undefined,
    unknownExtensions: [],
  };
  if (options.backingFile !== undefined) setBackingValidator(header, options.backingValidator);

  // Cluster 0 header, cluster 1 refcount table naming cluster 2 as its first block; clusters 0..2 counted.
  await store.truncate(0);
  await store.write(0, encodeHeader(header));
  const table = new Uint8Array(clusterSize);
  putU64(table, 0, 2 * clusterSize);
  await store.write(clusterSize, table);
  await store.write(2 * clusterSize, new Uint8Array(clusterSize));
  const refcounts = new Refcounts(store, header, [2 * clusterSize, ...new Array<number>(clusterSize / 8 - 1).fill(0)], {
    writeHeader: async () => void (await store.write(0, encodeHeader(header))),
  });
  await refcounts.allocate(3);

  // Growing from size 0 to the requested size, as qemu-img does: allocate the L1 table, then preallocate.
  const l1Size = requiredL1Size(size, clusterBits, extendedL2);
  if (l1Size * 8 > MAX_L1_BYTES) bad(`The image size is too large for file format 'qcow2' (try using a larger cluster size): its L1 table would exceed 32 MiB`, 'size');
  const l1 = new Uint8Array(l1Size * 8);
  if (l1Size > 0) {
    header.l1TableOffset = await refcounts.allocate(Math.ceil((l1Size * 8) / clusterSize));
  }
  header.l1Size = l1Size;
  header.size = size;

  const prealloc = options.preallocation === 'metadata' || options.dataFileRaw === true;
  let preallocatedEnd = 0;
  if (prealloc && size > 0) {
    const entryBytes = extendedL2 ? 16 : 8;
    const l2Entries = clusterSize / entryBytes;
    const clusters = Math.ceil(size / clusterSize);
    const external = options.dataFile !== undefined;
    for (let l1Index = 0; l1Index < l1Size; l1Index++) {
      const first = l1Index * l2Entries;
      const count = Math.min(l2Entries, clusters - first);
      const l2Offset = await refcounts.allocate(1);
      // Guest offset == host offset in an external data file; otherwise one contiguous run per L2 table.
      const dataOffset = external ? first * clusterSize : await refcounts.allocate(count);
      // QEMU extends the file over the last cluster only as far as the guest's last allocation unit (the whole
      // cluster, or with extended L2 the subcluster holding the disk's last byte).
      const unit = extendedL2 ? clusterSize / SUBCLUSTERS : clusterSize;
      const tail = size - (first + count - 1) * clusterSize;
      preallocatedEnd = dataOffset + (count - 1) * clusterSize + Math.ceil(tail / unit) * unit;
      const l2 = new Uint8Array(clusterSize);
      for (let i = 0; i < count; i++) {
        // With extended L2 the subcluster bitmap stays 0, as QEMU leaves it for preallocated clusters: the host
        // cluster is reserved but its subclusters read as unallocated until written.
        putU64(l2, i * entryBytes, BigInt(dataOffset + i * clusterSize) | (1n << 63n));
      }
      await store.write(l2Offset, l2);
      putU64(l1, l1Index * 8, BigInt(l2Offset) | (1n << 63n));
    }
  }
  let luksArea: { offset: number; bytes: Uint8Array } | undefined;
  if (options.encryption) {
    const e = options.encryption;
    const { area } = await newLuksArea(e.crypto, { spec: e.cipher ?? DEFAULT_CIPHER, hash: e.hash ?? 'sha256', password: e.password, iterTimeMs: e.iterTimeMs ?? DEFAULT_ITER_TIME_MS, nameIvgenHash: e.nameIvgenHash === true });
    const clusters = Math.ceil(area.length / clusterSize);
    const bytes = new Uint8Array(clusters * clusterSize);
    bytes.set(area);
    luksArea = { offset: await refcounts.allocate(clusters), bytes };
    header.cryptMethod = 2;
    header.fde = { offset: luksArea.offset, length: area.length };
  }
  await refcounts.writeBack();
  if (l1Size > 0) await store.write(header.l1TableOffset, l1);
  if (luksArea) await store.write(luksArea.offset, luksArea.bytes);
  if (prealloc && options.dataFile === undefined && size > 0) {
    // Preallocated data clusters are holes at the end of the file: extend it to cover them.
    if ((await store.size()) < preallocatedEnd) await store.truncate(preallocatedEnd);
  }
  if (options.dataStore) {
    if ((await options.dataStore.size()) < size) await options.dataStore.truncate(size);
  }
  await store.write(0, encodeHeader(header));
  await store.flush();
  if (options.dataStore) await options.dataStore.flush();
}

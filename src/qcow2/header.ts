/**
 * The qcow2 header and its extensions: decoding with every field checked against the file and QEMU's limits,
 * and encoding back (unknown header bytes and unknown extensions are carried through unchanged).
 */
import { FormatError, UnsupportedError } from './errors.js';
import { decodeText, encodeText, hex, putU32, putU64, u32, u64, u64big } from './bytes.js';
import { parseBitmapsExtension } from './bitmaps.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const V2_HEADER_LENGTH = 72;
export const V3_HEADER_LENGTH = 104;
/** The v3 header as QEMU writes it: 104 bytes + compression_type + 7 bytes padding. */
export const V3_HEADER_LENGTH_WITH_COMPRESSION = 112;

/** QEMU's sanity limits (block/qcow2.h). */
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MAX_BACKING_NAME = 1023;
/** Guest and host offsets travel as JS numbers; anything at or past 2^53 is refused on open. */
export const MAX_OFFSET = 2 ** 53;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const KNOWN_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
export const KNOWN_AUTOCLEAR = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW;

export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_NAMES = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_FDE = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;
/**
 * qcow86's own extension: the validator (ETag or Last-Modified + size) of the backing file this overlay was made
 * on. QEMU keeps unknown extensions when it rewrites a header, and the backing name itself stays a plain URL so
 * QEMU can still open the overlay.
 */
export const EXT_QCOW86_BACKING_VALIDATOR = 0x71383676; // 'q86v'

export type FeatureType = 'incompatible' | 'compatible' | 'autoclear';
const FEATURE_TYPES: FeatureType[] = ['incompatible', 'compatible', 'autoclear'];

export interface FeatureName {
  type: FeatureType;
  bit: number;
  name: string;
}

/** The names QEMU 7.2 writes into its feature-name table, in its order. */
export const QEMU_FEATURE_NAMES: FeatureName[] = [
  { type: 'incompatible', bit: 0, name: 'dirty bit' },
  { type: 'incompatible', bit: 1, name: 'corrupt bit' },
  { type: 'incompatible', bit: 2, name: 'external data file' },
  { type: 'incompatible', bit: 3, name: 'compression type' },
  { type: 'incompatible', bit: 4, name: 'extended L2 entries' },
  { type: 'compatible', bit: 0, name: 'lazy refcounts' },
  { type: 'autoclear', bit: 0, name: 'bitmaps' },
  { type: 'autoclear', bit: 1, name: 'raw external data' },
];

import type { BitmapsExtension } from './bitmaps.js';
export type { BitmapsExtension };

export interface RawExtension {
  type: number;
  data: Uint8Array;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  /** 0 deflate, 1 zstd. */
  compressionType: number;
  /** Header bytes past the fields we know (up to header_length), preserved on rewrite. */
  unknownHeaderBytes: Uint8Array;
  backingFile: string | undefined;
  backingFormat: string | undefined;
  dataFile: string | undefined;
  featureNames: FeatureName[];
  bitmaps: BitmapsExtension | undefined;
  fde: { offset: number; length: number } | undefined;
  /** Extensions this engine does not interpret, in file order, written back unchanged. */
  unknownExtensions: RawExtension[];
}

export function clusterSizeOf(header: Pick<Qcow2Header, 'clusterBits'>): number {
  return 2 ** header.clusterBits;
}

export function hasExtendedL2(header: Qcow2Header): boolean {
  return (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
}

/** Bytes a guest cluster maps through: 8 per L2 entry, 16 with extended L2. */
export function l2EntryBytes(header: Qcow2Header): number {
  return hasExtendedL2(header) ? 16 : 8;
}

/** The L1 size QEMU requires to cover `size` bytes of guest disk. */
export function requiredL1Size(size: number, clusterBits: number, extendedL2: boolean): number {
  const l2Entries = 2 ** clusterBits / (extendedL2 ? 16 : 8);
  return Math.ceil(size / (2 ** clusterBits * l2Entries));
}

/** A person-readable name for a feature bit, from the image's own table first, then QEMU's. */
export function featureName(header: Pick<Qcow2Header, 'featureNames'>, type: FeatureType, bit: number): string {
  const own = header.featureNames.find((f) => f.type === type && f.bit === bit);
  const known = QEMU_FEATURE_NAMES.find((f) => f.type === type && f.bit === bit);
  return own?.name || known?.name || `unknown ${type} feature bit ${bit}`;
}

function setBits(mask: bigint): number[] {
  const bits: number[] = [];
  for (let bit = 0; bit < 64; bit++) if (mask & (1n << BigInt(bit))) bits.push(bit);
  return bits;
}

/** Only the first 104 bytes decide how much of cluster 0 must be read. */
export function peekClusterBits(file: string, bytes: Uint8Array): number {
  if (bytes.length < V2_HEADER_LENGTH) {
    throw new FormatError(file, `file is too short for a qcow2 header (${bytes.length} bytes)`, { field: 'header', offset: 0 });
  }
  return u32(bytes, 20);
}

/**
 * Decodes and validates the header. `cluster0` holds the start of the file (the whole first cluster, or the whole
 * file if shorter); `fileSize` bounds every table.
 */
/** `forCheck`: read as qemu-img check opens an image (BDRV_O_CHECK), which lets a missing refcount table through to be reported. */
export function parseHeader(file: string, cluster0: Uint8Array, fileSize: number, forCheck = false): Qcow2Header {
  const fail = (message: string, field: string, offset: number, value?: bigint | number | string): never => {
    throw new FormatError(file, message, { field, offset, value });
  };
  if (cluster0.length < V2_HEADER_LENGTH) fail(`file is too short for a qcow2 header (${cluster0.length} bytes)`, 'header', 0);
  const magic = u32(cluster0, 0);
  if (magic !== QCOW2_MAGIC) fail(`not a qcow2 image: magic is ${hex(magic)}, expected ${hex(QCOW2_MAGIC)}`, 'magic', 0, magic);
  const version = u32(cluster0, 4);
  if (version !== 2 && version !== 3) {
    throw new UnsupportedError(file, 'version', `unsupported qcow2 version ${version} (field version at offset 4; supported: 2, 3)`);
  }
  const clusterBits = u32(cluster0, 20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    fail(`cluster_bits ${clusterBits} at offset 20 is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS} (cluster size must be 512 B..2 MiB)`, 'cluster_bits', 20, clusterBits);
  }
  const clusterSize = 2 ** clusterBits;

  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let headerLength = V2_HEADER_LENGTH;
  let compressionType = 0;
  if (version === 3) {
    if (cluster0.length < V3_HEADER_LENGTH) fail(`file is too short for a version 3 header (${cluster0.length} bytes)`, 'header', 0);
    incompatibleFeatures = u64big(cluster0, 72);
    compatibleFeatures = u64big(cluster0, 80);
    autoclearFeatures = u64big(cluster0, 88);
    refcountOrder = u32(cluster0, 96);
    headerLength = u32(cluster0, 100);
    if (headerLength < V3_HEADER_LENGTH) fail(`header_length ${headerLength} at offset 100 is below the version 3 minimum of ${V3_HEADER_LENGTH}`, 'header_length', 100, headerLength);
    if (headerLength > clusterSize) fail(`header_length ${headerLength} at offset 100 exceeds the cluster size ${clusterSize}`, 'header_length', 100, headerLength);
    if (headerLength > cluster0.length) fail(`header_length ${headerLength} at offset 100 runs past the end of the file`, 'header_length', 100, headerLength);
    if (headerLength > V3_HEADER_LENGTH) compressionType = cluster0[104]!;
  }
  if (refcountOrder > 6) fail(`refcount_order ${refcountOrder} at offset 96 is above 6 (refcount width must be 1..64 bits)`, 'refcount_order', 96, refcountOrder);

  const unknownIncompat = incompatibleFeatures & ~KNOWN_INCOMPAT;
  if (unknownIncompat) {
    // Name the bits from the image's own feature-name table when it has one, like QEMU does.
    const names = parseFeatureNamesOnly(file, cluster0, headerLength, u64(cluster0, 8), clusterSize);
    const described = setBits(unknownIncompat).map((bit) => featureName({ featureNames: names }, 'incompatible', bit));
    throw new UnsupportedError(file, 'incompatible_features', `unsupported qcow2 feature(s): ${described.join(', ')} (incompatible_features ${hex(incompatibleFeatures)} at offset 72)`);
  }
  if (compressionType > 1) {
    throw new UnsupportedError(file, 'compression_type', `unknown compression type ${compressionType} at offset 104 (known: 0 deflate, 1 zstd)`);
  }
  if (compressionType !== 0 && !(incompatibleFeatures & INCOMPAT_COMPRESSION)) {
    fail(`compression_type ${compressionType} at offset 104 is set but incompatible feature bit 3 (compression type) is not`, 'compression_type', 104, compressionType);
  }
  if (compressionType === 0 && incompatibleFeatures & INCOMPAT_COMPRESSION) {
    fail('incompatible feature bit 3 (compression type) is set but compression_type is deflate (0)', 'incompatible_features', 72);
  }
  if (incompatibleFeatures & INCOMPAT_EXTL2 && clusterBits < 14) {
    fail(`extended L2 entries need a cluster size of at least 16 KiB; cluster_bits is ${clusterBits}`, 'cluster_bits', 20, clusterBits);
  }
  if (autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW && !(incompatibleFeatures & INCOMPAT_DATA_FILE)) {
    fail('autoclear bit 1 (raw external data) is set without an external data file (incompatible bit 2)', 'autoclear_features', 88);
  }

  const size = u64(cluster0, 24);
  if (size >= MAX_OFFSET) throw new UnsupportedError(file, 'size', `virtual size ${u64big(cluster0, 24)} at offset 24 is too large (limit 2^53 bytes)`);
  const cryptMethod = u32(cluster0, 32);
  if (cryptMethod > 2) fail(`crypt_method ${cryptMethod} at offset 32 is not 0 (none), 1 (AES) or 2 (LUKS)`, 'crypt_method', 32, cryptMethod);

  const extendedL2 = (incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  const l1Size = u32(cluster0, 36);
  if (l1Size > MAX_L1_BYTES / 8) fail(`l1_size ${l1Size} at offset 36 exceeds QEMU's limit of ${MAX_L1_BYTES / 8} entries (32 MiB)`, 'l1_size', 36, l1Size);
  const needL1 = requiredL1Size(size, clusterBits, extendedL2);
  if (l1Size < needL1) fail(`l1_size ${l1Size} at offset 36 is too small for a virtual size of ${size} bytes (needs ${needL1})`, 'l1_size', 36, l1Size);
  const l1TableOffset = tableOffset(file, cluster0, 40, 'l1_table_offset', l1Size * 8, clusterSize, fileSize);

  const refcountTableClusters = u32(cluster0, 56);
  if (refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    fail(`refcount_table_clusters ${refcountTableClusters} at offset 56 exceeds QEMU's limit of 8 MiB for the refcount table`, 'refcount_table_clusters', 56, refcountTableClusters);
  }
  const refcountTableOffset = tableOffset(file, cluster0, 48, 'refcount_table_offset', refcountTableClusters * clusterSize, clusterSize, fileSize);
  if (refcountTableClusters === 0 && !forCheck) fail('refcount_table_clusters at offset 56 is 0: the image has no refcount table', 'refcount_table_clusters', 56, 0);

  const nbSnapshots = u32(cluster0, 60);
  if (nbSnapshots > MAX_SNAPSHOTS) fail(`nb_snapshots ${nbSnapshots} at offset 60 exceeds QEMU's limit of ${MAX_SNAPSHOTS}`, 'nb_snapshots', 60, nbSnapshots);
  // Each snapshot entry is at least 40 bytes; the exact size is checked when the table is read.
  const snapshotsOffset = tableOffset(file, cluster0, 64, 'snapshots_offset', nbSnapshots * 40, clusterSize, fileSize);

  const backingFileOffset = u64(cluster0, 8);
  const backingFileSize = u32(cluster0, 16);
  let backingFile: string | undefined;
  if (backingFileOffset !== 0) {
    if (backingFileSize > MAX_BACKING_NAME) fail(`backing_file_size ${backingFileSize} at offset 16 exceeds ${MAX_BACKING_NAME} bytes`, 'backing_file_size', 16, backingFileSize);
    if (backingFileOffset + backingFileSize > clusterSize) {
      fail(`backing file name at ${hex(backingFileOffset)} (${backingFileSize} bytes) does not lie within the first cluster`, 'backing_file_offset', 8, backingFileOffset);
    }
    if (backingFileOffset + backingFileSize > cluster0.length) fail('backing file name runs past the end of the file', 'backing_file_offset', 8, backingFileOffset);
    if (backingFileSize > 0) backingFile = decodeText(cluster0.subarray(backingFileOffset, backingFileOffset + backingFileSize));
  }

  const extensionsEnd = backingFileOffset !== 0 ? backingFileOffset : clusterSize;
  const header: Qcow2Header = {
    version,
    backingFileOffset,
    backingFileSize,
    clusterBits,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    unknownHeaderBytes: cluster0.slice(Math.min(headerLength, version === 3 ? 105 : headerLength), headerLength),
    backingFile,
    backingFormat: undefined,
    dataFile: undefined,
    featureNames: [],
    bitmaps: undefined,
    fde: undefined,
    unknownExtensions: [],
  };
  parseExtensions(file, cluster0, headerLength, extensionsEnd, header, fileSize, clusterSize);
  if (cryptMethod === 2 && !header.fde) fail('crypt_method is 2 (LUKS) but there is no full disk encryption header extension', 'crypt_method', 32, cryptMethod);
  return header;
}

function tableOffset(file: string, bytes: Uint8Array, at: number, field: string, length: number, clusterSize: number, fileSize: number): number {
  const big = u64big(bytes, at);
  if (length === 0 && big === 0n) return 0;
  if (big % BigInt(clusterSize) !== 0n) {
    throw new FormatError(file, `${field} ${hex(big)} at offset ${at} is not aligned to the cluster size (${clusterSize})`, { field, offset: at, value: big });
  }
  if (big + BigInt(length) > BigInt(fileSize)) {
    throw new FormatError(file, `${field} ${hex(big)} at offset ${at}: the table (${length} bytes) lies outside the file (${fileSize} bytes)`, { field, offset: at, value: big });
  }
  return Number(big);
}

function parseFeatureNamesOnly(file: string, bytes: Uint8Array, start: number, backingOffset: number, clusterSize: number): FeatureName[] {
  try {
    const header = { featureNames: [] } as unknown as Qcow2Header;
    parseExtensions(file, bytes, start, Math.min(backingOffset !== 0 ? backingOffset : clusterSize, clusterSize), header, Infinity, clusterSize, true);
    return header.featureNames;
  } catch {
    return [];
  }
}

function parseExtensions(
  file: string,
  bytes: Uint8Array,
  start: number,
  end: number,
  header: Qcow2Header,
  fileSize: number,
  clusterSize: number,
  namesOnly = false,
): void {
  const seen = new Set<number>();
  // Past the end of a short file the header area reads as zeros (an end marker), as QEMU reads it.
  if (bytes.length < end) {
    const padded = new Uint8Array(end);
    padded.set(bytes);
    bytes = padded;
  }
  let at = start;
  while (at < end) {
    const type = u32(bytes, at);
    const length = u32(bytes, at + 4);
    const dataStart = at + 8;
    // Judged before the type, as QEMU does: even an end marker must not claim more than the header area holds.
    if (dataStart > end || length > end - dataStart) {
      throw new FormatError(file, `header extension ${hex(type)} at offset ${at} claims ${length} bytes, past the end of the header area (${end})`, { field: 'extension length', offset: at + 4, value: length });
    }
    if (type === EXT_END) return;
    if (seen.has(type)) throw new FormatError(file, `header extension ${hex(type)} appears twice (second at offset ${at})`, { field: 'extension type', offset: at, value: type });
    seen.add(type);
    const data = bytes.subarray(dataStart, dataStart + length);
    if (type === EXT_FEATURE_NAMES) {
      header.featureNames = [];
      for (let i = 0; i + 48 <= length; i += 48) {
        const kind = FEATURE_TYPES[data[i]!];
        if (!kind) continue;
        const raw = data.subarray(i + 2, i + 48);
        const nul = raw.indexOf(0);
        header.featureNames.push({ type: kind, bit: data[i + 1]!, name: decodeText(nul >= 0 ? raw.subarray(0, nul) : raw) });
      }
    } else if (namesOnly) {
      // only the names were asked for
    } else if (type === EXT_BACKING_FORMAT) {
      if (length > 15) throw new FormatError(file, `ERROR: ext_backing_format: len=${length} too large (>=16) (backing format extension at offset ${at})`, { field: 'backing format', offset: at + 4, value: length });
      header.backingFormat = decodeText(data);
    } else if (type === EXT_DATA_FILE) {
      if (length > MAX_BACKING_NAME) throw new FormatError(file, `external data file name at offset ${at} is ${length} bytes long (limit ${MAX_BACKING_NAME})`, { field: 'data file', offset: at, value: length });
      header.dataFile = decodeText(data);
    } else if (type === EXT_BITMAPS) {
      // Without autoclear bit 0 the bitmaps may have been changed by a program that does not keep them: QEMU
      // ignores the extension then (and drops it when it rewrites the header).
      const consistent = header.version >= 3 && (header.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n;
      header.bitmaps = parseBitmapsExtension(file, data, dataStart, clusterSize, consistent);
      if (header.bitmaps && header.bitmaps.directoryOffset + header.bitmaps.directorySize > fileSize) {
        throw new FormatError(file, `bitmap directory at ${hex(header.bitmaps.directoryOffset)} (${header.bitmaps.directorySize} bytes) lies outside the file (${fileSize} bytes)`, {
          field: 'bitmap_directory_offset',
          offset: dataStart + 16,
          value: header.bitmaps.directoryOffset,
        });
      }
    } else if (type === EXT_FDE) {
      // QEMU's checks, in its order and words.
      if (header.cryptMethod !== 2) throw new FormatError(file, `CRYPTO header extension only expected with LUKS encryption method (crypt_method ${header.cryptMethod}; extension at offset ${at})`, { field: 'crypt_method', offset: 32, value: header.cryptMethod });
      if (length !== 16) throw new FormatError(file, `CRYPTO header extension size ${length}, but expected size 16 (extension at offset ${at})`, { field: 'crypto header extension length', offset: at + 4, value: length });
      const fdeOffset = u64(data, 0);
      if (fdeOffset % clusterSize !== 0) {
        throw new FormatError(file, `Encryption header offset '${fdeOffset}' is not a multiple of cluster size '${clusterSize}' (at offset ${dataStart})`, { field: 'crypto header offset', offset: dataStart, value: fdeOffset });
      }
      header.fde = { offset: fdeOffset, length: u64(data, 8) };
    } else {
      header.unknownExtensions.push({ type, data: data.slice() });
    }
    at = dataStart + Math.ceil(length / 8) * 8;
  }
}

/**
 * Encodes the header, its extensions and the backing file name into one buffer for cluster 0. Throws when they
 * do not fit in a cluster. Sets header.headerLength / backingFileOffset / backingFileSize to what was written.
 */
export function encodeHeader(header: Qcow2Header): Uint8Array {
  const clusterSize = clusterSizeOf(header);
  const parts: Uint8Array[] = [];
  const fixedLength = header.version === 2 ? V2_HEADER_LENGTH : Math.max(V3_HEADER_LENGTH_WITH_COMPRESSION, 105 + header.unknownHeaderBytes.length);
  const headerLength = header.version === 2 ? V2_HEADER_LENGTH : Math.ceil(fixedLength / 8) * 8;
  const fixed = new Uint8Array(headerLength);
  putU32(fixed, 0, QCOW2_MAGIC);
  putU32(fixed, 4, header.version);
  putU32(fixed, 20, header.clusterBits);
  putU64(fixed, 24, header.size);
  putU32(fixed, 32, header.cryptMethod);
  putU32(fixed, 36, header.l1Size);
  putU64(fixed, 40, header.l1TableOffset);
  putU64(fixed, 48, header.refcountTableOffset);
  putU32(fixed, 56, header.refcountTableClusters);
  putU32(fixed, 60, header.nbSnapshots);
  putU64(fixed, 64, header.snapshotsOffset);
  if (header.version === 3) {
    putU64(fixed, 72, header.incompatibleFeatures);
    putU64(fixed, 80, header.compatibleFeatures);
    putU64(fixed, 88, header.autoclearFeatures);
    putU32(fixed, 96, header.refcountOrder);
    putU32(fixed, 100, headerLength);
    fixed[104] = header.compressionType;
    fixed.set(header.unknownHeaderBytes, 105);
  }
  parts.push(fixed);
  const extension = (type: number, data: Uint8Array) => {
    const padded = new Uint8Array(8 + Math.ceil(data.length / 8) * 8);
    putU32(padded, 0, type);
    putU32(padded, 4, data.length);
    padded.set(data, 8);
    parts.push(padded);
  };
  if (header.backingFormat !== undefined) extension(EXT_BACKING_FORMAT, encodeText(header.backingFormat));
  if (header.dataFile !== undefined) extension(EXT_DATA_FILE, encodeText(header.dataFile));
  if (header.fde) {
    const data = new Uint8Array(16);
    putU64(data, 0, header.fde.offset);
    putU64(data, 8, header.fde.length);
    extension(EXT_FDE, data);
  }
  if (header.bitmaps) {
    const data = new Uint8Array(24);
    putU32(data, 0, header.bitmaps.count);
    putU64(data, 8, header.bitmaps.directorySize);
    putU64(data, 16, header.bitmaps.directoryOffset);
    extension(EXT_BITMAPS, data);
  }
  let featureTable = -1;
  // QEMU 7.2 writes its feature-name table into version 3 headers only when clusters are larger than 4 KiB
  // (measured with qemu-img create and amend across 512 B..2 MiB); it rewrites the table whenever it rewrites
  // the header, so an image's own table is not kept either.
  if (header.version === 3 && clusterSize > 4096) {
    const names = header.featureNames.length ? header.featureNames : QEMU_FEATURE_NAMES;
    const data = new Uint8Array(names.length * 48);
    names.forEach((feature, i) => {
      data[i * 48] = FEATURE_TYPES.indexOf(feature.type);
      data[i * 48 + 1] = feature.bit;
      data.set(encodeText(feature.name).subarray(0, 46), i * 48 + 2);
    });
    extension(EXT_FEATURE_NAMES, data);
    featureTable = parts.length - 1;
  }
  for (const unknown of header.unknownExtensions) extension(unknown.type, unknown.data);
  parts.push(new Uint8Array(8)); // end-of-extensions marker
  const backingName = header.backingFile !== undefined ? encodeText(header.backingFile) : undefined;
  if (backingName && backingName.length > MAX_BACKING_NAME) {
    throw new FormatError('', `backing file name is ${backingName.length} bytes long (limit ${MAX_BACKING_NAME})`, { field: 'backing_file_size' });
  }
  let extensionsLength = parts.reduce((sum, part) => sum + part.length, 0);
  // The feature name table only helps people read error messages: like QEMU, leave it out when the header would
  // not fit in a (512-byte) cluster with it.
  if (featureTable >= 0 && extensionsLength + (backingName?.length ?? 0) > clusterSize) {
    extensionsLength -= parts[featureTable]!.length;
    parts.splice(featureTable, 1);
  }
  const total = extensionsLength + (backingName?.length ?? 0);
  if (total > clusterSize) throw new FormatError('', `header, extensions and backing name need ${total} bytes, more than one cluster (${clusterSize})`, { field: 'header' });
  const out = new Uint8Array(total);
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  header.headerLength = headerLength;
  if (backingName && backingName.length > 0) {
    out.set(backingName, at);
    header.backingFileOffset = at;
    header.backingFileSize = backingName.length;
  } else {
    header.backingFileOffset = 0;
    header.backingFileSize = 0;
  }
  putU64(out, 8, header.backingFileOffset);
  putU32(out, 16, header.backingFileSize);
  return out;
}

export function backingValidatorOf(header: Qcow2Header): string | undefined {
  const ext = header.unknownExtensions.find((e) => e.type === EXT_QCOW86_BACKING_VALIDATOR);
  return ext ? decodeText(ext.data) : undefined;
}

export function setBackingValidator(header: Qcow2Header, validator: string | undefined): void {
  header.unknownExtensions = header.unknownExtensions.filter((e) => e.type !== EXT_QCOW86_BACKING_VALIDATOR);
  if (validator !== undefined) header.unknownExtensions.push({ type: EXT_QCOW86_BACKING_VALIDATOR, data: encodeText(validator) });
}

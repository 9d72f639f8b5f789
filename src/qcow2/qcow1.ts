/**
 * Legacy qcow (version 1) images, read-only. Facts from QEMU's block/qcow.c:
 * - 48-byte header: magic, version 1, backing_file_offset (u64), backing_file_size (u32), mtime (u32),
 *   size (u64), cluster_bits (u8, 9..16), l2_bits (u8, 6..13: L2 tables of 512 B..64 KiB), padding (u16),
 *   crypt_method (u32: 0 none, 1 AES), l1_table_offset (u64).
 * - L1 has ceil(size / 2^(cluster_bits + l2_bits)) entries; L1 and L2 entries are plain host offsets (0 means
 *   unallocated), no flag bits except in L2.
 * - L2 bit 63 marks a compressed cluster: bits 0..(62 - cluster_bits) hold the host byte offset and the next
 *   cluster_bits bits the EXACT compressed byte length (unlike qcow2, which stores sectors). Raw deflate.
 * - A normal cluster's offset must be sector-aligned; QEMU fails the read otherwise.
 * - The guest size is the header size rounded down to whole sectors (QEMU keeps it in sectors).
 * - crypt_method 1: normal clusters are AES-128-CBC encrypted (see encryption.ts), compressed ones are not.
 */
import type { BlockDevice } from './device.js';
import type { ByteStore } from './store.js';
import { readExact } from './store.js';
import { CorruptImageError, FormatError, ReadOnlyError, UnsupportedError } from './errors.js';
import { decodeText, hex, u32, u64, u64big } from './bytes.js';
import { L2Cache } from './l2-cache.js';
import { checkRange } from './raw.js';
import { decompressCluster, type Codecs } from './compression.js';
import type { CryptoProvider } from './crypto.js';
import { legacyAes, readDecrypted, type ImageEncryption } from './encryption.js';

export const QCOW_MAGIC = 0x514649fb;
export const QCOW_V1_HEADER_LENGTH = 48;
/** Same cap as qcow2's L1 table: a header cannot make us read or hold more than this. */
export const QCOW_V1_MAX_L1_BYTES = 32 * 1024 * 1024;
/** QEMU's limit: the name is read into a 1024-byte buffer with its terminating NUL. */
export const QCOW_V1_MAX_BACKING_NAME = 1023;
/** L2 tables kept in memory (64 KiB at most each, so at most 4 MiB). */
const L2_CACHE_TABLES = 64;

export interface QcowV1Header {
  backingFileOffset: number;
  backingFileSize: number;
  mtime: number;
  /** Size as recorded (bytes); the guest sees it rounded down to a multiple of 512. */
  size: number;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1TableOffset: number;
  l1Size: number;
}

/** Where one guest cluster lives: a pure value the image acts on (and `map`-style tools can report). */
export type QcowV1Mapping =
  | { kind: 'unallocated' }
  | { kind: 'data'; hostOffset: number }
  | { kind: 'compressed'; hostOffset: number; compressedLength: number };

/** Parses and validates the fixed header against the file size; every failure names the field and value. */
export function parseQcowV1Header(file: string, bytes: Uint8Array, fileSize: number): QcowV1Header {
  const fail = (message: string, field: string, offset: number, value?: bigint | number): never => {
    throw new FormatError(file, message, { field, offset, ...(value !== undefined ? { value } : {}) });
  };
  if (bytes.length < QCOW_V1_HEADER_LENGTH) fail(`file is too short for a qcow header (${bytes.length} bytes)`, 'header', 0);
  if (u32(bytes, 0) !== QCOW_MAGIC) fail(`bad magic ${hex(u32(bytes, 0))} (expected QFI\\xfb)`, 'magic', 0, u32(bytes, 0));
  const version = u32(bytes, 4);
  if (version !== 1) throw new UnsupportedError(file, 'version', `qcow version ${version} is not version 1`);

  const sizeBig = u64big(bytes, 24);
  if (sizeBig <= 1n) fail(`image size ${sizeBig} is too small (must be at least 2 bytes)`, 'size', 24, sizeBig);
  if (sizeBig > BigInt(Number.MAX_SAFE_INTEGER)) fail(`image size ${sizeBig} is too large (limit 2^53 - 1 bytes)`, 'size', 24, sizeBig);
  const size = Number(sizeBig);

  const clusterBits = bytes[32]!;
  if (clusterBits < 9 || clusterBits > 16) fail(`cluster_bits ${clusterBits} out of range (cluster size must be between 512 and 64k)`, 'cluster_bits', 32, clusterBits);
  const l2Bits = bytes[33]!;
  if (l2Bits < 6 || l2Bits > 13) fail(`l2_bits ${l2Bits} out of range (L2 table size must be between 512 and 64k)`, 'l2_bits', 33, l2Bits);

  const cryptMethod = u32(bytes, 36);
  if (cryptMethod > 1) fail(`invalid encryption method ${cryptMethod}`, 'crypt_method', 36, cryptMethod);

  const l1Span = 2 ** (clusterBits + l2Bits);
  const l1Size = Math.ceil(size / l1Span);
  if (l1Size * 8 > QCOW_V1_MAX_L1_BYTES) {
    fail(`image size ${size} needs an L1 table of ${l1Size * 8} bytes (limit ${QCOW_V1_MAX_L1_BYTES})`, 'size', 24, size);
  }
  const l1Big = u64big(bytes, 40);
  if (l1Big + BigInt(l1Size * 8) > BigInt(fileSize)) {
    fail(`L1 table at ${hex(l1Big)} (${l1Size} entries) lies outside the file (${fileSize} bytes)`, 'l1_table_offset', 40, l1Big);
  }
  const l1TableOffset = Number(l1Big);

  const backingBig = u64big(bytes, 8);
  const backingFileSize = u32(bytes, 16);
  if (backingBig !== 0n) {
    if (backingFileSize > QCOW_V1_MAX_BACKING_NAME) {
      fail(`backing file name is too long (${backingFileSize} bytes, limit ${QCOW_V1_MAX_BACKING_NAME})`, 'backing_file_size', 16, backingFileSize);
    }
    if (backingBig + BigInt(backingFileSize) > BigInt(fileSize)) {
      fail(`backing file name at ${hex(backingBig)} (${backingFileSize} bytes) lies outside the file`, 'backing_file_offset', 8, backingBig);
    }
  }
  return {
    backingFileOffset: Number(backingBig),
    backingFileSize,
    mtime: u32(bytes, 20),
    size,
    clusterBits,
    l2Bits,
    cryptMethod,
    l1TableOffset,
    l1Size,
  };
}

/** Decodes an L2 entry (given as its two 32-bit halves) into a mapping. */
export function decodeQcowV1Entry(hi: number, lo: number, clusterBits: number): QcowV1Mapping {
  if (hi === 0 && lo === 0) return { kind: 'unallocated' };
  if (hi & 0x80000000) {
    // Offset: the low 63 - cluster_bits bits (at least 47, so the high word contributes 15..22 bits).
    const offsetBits = 63 - clusterBits;
    const hostOffset = (hi & (2 ** (offsetBits - 32) - 1)) * 2 ** 32 + lo;
    const compressedLength = Math.floor((hi & 0x7fffffff) / 2 ** (offsetBits - 32)) & (2 ** clusterBits - 1);
    return { kind: 'compressed', hostOffset, compressedLength };
  }
  return { kind: 'data', hostOffset: hi * 2 ** 32 + lo };
}

export class QcowV1Image implements BlockDevice {
  readonly format = 'qcow' as const;
  readonly readOnly = true;
  readonly clusterSize: number;
  readonly virtualSize: number;
  private readonly l2Cache = new L2Cache(L2_CACHE_TABLES);
  private lastCompressed: { hostOffset: number; data: Uint8Array } | undefined;

  private constructor(
    readonly store: ByteStore,
    readonly header: QcowV1Header,
    private readonly l1Table: Uint8Array,
    private readonly fileSize: number,
    /** The name recorded in the header, as written (resolve it relative to this image's location). */
    readonly backingName: string | undefined,
    readonly backing: BlockDevice | undefined,
    readonly codecs: Codecs,
    /** Set when the image is encrypted and was opened with its password. */
    readonly encryption: ImageEncryption | undefined,
  ) {
    this.clusterSize = 2 ** header.clusterBits;
    this.virtualSize = Math.floor(header.size / 512) * 512;
  }

  get name(): string {
    return this.store.name;
  }

  /**
   * Opens the image. An encrypted one needs `password` (and `crypto`) unless `metadataOnly` (info): then its data
   * stays unreadable.
   */
  static async open(store: ByteStore, options: { backing?: BlockDevice | undefined; codecs: Codecs; crypto?: CryptoProvider | undefined; password?: Uint8Array | undefined; metadataOnly?: boolean }): Promise<QcowV1Image> {
    const fileSize = await store.size();
    const header = parseQcowV1Header(store.name, await store.read(0, QCOW_V1_HEADER_LENGTH), fileSize);
    const l1Table = await readExact(store, header.l1TableOffset, header.l1Size * 8, 'L1 table');
    let backingName: string | undefined;
    if (header.backingFileOffset !== 0) {
      backingName = decodeText(await readExact(store, header.backingFileOffset, header.backingFileSize, 'backing file name'));
    }
    const encryption = header.cryptMethod === 1 && !(options.metadataOnly && options.password === undefined) ? legacyAes(store.name, options.crypto, options.password) : undefined;
    return new QcowV1Image(store, header, l1Table, fileSize, backingName, options.backing, options.codecs, encryption);
  }

  /** Where the guest cluster containing `guestOffset` lives. */
  async mapCluster(guestOffset: number): Promise<QcowV1Mapping> {
    const { clusterBits, l2Bits } = this.header;
    const l1Index = Math.floor(guestOffset / 2 ** (clusterBits + l2Bits));
    const l2Offset = u64(this.l1Table, l1Index * 8);
    if (l2Offset === 0) return { kind: 'unallocated' };
    const l2Bytes = 8 * 2 ** l2Bits;
    if (l2Offset + l2Bytes > this.fileSize) {
      throw new CorruptImageError(this.name, `L2 table offset ${hex(l2Offset)} lies outside the file (L1 index: ${l1Index})`, this.header.l1TableOffset + l1Index * 8);
    }
    const table = await this.l2Cache.get(l2Offset, (offset) => readExact(this.store, offset, l2Bytes, 'L2 table'));
    const l2Index = Math.floor(guestOffset / this.clusterSize) % 2 ** l2Bits;
    const mapping = decodeQcowV1Entry(u32(table, l2Index * 8), u32(table, l2Index * 8 + 4), clusterBits);
    if (mapping.kind === 'data' && mapping.hostOffset % 512 !== 0) {
      throw new CorruptImageError(this.name, `cluster offset ${hex(mapping.hostOffset)} is not sector-aligned (L2 table ${hex(l2Offset)}, index ${l2Index})`, l2Offset + l2Index * 8);
    }
    return mapping;
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(this, offset, length);
    const out = new Uint8Array(length);
    let done = 0;
    while (done < length) {
      const guest = offset + done;
      const inCluster = guest % this.clusterSize;
      const n = Math.min(length - done, this.clusterSize - inCluster);
      const mapping = await this.mapCluster(guest);
      if (mapping.kind === 'unallocated') {
        await this.readBacking(guest, out.subarray(done, done + n));
      } else if (mapping.kind === 'compressed') {
        const cluster = await this.readCompressed(mapping.hostOffset, mapping.compressedLength);
        out.set(cluster.subarray(inCluster, inCluster + n), done);
      } else if (this.header.cryptMethod !== 0) {
        if (!this.encryption) throw new UnsupportedError(this.name, 'encryption', 'the image is encrypted (crypt_method 1) and was opened without its key');
        // Legacy AES counts IVs from the guest offset.
        await readDecrypted(this.store, this.encryption, mapping.hostOffset + inCluster, guest, out.subarray(done, done + n));
      } else {
        // Like QEMU's file driver, bytes past the end of the file read as zeros (`out` starts zeroed).
        const at = mapping.hostOffset + inCluster;
        if (at < this.fileSize) out.set(await this.store.read(at, Math.min(n, this.fileSize - at)), done);
      }
      done += n;
    }
    return out;
  }

  private async readBacking(guest: number, into: Uint8Array): Promise<void> {
    if (!this.backing) return;
    const available = Math.min(into.length, this.backing.virtualSize - guest);
    if (available > 0) into.set(await this.backing.read(guest, available));
  }

  private async readCompressed(hostOffset: number, compressedLength: number): Promise<Uint8Array> {
    if (this.lastCompressed?.hostOffset === hostOffset) return this.lastCompressed.data;
    const raw = await this.store.read(hostOffset, compressedLength);
    if (raw.length !== compressedLength) {
      throw new CorruptImageError(this.name, `compressed cluster at ${hex(hostOffset)} (${compressedLength} bytes) lies outside the file`, hostOffset);
    }
    const data = await decompressCluster(this.name, 'deflate', raw, this.clusterSize, this.codecs, hostOffset);
    this.lastCompressed = { hostOffset, data };
    return data;
  }

  async write(_offset: number, _data: Uint8Array): Promise<void> {
    throw new ReadOnlyError(this.name, 'qcow version 1 images are read-only (convert them to qcow2 to write)');
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    await this.backing?.close();
    await this.store.close();
  }
}

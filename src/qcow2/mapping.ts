/**
 * Where guest bytes live: decoding L1/L2 entries into pure descriptions (extents). No I/O happens here; the image
 * fetches L2 tables and executes the resulting plans.
 */
import { CorruptImageError } from './errors.js';
import { hex, u32 } from './bytes.js';

const TWO_32 = 2 ** 32;
/** Bits 9..55 of an L1/L2 entry, split into the high word's low 24 bits and the low word's top 23 bits. */
const OFFSET_HI_MASK = 0x00ffffff;
const OFFSET_LO_MASK = 0xfffffe00;
const FLAG_COPIED_HI = 0x80000000;
const FLAG_COMPRESSED_HI = 0x40000000;

export const SUBCLUSTERS = 32;

/** Geometry derived from the header, everything the mapping needs. */
export interface Geometry {
  clusterBits: number;
  clusterSize: number;
  /** Entries per L2 table. */
  l2Entries: number;
  /** Bytes per L2 entry: 8, or 16 with extended L2. */
  l2EntryBytes: number;
  extendedL2: boolean;
  /** True when the image keeps its data in an external data file (L2 offset 0 with COPIED is then valid). */
  externalData: boolean;
  /** Version 2 images have no zero flag. */
  version: number;
}

export function makeGeometry(clusterBits: number, extendedL2: boolean, externalData: boolean, version: number): Geometry {
  const clusterSize = 2 ** clusterBits;
  const l2EntryBytes = extendedL2 ? 16 : 8;
  return { clusterBits, clusterSize, l2Entries: clusterSize / l2EntryBytes, l2EntryBytes, extendedL2, externalData, version };
}

export interface L1Entry {
  /** Host offset of the L2 table; 0 when unallocated. */
  l2Offset: number;
  copied: boolean;
}

export function decodeL1Entry(file: string, table: Uint8Array, index: number, geometry: Geometry): L1Entry {
  const hi = u32(table, index * 8);
  const lo = u32(table, index * 8 + 4);
  const l2Offset = (hi & OFFSET_HI_MASK) * TWO_32 + ((lo & OFFSET_LO_MASK) >>> 0);
  if (l2Offset % geometry.clusterSize !== 0) {
    throw new CorruptImageError(file, `L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${index})`, index * 8);
  }
  return { l2Offset, copied: (hi & FLAG_COPIED_HI) !== 0 };
}

/** What one guest cluster (or subcluster) is, as a value the caller acts on. */
export type ClusterMapping =
  | { kind: 'unallocated' }
  /** Reads as zero; `hostOffset` is set when a host cluster is still allocated for it (QEMU's ZERO_ALLOC). */
  | { kind: 'zero'; hostOffset: number | undefined }
  | { kind: 'data'; hostOffset: number }
  | { kind: 'compressed'; hostOffset: number; compressedLength: number };

export interface L2Entry {
  /** Raw words, for rewriting and checking. */
  hi: number;
  lo: number;
  /** Extended L2 subcluster bitmap: allocated bits (low word) and zero bits (high word). */
  allocMask: number;
  zeroMask: number;
}

export function readL2Entry(table: Uint8Array, index: number, geometry: Geometry): L2Entry {
  const at = index * geometry.l2EntryBytes;
  const hi = u32(table, at);
  const lo = u32(table, at + 4);
  if (!geometry.extendedL2) return { hi, lo, allocMask: 0, zeroMask: 0 };
  return { hi, lo, zeroMask: u32(table, at + 8), allocMask: u32(table, at + 12) };
}

export function isCompressed(entry: L2Entry): boolean {
  return (entry.hi & FLAG_COMPRESSED_HI) !== 0;
}

export function isCopied(entry: L2Entry): boolean {
  return (entry.hi & FLAG_COPIED_HI) !== 0;
}

export function standardHostOffset(entry: L2Entry): number {
  return (entry.hi & OFFSET_HI_MASK) * TWO_32 + ((entry.lo & OFFSET_LO_MASK) >>> 0);
}

/**
 * A compressed descriptor: bits 0..x-1 host byte offset, bits x..61 additional 512-byte sectors, where
 * x = 62 - (cluster_bits - 8). The stored length is sector-granular, so it may include bytes of a neighbour.
 * x is 49..61 for the valid cluster sizes (512 B..2 MiB), so the offset holds the whole low word plus the high word's
 * bottom x - 32 bits, and the sector count is the rest of the high word: plain number arithmetic, no bigint
 * (this runs once per compressed cluster read).
 */
export function decodeCompressed(entry: L2Entry, clusterBits: number): { hostOffset: number; compressedLength: number } {
  const hiOffsetBits = 62 - (clusterBits - 8) - 32;
  const hi = entry.hi & 0x3fffffff;
  const hostOffset = (hi & ((1 << hiOffsetBits) - 1)) * TWO_32 + (entry.lo >>> 0);
  const sectors = (hi >>> hiOffsetBits) + 1;
  return { hostOffset, compressedLength: sectors * 512 - (hostOffset % 512) };
}

export function encodeCompressed(hostOffset: number, compressedLength: number, clusterBits: number): bigint {
  const shift = BigInt(62 - (clusterBits - 8));
  const endSector = Math.floor((hostOffset + compressedLength - 1) / 512);
  const additional = BigInt(endSector - Math.floor(hostOffset / 512));
  return (1n << 62n) | (additional << shift) | BigInt(hostOffset);
}

/** Where an L2 entry was found, for error messages (built only when one is thrown). */
export interface EntryPlace {
  l2Offset: number;
  l2Index: number;
  guestOffset: number;
}

function describe(place: EntryPlace): string {
  return `L2 table ${hex(place.l2Offset)}, L2 index ${place.l2Index}, guest offset ${hex(place.guestOffset)}`;
}

/**
 * Classifies the whole cluster of a standard (non-extended) L2 entry, or subcluster `sub` of an extended one.
 * `place` says where the entry is, for error messages.
 */
export function classify(file: string, entry: L2Entry, geometry: Geometry, sub: number, place: EntryPlace): ClusterMapping {
  if (isCompressed(entry)) {
    if (geometry.externalData) throw new CorruptImageError(file, `compressed cluster in an image with an external data file (${describe(place)})`);
    return { kind: 'compressed', ...decodeCompressed(entry, geometry.clusterBits) };
  }
  const hostOffset = standardHostOffset(entry);
  // With an external data file, offset 0 is a real location when the entry is marked COPIED.
  const hasHost = hostOffset !== 0 || (geometry.externalData && isCopied(entry));
  if (hasHost && hostOffset % geometry.clusterSize !== 0) {
    throw new CorruptImageError(file, `cluster allocation offset ${hex(hostOffset)} unaligned (${describe(place)})`);
  }
  if (!geometry.extendedL2) {
    if (entry.lo & 1) {
      // Version 2 has no zero clusters: QEMU refuses the entry rather than guess what it means.
      if (geometry.version < 3) throw new CorruptImageError(file, `zero cluster entry in a version 2 image (${describe(place)})`);
      return { kind: 'zero', hostOffset: hasHost ? hostOffset : undefined };
    }
    return hasHost ? { kind: 'data', hostOffset } : { kind: 'unallocated' };
  }
  // As in QEMU, a bitmap that is wrong anywhere makes the whole cluster unreadable, not just the bad subclusters.
  if (hasHost && (entry.allocMask & entry.zeroMask) !== 0) {
    const both = Math.log2((entry.allocMask & entry.zeroMask & -(entry.allocMask & entry.zeroMask)) >>> 0);
    throw new CorruptImageError(file, `subcluster ${both} is marked both allocated and zero (${describe(place)})`);
  }
  if (!hasHost && entry.allocMask !== 0) {
    const first = Math.log2((entry.allocMask & -entry.allocMask) >>> 0);
    throw new CorruptImageError(file, `subcluster ${first} is allocated in a cluster with no host offset (${describe(place)})`);
  }
  const bit = 1 << sub;
  if (entry.zeroMask & bit) return { kind: 'zero', hostOffset: undefined };
  if (entry.allocMask & bit) return { kind: 'data', hostOffset: hostOffset + sub * (geometry.clusterSize / SUBCLUSTERS) };
  return { kind: 'unallocated' };
}

/** A run of guest bytes with one mapping kind; data extents are host-contiguous. */
export type Extent =
  | { guestOffset: number; length: number; kind: 'unallocated' }
  | { guestOffset: number; length: number; kind: 'zero'; hostOffset: number | undefined }
  | { guestOffset: number; length: number; kind: 'data'; hostOffset: number }
  /** A compressed cluster; `offsetInCluster` is where the extent starts inside the decompressed cluster. */
  | { guestOffset: number; length: number; kind: 'compressed'; hostOffset: number; compressedLength: number; offsetInCluster: number };

/** Appends an extent, merging it into the previous one when they continue each other. */
export function pushExtent(extents: Extent[], next: Extent): void {
  const last = extents[extents.length - 1];
  if (last && last.kind === next.kind && last.guestOffset + last.length === next.guestOffset) {
    if (last.kind === 'unallocated') {
      last.length += next.length;
      return;
    }
    if (last.kind === 'zero' && next.kind === 'zero') {
      const contiguous = last.hostOffset !== undefined && next.hostOffset !== undefined && last.hostOffset + last.length === next.hostOffset;
      if (contiguous || (last.hostOffset === undefined && next.hostOffset === undefined)) {
        last.length += next.length;
        return;
      }
    }
    if (last.kind === 'data' && next.kind === 'data' && last.hostOffset + last.length === next.hostOffset) {
      last.length += next.length;
      return;
    }
  }
  extents.push(next);
}

/**
 * Changing an existing image's format options in place, as qemu-img amend does (QEMU 7.2 qcow2_amend_options,
 * qcow2_upgrade, qcow2_downgrade, qcow2_change_refcount_order): compat 0.10 <-> 1.1, refcount_bits, the
 * external data file's recorded name and its raw flag, and lazy_refcounts.
 *
 * A downgrade to version 2 must leave nothing version 2 cannot express: zero clusters become unallocated (no
 * backing file, so they read as zeros anyway) or are written out as zeroed clusters; compatible and autoclear
 * bits and the feature-name table go; incompatible features other than a zstd type with no compressed
 * cluster make it refuse before anything is touched.
 */
import type { Qcow2Image } from './image.js';
import type { WriteEngine } from './write-path.js';
import { CorruptImageError, UnsupportedError } from './errors.js';
import { analyse } from './check.js';
import { rebuildRefcounts } from './repair.js';
import { maxRefcount } from './refcount.js';
import { encodeHeader, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, hasExtendedL2 } from './header.js';
import { readSnapshotL1 } from './snapshots.js';
import { putU64, u32 } from './bytes.js';
import { rebuildCopiedFlags, replaceSnapshotTable } from './snapshot-ops.js';
import { legacyWriteRefusal } from './encryption.js';

const TWO_32 = 2 ** 32;
const COPIED = 1n << 63n;
const COMPRESSED_HI = 0x40000000;

export interface AmendOptions {
  compat?: '0.10' | '1.1';
  lazyRefcounts?: boolean;
  /** Refcount entry width: a power of two, 1..64. */
  refcountBits?: number;
  /** The external data file's name as recorded in the header ('' removes the name); the file is not touched. */
  dataFile?: string;
  /** Clears the data file's raw flag (false); true only confirms it, as QEMU cannot set it on an existing image. */
  dataFileRaw?: boolean;
}

/** Applies the options in QEMU's order: upgrade, refcount width, lazy refcounts, downgrade. */
export async function amendQcow2(image: Qcow2Image, options: AmendOptions): Promise<void> {
  const header = image.header;
  const newVersion = options.compat === '0.10' ? 2 : options.compat === '1.1' ? 3 : header.version;
  const newOrder = options.refcountBits === undefined ? header.refcountOrder : Math.log2(options.refcountBits);
  if (!Number.isInteger(newOrder) || newOrder < 0 || newOrder > 6) {
    throw new UnsupportedError(image.name, 'refcount_bits', 'Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (newOrder !== header.refcountOrder && newVersion < 3 && newOrder !== 4) {
    throw new UnsupportedError(image.name, 'refcount_bits', 'Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  const hasDataFile = Boolean(header.incompatibleFeatures & INCOMPAT_DATA_FILE);
  if (options.dataFile !== undefined && !hasDataFile) {
    throw new UnsupportedError(image.name, 'data_file', 'data-file can only be set for images that use an external data file');
  }
  if (options.dataFileRaw && (header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) === 0n) {
    throw new UnsupportedError(image.name, 'data_file_raw', 'data-file-raw cannot be set on existing images');
  }
  if (options.lazyRefcounts && newVersion < 3) {
    throw new UnsupportedError(image.name, 'lazy_refcounts', 'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  }
  if (newVersion < header.version) checkDowngrade(image, newOrder);
  const engine = await image.writer();
  await engine.exclusive(async () => {
    await engine.begin();
    if (newVersion > header.version) await upgrade(engine);
    if (newOrder !== header.refcountOrder) await changeRefcountOrder(engine, newOrder);
    if (options.dataFile !== undefined || options.dataFileRaw === false) {
      if (options.dataFile !== undefined) header.dataFile = options.dataFile === '' ? undefined : options.dataFile;
      if (options.dataFileRaw === false) header.autoclearFeatures &= ~AUTOCLEAR_DATA_FILE_RAW;
      await engine.writeHeader();
      await engine.store.flush();
    }
    if (options.lazyRefcounts !== undefined && options.lazyRefcounts !== image.lazyRefcounts) {
      // Turning lazy refcounts off needs complete refcounts on disk first, which writeBack gives.
      await engine.writeBack();
      if (options.lazyRefcounts) header.compatibleFeatures |= COMPAT_LAZY_REFCOUNTS;
      else {
        header.compatibleFeatures &= ~COMPAT_LAZY_REFCOUNTS;
        header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
      }
      await engine.writeHeader();
      await engine.store.flush();
    }
    if (newVersion < header.version) await downgrade(engine);
  });
}

/**
 * A new refcount width: every stored refcount is carried over into new refcount blocks and a new table of that
 * width (the old ones are freed), as QEMU's qcow2_change_refcount_order does: the counts are copied, not
 * recomputed. Refused before anything is written when a count does not fit the narrower width.
 */
async function changeRefcountOrder(engine: WriteEngine, order: number): Promise<void> {
  const image = engine.image;
  // Complete refcounts on disk first (a lazy-refcounts image may hold some in memory only).
  await engine.writeBack();
  const analysis = await analyse(image);
  if (analysis.brokenTable) {
    throw new CorruptImageError(image.name, 'the refcount table is damaged (run check -r all first): its counts cannot be carried over to another width');
  }
  const max = maxRefcount(order);
  for (let c = 0; c < analysis.references.extent; c++) {
    const count = analysis.stored(c);
    if (count > max) {
      throw new UnsupportedError(image.name, 'refcount_bits', `Cannot decrease refcount entry width to ${2 ** order} bits: Cluster at offset 0x${(c * image.clusterSize).toString(16)} has a refcount of ${count}`);
    }
  }
  await rebuildRefcounts(image, analysis, { order, counts: 'stored' });
}

function checkDowngrade(image: Qcow2Image, refcountOrder: number): void {
  const header = image.header;
  if (refcountOrder !== 4) throw new UnsupportedError(image.name, 'refcount_bits', 'compat=0.10 requires refcount_bits=16');
  if (header.incompatibleFeatures & INCOMPAT_DATA_FILE) throw new UnsupportedError(image.name, 'data_file', 'Cannot downgrade an image with a data file');
  const other = header.incompatibleFeatures & ~(INCOMPAT_COMPRESSION | INCOMPAT_DIRTY);
  if (other) throw new UnsupportedError(image.name, 'incompatible_features', `Cannot downgrade an image with incompatible features 0x${other.toString(16)} set`);
}

/** Every L2 table of the active state and of each snapshot, once, with the L1 tables that name it. */
async function allL2Tables(image: Qcow2Image): Promise<number[]> {
  const l1s = [image.l1Table];
  for (const snapshot of image.snapshots) {
    if (snapshot.l1Size) l1s.push(await readSnapshotL1(image.store, snapshot, image.clusterSize));
  }
  const offsets = new Set<number>();
  for (const l1 of l1s) {
    for (let i = 0; i + 8 <= l1.length; i += 8) {
      const offset = (u32(l1, i) & 0x00ffffff) * TWO_32 + ((u32(l1, i + 4) & 0xfffffe00) >>> 0);
      if (offset) offsets.add(offset);
    }
  }
  return [...offsets].sort((a, b) => a - b);
}

async function downgrade(engine: WriteEngine): Promise<void> {
  const image = engine.image;
  const header = image.header;
  const cs = image.clusterSize;
  const tables = await allL2Tables(image);
  if (header.compressionType !== 0) {
    for (const offset of tables) {
      const table = await engine.loadL2(offset);
      for (let i = 0; i < cs; i += 8) {
        if (u32(table, i) & COMPRESSED_HI) {
          throw new UnsupportedError(image.name, 'compression_type', 'Cannot downgrade an image with zstd compression type and existing compressed clusters');
        }
      }
    }
  }
  if (hasExtendedL2(header)) throw new UnsupportedError(image.name, 'incompatible_features', 'Cannot downgrade an image with incompatible features 0x10 set');
  // Version 2 has no zero flag: expand zero clusters in every table, shared ones in place (their meaning is
  // the same for every L1 that uses them), as QEMU does.
  const zeros = new Uint8Array(cs);
  const backing = image.backing !== undefined || header.backingFile !== undefined;
  for (const offset of tables) {
    const table = (await engine.loadL2(offset)).slice();
    const sharers = await engine.refcounts.get(offset / cs);
    let changed = false;
    for (let i = 0; i < cs; i += 8) {
      const hi = u32(table, i);
      const lo = u32(table, i + 4);
      if (hi & COMPRESSED_HI || !(lo & 1)) continue;
      let host = (hi & 0x00ffffff) * TWO_32 + ((lo & 0xfffffe00) >>> 0);
      changed = true;
      // A kept host cluster that other tables also use (a snapshot that still reads data there, after the
      // active layer zeroed it) must not be overwritten: this table lets go of it instead. QEMU 7.2 zeroes it
      // in place, which changes the snapshot's contents.
      if (host !== 0 && (await engine.refcounts.get(host / cs)) > sharers) {
        await engine.refcounts.change(host / cs, -sharers);
        host = 0;
      }
      if (host === 0 && !backing) {
        putU64(table, i, 0n);
        continue;
      }
      let target = host;
      let entry: bigint;
      if (host === 0) {
        target = await engine.refcounts.allocate(1);
        if (sharers > 1) await engine.refcounts.change(target / cs, sharers - 1);
        entry = BigInt(target) | (sharers === 1 ? COPIED : 0n);
      } else {
        // The cluster keeps its refcount and COPIED flag; only the zero flag goes.
        entry = (BigInt(hi) << 32n) | BigInt(lo & ~1 >>> 0);
      }
      await engine.guard(target, cs, 'data');
      await engine.refcounts.writeBack();
      // Zeros of an encrypted image are encrypted zeros (keyed by the host offset: only LUKS images get here,
      // legacy AES ones are refused before any data write).
      if (image.encryption?.method === 'aes') throw legacyWriteRefusal(image.name);
      await engine.writeData(target, 0, zeros);
      putU64(table, i, entry);
    }
    if (changed) engine.markDirty(offset, table);
  }
  // Clusters let go of above may now belong to one table only: COPIED follows the refcounts again.
  await rebuildCopiedFlags(engine);
  await engine.writeBack();
  header.incompatibleFeatures &= ~(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION);
  header.compressionType = 0;
  header.compatibleFeatures = 0n;
  header.autoclearFeatures = 0n;
  header.featureNames = [];
  header.unknownHeaderBytes = new Uint8Array(0);
  header.version = 2;
  await writeWholeHeaderCluster(engine);
  await engine.store.flush();
}

async function upgrade(engine: WriteEngine): Promise<void> {
  const image = engine.image;
  const header = image.header;
  // Version 3 snapshot entries carry at least vm_state_size_large and disk_size (16 bytes of extra data):
  // older tables are rewritten in the current encoding first.
  const short = image.snapshots.some((s) => {
    if (s.storedSize === undefined) return false;
    const names = new TextEncoder().encode(s.id).length + new TextEncoder().encode(s.name).length;
    return s.storedSize < Math.ceil((40 + 16 + names) / 8) * 8;
  });
  if (short) await replaceSnapshotTable(engine, [...image.snapshots]);
  header.version = 3;
  header.featureNames = [];
  await writeWholeHeaderCluster(engine);
  await engine.store.flush();
}

/** Like QEMU, the whole first cluster is rewritten: what the longer version 3 header left behind is zeroed. */
async function writeWholeHeaderCluster(engine: WriteEngine): Promise<void> {
  const bytes = encodeHeader(engine.image.header);
  const cluster = new Uint8Array(engine.image.clusterSize);
  cluster.set(bytes);
  await engine.store.write(0, cluster);
}

/**
 * An open qcow2 image: header, active L1 table, L2 cache, backing device and external data file. Reads turn into
 * extent plans (mapping.ts) that this class executes against the stores.
 */
import type { BlockDevice } from './device.js';
import type { ByteStore } from './store.js';
import { readExact, readIntoPadded } from './store.js';
import { failStop, type FailStopStore } from './fail-stop.js';
import { parseBitmapDirectory, type BitmapEntry } from './bitmaps.js';
import { CorruptImageError, FormatError, ReadOnlyError, UnsupportedError } from './errors.js';
import type { CryptoProvider } from './crypto.js';
import { legacyWriteRefusal, openQcow2Encryption, readDecrypted, type ImageEncryption } from './encryption.js';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  clusterSizeOf,
  hasExtendedL2,
  parseHeader,
  peekClusterBits,
  type Qcow2Header,
} from './header.js';
import { L2Cache } from './l2-cache.js';
import { SUBCLUSTERS, classify, decodeL1Entry, makeGeometry, pushExtent, readL2Entry, type Extent, type Geometry } from './mapping.js';
import { readSnapshotTable, readSnapshotL1, findSnapshot, type Snapshot } from './snapshots.js';
import { compressCluster, decompressCluster, type Codecs, type CompressionType } from './compression.js';
import { checkRange } from './raw.js';
import type { WriteEngine, ZeroOptions } from './write-path.js';
import type { SnapshotOptions } from './snapshot-ops.js';
import { hex } from './bytes.js';

export const DEFAULT_L2_CACHE_BYTES = 32 * 1024 * 1024;

type WriteSide = typeof import('./write-side.js');
let writeSideModule: Promise<WriteSide> | undefined;
/** Set once write-side.ts has loaded; writer() resolves only after that, so methods past it can use it at once. */
let writeSideLoaded: WriteSide | undefined;

/** The write side's code (write-side.ts), loaded on first use: a read-only open never needs it. */
function writeSide(): Promise<WriteSide> {
  writeSideModule ??= import('./write-side.js').then((module) => (writeSideLoaded = module));
  return writeSideModule;
}

export interface Qcow2OpenOptions {
  readOnly: boolean;
  codecs: Codecs;
  /** The device unallocated clusters read from; undefined means zeros. */
  backing?: BlockDevice | undefined;
  /** The external data file's store, when the image has one. */
  dataStore?: ByteStore | undefined;
  /** Bytes of L2 tables to keep cached (QEMU's l2-cache-size). */
  l2CacheSize?: number;
  /** Open an image marked corrupt read-write, to repair it (check -r). */
  repair?: boolean;
  /**
   * Open for the metadata only (info): an encrypted image, or one whose external data file has no name, opens;
   * reading or writing its data is then refused.
   */
  metadataOnly?: boolean;
  /** Open as qemu-img check does: a refcount table of 0 clusters is a finding, not a refusal. */
  forCheck?: boolean;
  /** Cryptography for encrypted images (src/io/ has Node's and the browser's). */
  crypto?: CryptoProvider | undefined;
  /** The password of an encrypted image (QEMU's encrypt.key-secret). */
  password?: Uint8Array | undefined;
}

export class Qcow2Image implements BlockDevice {
  readonly format = 'qcow2' as const;
  readonly geometry: Geometry;
  /** The persistent dirty bitmaps' directory, validated on open (empty without consistent bitmaps). */
  bitmaps: BitmapEntry[] = [];
  readonly clusterSize: number;
  readonly l2Cache: L2Cache;
  /** The last decompressed cluster: sequential reads of a compressed image hit it once per cluster. */
  private lastCompressed: { hostOffset: number; data: Uint8Array } | undefined;
  private readonly decompressing = new Map<number, Promise<Uint8Array>>();
  /** The write side (write-path.ts), created on the first modification of an image opened for writing. */
  private engine: WriteEngine | undefined;
  /** Set when the image was opened for its metadata only (encrypted, or its data file unnamed): data is refused. */
  private readonly refuseData: (() => Error) | undefined;
  /** The data cipher of an encrypted image opened with its key. */
  readonly encryption: ImageEncryption | undefined;
  private enginePromise: Promise<WriteEngine> | undefined;

  protected constructor(
    readonly store: ByteStore,
    readonly header: Qcow2Header,
    /** The active L1 table, raw big-endian entries. */
    public l1Table: Uint8Array,
    readonly snapshots: Snapshot[],
    readonly readOnly: boolean,
    readonly codecs: Codecs,
    readonly backing: BlockDevice | undefined,
    readonly dataStore: ByteStore | undefined,
    l2CacheSize: number,
    encryption?: ImageEncryption,
  ) {
    this.encryption = encryption;
    this.clusterSize = clusterSizeOf(header);
    // From the header, not from whether the data file was opened: inspection reads the tables without it.
    this.geometry = makeGeometry(header.clusterBits, hasExtendedL2(header), (header.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n, header.version);
    // Decided once: reads check it on every call.
    this.refuseData = dataRefusal(store.name, header, dataStore, encryption);
    this.l2Cache = new L2Cache(Math.max(2, Math.floor(l2CacheSize / this.clusterSize)));
  }

  get name(): string {
    return this.store.name;
  }

  /** The disk as QEMU sees it: whole 512-byte sectors, a size field that is not a multiple of 512 rounded down. */
  get virtualSize(): number {
    return Math.floor(this.header.size / 512) * 512;
  }

  get compressionType(): CompressionType {
    return this.header.compressionType === 1 ? 'zstd' : 'deflate';
  }

  get isCorrupt(): boolean {
    return (this.header.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
  }

  get isDirty(): boolean {
    return (this.header.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
  }

  get lazyRefcounts(): boolean {
    return (this.header.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
  }

  /** The first failed write, truncate or flush of this image's files, after which it takes no more writes. */
  get writeFailure(): unknown {
    return (this.store as Partial<FailStopStore>).failure ?? (this.dataStore as Partial<FailStopStore> | undefined)?.failure;
  }

  get dataFileRaw(): boolean {
    return (this.header.autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n;
  }

  /** Reads and validates the header, the active L1 table and the snapshot table. */
  static async readMetadata(store: ByteStore, forCheck = false): Promise<{ header: Qcow2Header; l1Table: Uint8Array; snapshots: Snapshot[]; bitmaps: BitmapEntry[]; fileSize: number }> {
    const fileSize = await store.size();
    const start = await store.read(0, 112);
    const clusterBits = peekClusterBits(store.name, start);
    const clusterSize = clusterBits >= 9 && clusterBits <= 21 ? 2 ** clusterBits : 512;
    const cluster0 = clusterSize <= start.length ? start : await store.read(0, Math.min(clusterSize, fileSize));
    const header = parseHeader(store.name, cluster0, fileSize, forCheck);
    const l1Table = header.l1Size ? await readExact(store, header.l1TableOffset, header.l1Size * 8, 'L1 table') : new Uint8Array(0);
    const snapshots = await readSnapshotTable(store, header.snapshotsOffset, header.nbSnapshots, Math.floor(header.size / 512) * 512);
    const bitmaps = header.bitmaps
      ? parseBitmapDirectory(store.name, await readExact(store, header.bitmaps.directoryOffset, header.bitmaps.directorySize, 'bitmap directory'), header.bitmaps, 2 ** header.clusterBits, Math.floor(header.size / 512) * 512)
      : [];
    return { header, l1Table, snapshots, bitmaps, fileSize };
  }

  /**
   * Opens an image whose backing device and data store the caller has already resolved (see open.ts, which walks
   * backing chains). Refuses what cannot be read correctly; refuses write access where QEMU would.
   */
  static async open(store: ByteStore, options: Qcow2OpenOptions): Promise<Qcow2Image> {
    const { header, l1Table, snapshots, bitmaps } = await Qcow2Image.readMetadata(store, options.forCheck === true);
    // An encrypted image is unlocked before anything else: a wrong password must not leave a trace (a dirty
    // image's refcount rebuild below writes). Opened for its metadata without a password, it stays locked.
    const encryption =
      header.cryptMethod !== 0 && !(options.metadataOnly && options.password === undefined)
        ? await openQcow2Encryption(store, header, options.crypto, options.password)
        : undefined;
    const refusal = dataRefusal(store.name, header, options.dataStore, encryption);
    if (refusal && !options.metadataOnly) throw refusal();
    let readOnly = options.readOnly || store.readOnly;
    if (!readOnly && header.incompatibleFeatures & INCOMPAT_CORRUPT && !options.repair) {
      throw new CorruptImageError(store.name, 'image is marked corrupt (incompatible feature bit 1): it can only be opened read-only until repaired with check -r');
    }
    // Written through stores that stop at their first failed write or flush (fail-stop.ts).
    const image = readOnly
      ? new this(store, header, l1Table, snapshots, readOnly, options.codecs, options.backing, options.dataStore, options.l2CacheSize ?? DEFAULT_L2_CACHE_BYTES, encryption)
      : new this(failStop(store), header, l1Table, snapshots, readOnly, options.codecs, options.backing, options.dataStore && failStop(options.dataStore), options.l2CacheSize ?? DEFAULT_L2_CACHE_BYTES, encryption);
    image.bitmaps = bitmaps;
    // A writer with lazy refcounts died with the image dirty: its refcounts are rebuilt before any write.
    if (!readOnly && header.incompatibleFeatures & INCOMPAT_DIRTY && !options.repair) await (await writeSide()).repairDirtyImage(image);
    return image;
  }

  /** The guest-visible disk as of an internal snapshot (by ID or name), read-only. */
  async openSnapshot(idOrName: string): Promise<BlockDevice> {
    const snapshot = findSnapshot(this.snapshots, idOrName);
    if (!snapshot) throw new FormatError(this.name, `no snapshot with ID or name '${idOrName}'`, { field: 'snapshot', value: idOrName });
    const l1 = await readSnapshotL1(this.store, snapshot, this.clusterSize);
    return new SnapshotView(this, snapshot, l1);
  }

  /**
   * This image with a snapshot's L1 table in place of the active one, read-only and at the image's CURRENT size,
   * as QEMU's bdrv_snapshot_load_tmp gives it to qemu-img convert -l and measure -l: past the snapshot's own
   * disk end the backing file (or zeros) shows through. Being a Qcow2Image, block status works on it.
   */
  async loadSnapshotTemporarily(idOrName: string): Promise<Qcow2Image> {
    const snapshot = findSnapshot(this.snapshots, idOrName);
    if (!snapshot) throw new FormatError(this.name, `Failed to load snapshot: Can't find snapshot '${idOrName}'`, { field: 'snapshot', value: idOrName });
    const l1 = await readSnapshotL1(this.store, snapshot, this.clusterSize, 'Failed to load snapshot: ');
    const view = Object.create(this) as Qcow2Image;
    const refuse = async (): Promise<never> => {
      throw new FormatError(this.name, `snapshot '${idOrName}' is loaded read-only`, { field: 'snapshot', value: idOrName });
    };
    Object.defineProperties(view, {
      l1Table: { value: l1 },
      readOnly: { value: true },
      write: { value: refuse },
      // The view shares everything with its image: closing is the image's business.
      flush: { value: async () => {} },
      close: { value: async () => {} },
    });
    return view;
  }

  // ---- mapping -------------------------------------------------------------------------------------------

  async loadL2(l2Offset: number): Promise<Uint8Array> {
    const pending = this.engine?.pendingL2(l2Offset);
    if (pending) return pending;
    return this.l2Cache.get(l2Offset, (offset) => readExact(this.store, offset, this.clusterSize, 'L2 table'));
  }

  /** The L2 table at `l2Offset` if it can be had without I/O (being written, or cached); undefined otherwise. */
  cachedL2(l2Offset: number): Uint8Array | undefined {
    return this.engine?.pendingL2(l2Offset) ?? this.l2Cache.lookup(l2Offset);
  }

  /**
   * Describes guest bytes [offset, offset+length) of this layer only (unallocated extents are not resolved
   * through the backing chain). `l1Table` selects a snapshot's tables instead of the active ones.
   */
  async mapRange(offset: number, length: number, l1Table: Uint8Array = this.l1Table): Promise<Extent[]> {
    const extents: Extent[] = [];
    const end = offset + length;
    const at = this.mapCached(extents, offset, end, l1Table);
    if (at < end) await this.mapRest(extents, at, end, l1Table);
    return extents;
  }

  /** Finishes what mapCached started at `at`, loading the L2 tables it stopped for. */
  private async mapRest(extents: Extent[], at: number, end: number, l1Table: Uint8Array): Promise<void> {
    while (at < end) {
      // Carry on with the loaded table in hand: it may be evicted again before it is used when many reads share
      // a small cache.
      const l2Offset = decodeL1Entry(this.name, l1Table, Math.floor(at / this.clusterSize / this.geometry.l2Entries), this.geometry).l2Offset;
      const table = await this.loadL2(l2Offset);
      at = this.mapCached(extents, at, end, l1Table, l2Offset, table);
    }
  }

  /**
   * Maps [at, end) into `extents` as far as L2 tables are at hand without I/O (cached, being written, or the
   * `known` one) and returns where it stopped: `end` when done, else the start of a cluster whose table must be
   * loaded. Synchronous, so a read whose tables are cached costs no extra promise round trips.
   */
  private mapCached(extents: Extent[], at: number, end: number, l1Table: Uint8Array, knownOffset = -1, known?: Uint8Array): number {
    const { clusterSize, l2Entries, extendedL2 } = this.geometry;
    while (at < end) {
      const clusterIndex = Math.floor(at / clusterSize);
      const l1Index = Math.floor(clusterIndex / l2Entries);
      const l2Index = clusterIndex % l2Entries;
      const clusterStart = clusterIndex * clusterSize;
      const clusterEnd = Math.min(clusterStart + clusterSize, end);
      if (l1Index * 8 >= l1Table.length) {
        // Past the L1 table (a snapshot view of a disk that grew later): nothing allocated there.
        const l2End = Math.min(end, (l1Index + 1) * l2Entries * clusterSize);
        pushExtent(extents, { guestOffset: at, length: l2End - at, kind: 'unallocated' });
        at = l2End;
        continue;
      }
      const l1 = decodeL1Entry(this.name, l1Table, l1Index, this.geometry);
      if (l1.l2Offset === 0) {
        const l2End = Math.min(end, (l1Index + 1) * l2Entries * clusterSize);
        pushExtent(extents, { guestOffset: at, length: l2End - at, kind: 'unallocated' });
        at = l2End;
        continue;
      }
      const table = l1.l2Offset === knownOffset ? this.engine?.pendingL2(knownOffset) ?? known : this.cachedL2(l1.l2Offset);
      if (!table) return at;
      const entry = readL2Entry(table, l2Index, this.geometry);
      const place = { l2Offset: l1.l2Offset, l2Index, guestOffset: clusterStart };
      if (!extendedL2 || entry.hi & 0x40000000) {
        const mapping = classify(this.name, entry, this.geometry, 0, place);
        pushMapping(extents, mapping, at, clusterEnd - at, at - clusterStart);
        at = clusterEnd;
        continue;
      }
      const subSize = clusterSize / SUBCLUSTERS;
      while (at < clusterEnd) {
        const sub = Math.floor((at - clusterStart) / subSize);
        const subEnd = Math.min(clusterStart + (sub + 1) * subSize, clusterEnd);
        const mapping = classify(this.name, entry, this.geometry, sub, place);
        pushMapping(extents, mapping, at, subEnd - at, at - clusterStart - sub * subSize);
        at = subEnd;
      }
    }
    return at;
  }

  // ---- reading -------------------------------------------------------------------------------------------

  async read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(this, offset, length);
    const out = new Uint8Array(length);
    // While writes are possible, reads wait for them: tables change under a write.
    if (this.engine) {
      await this.engine.exclusive(async () => this.fill(out, offset, this.l1Table, this.backing, true));
    } else {
      const pending = this.fill(out, offset, this.l1Table, this.backing, true);
      if (pending) await pending;
    }
    return out;
  }

  /** Fills all of `into` with guest bytes starting at `offset` (a reused buffer: convert's copy loop). */
  async readInto(offset: number, into: Uint8Array): Promise<void> {
    checkRange(this, offset, into.length);
    if (this.engine) {
      await this.engine.exclusive(async () => this.fill(into, offset, this.l1Table, this.backing, false));
    } else {
      const pending = this.fill(into, offset, this.l1Table, this.backing, false);
      if (pending) await pending;
    }
  }

  /** Executes the read plan for [offset, offset+length) with the given tables and backing. */
  async readThrough(offset: number, length: number, l1Table: Uint8Array, backing: BlockDevice | undefined): Promise<Uint8Array> {
    const out = new Uint8Array(length);
    await this.fill(out, offset, l1Table, backing, true);
    return out;
  }

  /**
   * Fills `out` with guest bytes from `offset`. `fresh` says `out` is newly allocated (already zero), so zero
   * and unallocated extents need no writing. Returns undefined when it finished without I/O: a read of a hole
   * with its L2 table cached, most of a sparse disk, costs no promise beyond the caller's own.
   */
  private fill(out: Uint8Array, offset: number, l1Table: Uint8Array, backing: BlockDevice | undefined, fresh: boolean): Promise<void> | undefined {
    if (this.refuseData) throw this.refuseData();
    const end = offset + out.length;
    const extents: Extent[] = [];
    const at = this.mapCached(extents, offset, end, l1Table);
    if (at < end) return this.fillMapped(out, offset, extents, at, l1Table, backing, fresh);
    if (extents.length === 1) return this.fillExtent(out, offset, extents[0]!, backing, fresh);
    return this.fillExtents(out, offset, extents, backing, fresh);
  }

  /** fill, after loading the L2 tables mapCached stopped for. */
  private async fillMapped(out: Uint8Array, offset: number, extents: Extent[], at: number, l1Table: Uint8Array, backing: BlockDevice | undefined, fresh: boolean): Promise<void> {
    await this.mapRest(extents, at, offset + out.length, l1Table);
    await this.fillExtents(out, offset, extents, backing, fresh);
  }

  private async fillExtents(out: Uint8Array, offset: number, extents: Extent[], backing: BlockDevice | undefined, fresh: boolean): Promise<void> {
    const jobs: Promise<void>[] = [];
    for (let i = 0; i < extents.length; i++) {
      const extent = extents[i]!;
      if (extent.kind === 'compressed') {
        const run = compressedRun(extents, i);
        if (run > 1) {
          jobs.push(this.fillCompressedRun(out, offset, extents.slice(i, i + run) as CompressedExtent[]));
          i += run - 1;
          continue;
        }
      }
      const job = this.fillExtent(out, offset, extent, backing, fresh);
      if (job) jobs.push(job);
    }
    await Promise.all(jobs);
  }

  /**
   * Compressed clusters that lie next to each other in the file (QEMU writes them back to back) are fetched with
   * one store read and decompressed from it: one request instead of one per cluster, which is what a convert or
   * a sequential read of a compressed image is made of (and, over HTTP, one Range request).
   */
  private async fillCompressedRun(out: Uint8Array, base: number, run: CompressedExtent[]): Promise<void> {
    const start = run[0]!.hostOffset;
    let end = start;
    for (const extent of run) end = Math.max(end, extent.hostOffset + extent.compressedLength);
    const span = await this.store.read(start, end - start);
    for (const extent of run) {
      const at = extent.guestOffset - base;
      if (this.lastCompressed?.hostOffset === extent.hostOffset) {
        out.set(this.lastCompressed.data.subarray(extent.offsetInCluster, extent.offsetInCluster + extent.length), at);
        continue;
      }
      const raw = span.subarray(extent.hostOffset - start, extent.hostOffset - start + extent.compressedLength);
      if (extent.length === this.clusterSize) {
        // A whole cluster is decoded in place (no cluster-sized buffer per cluster, no copy).
        await this.decodeCompressedInto(extent.hostOffset, raw, out.subarray(at, at + extent.length));
        continue;
      }
      const cluster = await this.decodeCompressed(extent.hostOffset, raw);
      out.set(cluster.subarray(extent.offsetInCluster, extent.offsetInCluster + extent.length), at);
    }
  }

  private fillExtent(out: Uint8Array, base: number, extent: Extent, backing: BlockDevice | undefined, fresh: boolean): Promise<void> | undefined {
    const at = extent.guestOffset - base;
    switch (extent.kind) {
      case 'zero':
        if (!fresh) out.fill(0, at, at + extent.length);
        return undefined;
      case 'unallocated': {
        // A backing file shorter than this image reads as zeros past its end.
        const available = backing ? Math.max(0, Math.min(extent.length, backing.virtualSize - extent.guestOffset)) : 0;
        if (!fresh) out.fill(0, at + available, at + extent.length);
        if (available === 0) return undefined;
        return this.fillFromBacking(backing!, out.subarray(at, at + available), extent.guestOffset);
      }
      case 'data':
        if (this.encryption) {
          const ivOffset = this.encryption.keyedByHost ? extent.hostOffset : extent.guestOffset;
          return readDecrypted(this.dataStore ?? this.store, this.encryption, extent.hostOffset, ivOffset, out.subarray(at, at + extent.length));
        }
        // Data past the end of the file reads as zeros, as it does in QEMU.
        return readIntoPadded(this.dataStore ?? this.store, extent.hostOffset, out.subarray(at, at + extent.length));
      case 'compressed':
        return this.fillCompressed(out, at, extent);
    }
  }

  private async fillFromBacking(backing: BlockDevice, into: Uint8Array, guestOffset: number): Promise<void> {
    if (backing.readInto) await backing.readInto(guestOffset, into);
    else into.set(await backing.read(guestOffset, into.length));
  }

  private async fillCompressed(out: Uint8Array, at: number, extent: Extent & { kind: 'compressed' }): Promise<void> {
    const cluster = await this.readCompressed(extent.hostOffset, extent.compressedLength);
    out.set(cluster.subarray(extent.offsetInCluster, extent.offsetInCluster + extent.length), at);
  }

  async readCompressed(hostOffset: number, compressedLength: number): Promise<Uint8Array> {
    if (this.lastCompressed?.hostOffset === hostOffset) return this.lastCompressed.data;
    // Concurrent reads inside one compressed cluster share its decompression.
    const pending = this.decompressing.get(hostOffset);
    if (pending) return pending;
    const promise = this.decompress(hostOffset, compressedLength);
    this.decompressing.set(hostOffset, promise);
    try {
      return await promise;
    } finally {
      this.decompressing.delete(hostOffset);
    }
  }

  private async decompress(hostOffset: number, compressedLength: number): Promise<Uint8Array> {
    // The descriptor's sector count can overstate the length (it is sector-granular, up to two clusters).
    return this.decodeCompressed(hostOffset, await this.store.read(hostOffset, compressedLength));
  }

  /** Decompresses a cluster's stored bytes (`raw`, short or empty where the file ends) and remembers it. */
  private async decodeCompressed(hostOffset: number, raw: Uint8Array): Promise<Uint8Array> {
    this.checkCompressedInFile(hostOffset, raw);
    const data = await decompressCluster(this.name, this.compressionType, raw, this.clusterSize, this.codecs, hostOffset);
    this.lastCompressed = { hostOffset, data };
    return data;
  }

  /**
   * decodeCompressed into the caller's cluster-sized buffer. Not remembered: the buffer is the caller's, and a
   * whole-cluster read is not followed by another read inside the same cluster.
   */
  private async decodeCompressedInto(hostOffset: number, raw: Uint8Array, into: Uint8Array): Promise<void> {
    this.checkCompressedInFile(hostOffset, raw);
    await decompressCluster(this.name, this.compressionType, raw, this.clusterSize, this.codecs, hostOffset, into);
  }

  private checkCompressedInFile(hostOffset: number, raw: Uint8Array): void {
    if (raw.length === 0) {
      throw new CorruptImageError(this.name, `compressed cluster at host offset ${hex(hostOffset)} lies outside the file`, hostOffset);
    }
  }

  // ---- writing (write-path.ts does the work; these serialise it) -------------------------------------------

  /** The write engine, loading the refcount table on first use. Refused for read-only and corrupt images. */
  async writer(): Promise<WriteEngine> {
    if (this.refuseData) throw this.refuseData();
    if (this.readOnly) throw new ReadOnlyError(this.name, 'image is open read-only');
    if (!this.enginePromise) {
      this.enginePromise = writeSide()
        .then(({ WriteEngine }) => WriteEngine.create(this))
        .then((engine) => (this.engine = engine));
      this.enginePromise.catch(() => (this.enginePromise = undefined));
    }
    return this.enginePromise;
  }

  /** Guest writes to a legacy AES image are refused (see legacyWriteRefusal); its metadata can still change. */
  private refuseLegacyAes(): void {
    if (this.header.cryptMethod === 1) throw legacyWriteRefusal(this.name);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    checkRange(this, offset, data.length);
    this.refuseLegacyAes();
    const engine = await this.writer();
    return engine.exclusive(() => engine.write(offset, data));
  }

  /** Makes [offset, offset+length) read as zeros (zero flags where possible; `unmap` frees host clusters). */
  async writeZeroes(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    checkRange(this, offset, length);
    this.refuseLegacyAes();
    const engine = await this.writer();
    const { writeZeroes } = writeSideLoaded!;
    return engine.exclusive(() => writeZeroes(engine, offset, length, options));
  }

  /** Gives whole clusters in the range back (partial clusters are left alone, as in QEMU). */
  async discard(offset: number, length: number): Promise<void> {
    checkRange(this, offset, length);
    this.refuseLegacyAes();
    const engine = await this.writer();
    const { discard } = writeSideLoaded!;
    return engine.exclusive(() => discard(engine, offset, length));
  }

  /** Writes guest cluster `clusterIndex` compressed with the image's compression type (convert -c). */
  async writeCompressed(clusterIndex: number, data: Uint8Array): Promise<void> {
    this.refuseLegacyAes();
    const engine = await this.writer();
    const { writeCompressed } = writeSideLoaded!;
    return engine.exclusive(() => writeCompressed(engine, clusterIndex, data));
  }

  /**
   * Each cluster's compressed form with the image's compression type (undefined where it does not compress below a
   * cluster), all at once - on worker threads, where the codecs use them. Pure computation: a caller may start it
   * early and hand the result to writeCompressedClusters.
   */
  compressClusters(clusters: Uint8Array[]): Promise<(Uint8Array | undefined)[]> {
    return Promise.all(clusters.map((data) => compressCluster(this.compressionType, data, this.clusterSize, this.codecs)));
  }

  /**
   * Writes consecutive guest clusters from `firstCluster` on, compressed (convert -c): `compressed`, their forms from
   * compressClusters, placed one after the other in cluster order, so the file is byte for byte what writing them
   * one at a time gives.
   */
  async writeCompressedClusters(firstCluster: number, clusters: Uint8Array[], compressed: Promise<(Uint8Array | undefined)[]>): Promise<void> {
    this.refuseLegacyAes();
    const engine = await this.writer();
    const { checkCompressible, placeCompressed } = writeSideLoaded!;
    checkCompressible(engine);
    const forms = await compressed;
    return engine.exclusive(async () => {
      for (let i = 0; i < clusters.length; i++) await placeCompressed(engine, firstCluster + i, clusters[i]!, forms[i]);
    });
  }

  // ---- snapshots and size (snapshot-ops.ts, l1-table.ts) --------------------------------------------------

  /** Takes an internal snapshot of the active disk, optionally with a VM-state blob (readVmState gives it back). */
  async createSnapshot(name: string, options: SnapshotOptions = {}): Promise<Snapshot> {
    const engine = await this.writer();
    const { createSnapshot } = writeSideLoaded!;
    return engine.exclusive(() => createSnapshot(engine, name, options));
  }

  /** Reverts the active disk to a snapshot (by ID or name), like qemu-img snapshot -a. */
  async applySnapshot(idOrName: string): Promise<void> {
    const engine = await this.writer();
    const { applySnapshot } = writeSideLoaded!;
    return engine.exclusive(() => applySnapshot(engine, idOrName));
  }

  async deleteSnapshot(idOrName: string): Promise<void> {
    const engine = await this.writer();
    const { deleteSnapshot } = writeSideLoaded!;
    return engine.exclusive(() => deleteSnapshot(engine, idOrName));
  }

  /** The VM state stored with a snapshot (by ID, name or entry); empty when it has none. */
  async readVmState(snapshot: Snapshot | string): Promise<Uint8Array> {
    const entry = typeof snapshot === 'string' ? findSnapshot(this.snapshots, snapshot) : snapshot;
    if (!entry) throw new FormatError(this.name, `no snapshot with ID or name '${String(snapshot)}'`, { field: 'snapshot', value: String(snapshot) });
    const { readVmState } = await import('./snapshot-ops.js');
    const read = () => readVmState(this, entry);
    return this.engine ? this.engine.exclusive(read) : read();
  }

  /** Grows the virtual disk to `newSize` bytes (qemu-img resize). */
  async grow(newSize: number): Promise<void> {
    const engine = await this.writer();
    const { growDisk } = writeSideLoaded!;
    return engine.exclusive(() => growDisk(engine, newSize));
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    const engine = this.engine;
    if (engine) await engine.exclusive(() => engine.flush());
    else await this.store.flush();
  }

  async close(): Promise<void> {
    try {
      const engine = this.engine;
      if (engine) await engine.exclusive(() => engine.close());
    } finally {
      await this.store.close();
      if (this.dataStore) await this.dataStore.close();
      if (this.backing) await this.backing.close();
    }
  }
}

type CompressedExtent = Extent & { kind: 'compressed' };

/** Compressed reads closer than this in the file are merged into one (the gap is read and thrown away). */
const COMPRESSED_GAP = 4096;
/** ...up to this many bytes per merged read. */
const COMPRESSED_SPAN = 4 * 1024 * 1024;

/** How many extents from `first` on are compressed clusters stored close together, in file order. */
function compressedRun(extents: Extent[], first: number): number {
  const head = extents[first] as CompressedExtent;
  let end = head.hostOffset + head.compressedLength;
  let count = 1;
  for (let i = first + 1; i < extents.length; i++) {
    const next = extents[i]!;
    if (next.kind !== 'compressed' || next.hostOffset < head.hostOffset || next.hostOffset > end + COMPRESSED_GAP) break;
    const nextEnd = Math.max(end, next.hostOffset + next.compressedLength);
    if (nextEnd - head.hostOffset > COMPRESSED_SPAN) break;
    end = nextEnd;
    count++;
  }
  return count;
}

function pushMapping(extents: Extent[], mapping: ReturnType<typeof classify>, guestOffset: number, length: number, offsetInUnit: number): void {
  switch (mapping.kind) {
    case 'unallocated':
      pushExtent(extents, { guestOffset, length, kind: 'unallocated' });
      return;
    case 'zero':
      pushExtent(extents, { guestOffset, length, kind: 'zero', hostOffset: mapping.hostOffset === undefined ? undefined : mapping.hostOffset + offsetInUnit });
      return;
    case 'data':
      pushExtent(extents, { guestOffset, length, kind: 'data', hostOffset: mapping.hostOffset + offsetInUnit });
      return;
    case 'compressed':
      extents.push({ guestOffset, length, kind: 'compressed', hostOffset: mapping.hostOffset, compressedLength: mapping.compressedLength, offsetInCluster: offsetInUnit });
      return;
  }
}

/** A read-only view of the disk as it was when a snapshot was taken. */
class SnapshotView implements BlockDevice {
  readonly format = 'qcow2' as const;
  readonly readOnly = true;

  constructor(
    private readonly image: Qcow2Image,
    readonly snapshot: Snapshot,
    private readonly l1Table: Uint8Array,
  ) {}

  get name(): string {
    return `${this.image.name} (snapshot ${this.snapshot.id} '${this.snapshot.name}')`;
  }

  get virtualSize(): number {
    return this.snapshot.diskSize;
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    checkRange(this, offset, length);
    return this.image.readThrough(offset, length, this.l1Table, this.image.backing);
  }

  async write(): Promise<void> {
    throw new ReadOnlyError(this.name, 'snapshots are read-only');
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    await this.image.close();
  }
}

/**
 * Why an image's data can be neither read nor written, if it cannot: an encrypted image opened without its key,
 * and an image whose external data file was not found, have no data to read. Such images open for their metadata only.
 */
function dataRefusal(file: string, header: Qcow2Header, dataStore: ByteStore | undefined, encryption: ImageEncryption | undefined): (() => Error) | undefined {
  if (header.cryptMethod !== 0 && !encryption) {
    return () => new UnsupportedError(file, 'encryption', `the image is encrypted (crypt_method ${header.cryptMethod} at offset 32) and was opened without its key`);
  }
  if (header.incompatibleFeatures & INCOMPAT_DATA_FILE && !dataStore) {
    return header.dataFile === undefined
      ? () => new FormatError(file, 'the image keeps its data in an external data file, but none was given or named in the header', { field: 'data file' })
      : () => new UnsupportedError(file, 'data file', `the image keeps its data in the external data file '${header.dataFile}', which was not opened`);
  }
  return undefined;
}

/**
 * The metadata-overlap guard: every host cluster holding metadata (header, L1 tables, active L2 tables, refcount
 * table and blocks, snapshot table) is known, and any data or table write that would land on one is refused
 * before it reaches the store. Like QEMU's default "cached" mode, inactive L2 tables are not tracked.
 */
import { u32 } from './bytes.js';

export type MetadataKind = 'header' | 'active L1 table' | 'inactive L1 table' | 'active L2 table' | 'refcount table' | 'refcount block' | 'snapshot table' | 'bitmap directory';

export class MetadataMap {
  private readonly clusters = new Map<number, MetadataKind>();

  constructor(readonly clusterSize: number) {}

  clear(): void {
    this.clusters.clear();
  }

  addRange(offset: number, length: number, kind: MetadataKind): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) this.clusters.set(c, kind);
  }

  removeRange(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) this.clusters.delete(c);
  }

  /** The kind of metadata the host range [offset, offset+length) would overwrite, if any (except `allowed`). */
  overlap(offset: number, length: number, allowed?: MetadataKind): { kind: MetadataKind; offset: number } | undefined {
    if (length <= 0) return undefined;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) {
      const kind = this.clusters.get(c);
      if (kind !== undefined && kind !== allowed) return { kind, offset: c * this.clusterSize };
    }
    return undefined;
  }

  /** Adds the L2 tables an L1 table points at. */
  addL2Tables(l1: Uint8Array): void {
    for (let i = 0; i < l1.length / 8; i++) {
      const offset = (u32(l1, i * 8) & 0x00ffffff) * 2 ** 32 + ((u32(l1, i * 8 + 4) & 0xfffffe00) >>> 0);
      if (offset !== 0) this.addRange(offset, this.clusterSize, 'active L2 table');
    }
  }
}

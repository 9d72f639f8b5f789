/**
 * The metadata-overlap guard: every host cluster holding metadata (header, L1 tables, active L2 tables, refcount
 * table and blocks, snapshot table, bitmap directory) is known, and any data or metadata write that would land
 * on metadata of another kind is refused before it reaches the store. Like QEMU's default "cached" mode,
 * inactive L2 tables are not tracked.
 *
 * Memory and time follow the number of metadata structures, never their size: one-cluster structures (L2 tables,
 * refcount blocks) are kept per cluster, everything larger as a range. A hostile snapshot table can name 65536
 * snapshots with 32 MiB L1 tables each: that is 65536 ranges, not billions of clusters. Ranges may overlap (in a
 * damaged image two structures can claim one cluster): every claim is kept, so a write allowed for one kind is
 * still refused where another kind sits.
 */
import { u32 } from './bytes.js';

export type MetadataKind = 'header' | 'active L1 table' | 'inactive L1 table' | 'active L2 table' | 'refcount table' | 'refcount block' | 'snapshot table' | 'bitmap directory' | 'encryption header';

interface Span {
  /** First and last cluster (inclusive). */
  first: number;
  last: number;
  kind: MetadataKind;
}

export class MetadataMap {
  /** Single clusters: cluster index -> the kinds claiming it (usually one). */
  private readonly clusters = new Map<number, MetadataKind | MetadataKind[]>();
  /** Ranges of two clusters or more, sorted by first cluster, with the largest `last` of each prefix. */
  private spans: Span[] = [];
  private reach: number[] = [];

  constructor(readonly clusterSize: number) {}

  clear(): void {
    this.clusters.clear();
    this.spans = [];
    this.reach = [];
  }

  addRange(offset: number, length: number, kind: MetadataKind): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    if (first === last) {
      const claims = this.clusters.get(first);
      if (claims === undefined) this.clusters.set(first, kind);
      else if (Array.isArray(claims)) claims.includes(kind) || claims.push(kind);
      else if (claims !== kind) this.clusters.set(first, [claims, kind]);
      return;
    }
    const at = this.upperBound(first);
    this.spans.splice(at, 0, { first, last, kind });
    this.recomputeReach(at);
  }

  /** Adds many ranges at once (one sort instead of one insertion each). */
  addRanges(ranges: Iterable<{ offset: number; length: number; kind: MetadataKind }>): void {
    let added = false;
    for (const { offset, length, kind } of ranges) {
      if (length <= 0) continue;
      const first = Math.floor(offset / this.clusterSize);
      const last = Math.floor((offset + length - 1) / this.clusterSize);
      if (first === last) this.addRange(offset, length, kind);
      else {
        this.spans.push({ first, last, kind });
        added = true;
      }
    }
    if (added) {
      this.spans.sort((a, b) => a.first - b.first);
      this.recomputeReach(0);
    }
  }

  /** Forgets every claim on clusters of the range (the structures there moved or were freed). */
  removeRange(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    if (last - first < this.clusters.size) {
      for (let c = first; c <= last; c++) this.clusters.delete(c);
    } else {
      for (const c of this.clusters.keys()) if (c >= first && c <= last) this.clusters.delete(c);
    }
    if (!this.spans.some((s) => s.first <= last && s.last >= first)) return;
    const kept: Span[] = [];
    for (const span of this.spans) {
      if (span.last < first || span.first > last) kept.push(span);
      else {
        if (span.first < first) kept.push({ first: span.first, last: first - 1, kind: span.kind });
        if (span.last > last) kept.push({ first: last + 1, last: span.last, kind: span.kind });
      }
    }
    this.spans = kept.sort((a, b) => a.first - b.first);
    this.recomputeReach(0);
  }

  /** A kind of metadata (other than `allowed`) that the host range [offset, offset+length) would overwrite. */
  overlap(offset: number, length: number, allowed?: MetadataKind): { kind: MetadataKind; offset: number } | undefined {
    if (length <= 0) return undefined;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    const other = (claims: MetadataKind | MetadataKind[]) => (Array.isArray(claims) ? claims.find((k) => k !== allowed) : claims !== allowed ? claims : undefined);
    if (this.clusters.size) {
      if (last - first < this.clusters.size) {
        for (let c = first; c <= last; c++) {
          const claims = this.clusters.get(c);
          const kind = claims === undefined ? undefined : other(claims);
          if (kind) return { kind, offset: c * this.clusterSize };
        }
      } else {
        for (const [c, claims] of this.clusters) {
          const kind = c >= first && c <= last ? other(claims) : undefined;
          if (kind) return { kind, offset: c * this.clusterSize };
        }
      }
    }
    // Spans starting at or before `last`, walked back while some earlier span still reaches `first`.
    for (let i = this.upperBound(last) - 1; i >= 0 && this.reach[i]! >= first; i--) {
      const span = this.spans[i]!;
      if (span.last >= first && span.kind !== allowed) return { kind: span.kind, offset: Math.max(span.first, first) * this.clusterSize };
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

  /** Index of the first span whose first cluster is after `cluster`. */
  private upperBound(cluster: number): number {
    let lo = 0;
    let hi = this.spans.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.spans[mid]!.first <= cluster) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  private recomputeReach(from: number): void {
    this.reach.length = this.spans.length;
    for (let i = from; i < this.spans.length; i++) this.reach[i] = Math.max(i > 0 ? this.reach[i - 1]! : -1, this.spans[i]!.last);
  }
}

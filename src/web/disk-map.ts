/**
 * The cluster map the page draws: which parts of the virtual disk read from the base, which the guest wrote into
 * the overlay, and which are zero. Built from the engine's mapping plans (no data is read), then kept current
 * from the guest's reads and writes, which the Worker sees anyway.
 */
import type { BlockDevice } from '../qcow2/device.js';
import { Qcow2Image, backingOf } from '../qcow2/index.js';
import { Cell, type CellState, type ClusterMap } from './protocol.js';

/** The page draws at most this many cells; bigger disks get coarser cells. */
const MAX_CELLS = 16384;
/** Mapping a whole disk in one call would build one huge extent list; walk it in slices. */
const MAP_SLICE = 256 * 1024 * 1024;

export class DiskMap {
  readonly cellSize: number;
  readonly cells: Uint8Array;
  private pending = new Map<number, CellState>();

  private constructor(cellSize: number, count: number) {
    this.cellSize = cellSize;
    this.cells = new Uint8Array(count);
  }

  /** Classifies every cell of `top` (an overlay over a base, or a lone image). */
  static async build(top: BlockDevice): Promise<DiskMap> {
    const unit = top instanceof Qcow2Image ? top.clusterSize : 65536;
    let cellSize = unit;
    while (Math.ceil(top.virtualSize / cellSize) > MAX_CELLS) cellSize *= 2;
    const map = new DiskMap(cellSize, Math.max(1, Math.ceil(top.virtualSize / cellSize)));
    // Bottom-up: the last image of the chain is the base; every layer above it holds overlay data (a read-only
    // tab stacks a throwaway overlay on the stored one).
    const chain: BlockDevice[] = [];
    for (let layer: BlockDevice | undefined = top; layer; layer = backingOf(layer)) chain.unshift(layer);
    for (const [depth, layer] of chain.entries()) {
      await map.paint(layer, depth === 0 && chain.length > 1 ? Cell.Base : Cell.Overlay, depth > 0);
    }
    map.pending.clear();
    return map;
  }

  /**
   * Marks cells `device` holds data for. Raw and non-qcow2 devices count as fully allocated. When `overlay` is
   * set, the device's zero clusters are painted Zero over whatever the base had (a zeroed overlay cluster hides
   * the base).
   */
  private async paint(device: BlockDevice, state: CellState, overlay = false): Promise<void> {
    if (!(device instanceof Qcow2Image)) {
      this.mark(0, device.virtualSize, state);
      return;
    }
    for (let at = 0; at < device.virtualSize; at += MAP_SLICE) {
      const length = Math.min(MAP_SLICE, device.virtualSize - at);
      for (const extent of await device.mapRange(at, length)) {
        if (extent.kind === 'data' || extent.kind === 'compressed') this.mark(extent.guestOffset, extent.length, state);
        else if (extent.kind === 'zero' && overlay) this.set(extent.guestOffset, extent.length, Cell.Zero);
      }
    }
  }

  /** Raises cells in the range to at least `state`. */
  mark(offset: number, length: number, state: CellState): void {
    const first = Math.floor(offset / this.cellSize);
    const last = Math.min(this.cells.length - 1, Math.floor((offset + length - 1) / this.cellSize));
    for (let i = first; i <= last; i++) {
      if (this.cells[i]! < state) this.setCell(i, state);
    }
  }

  /** The guest read a range: base cells in it become "read". */
  noteRead(offset: number, length: number): void {
    const first = Math.floor(offset / this.cellSize);
    const last = Math.min(this.cells.length - 1, Math.floor((offset + length - 1) / this.cellSize));
    for (let i = first; i <= last; i++) {
      if (this.cells[i] === Cell.Base) this.setCell(i, Cell.BaseRead);
    }
  }

  noteWrite(offset: number, length: number): void {
    this.mark(offset, length, Cell.Overlay);
  }

  private set(offset: number, length: number, state: CellState): void {
    const first = Math.floor(offset / this.cellSize);
    const last = Math.min(this.cells.length - 1, Math.floor((offset + length - 1) / this.cellSize));
    for (let i = first; i <= last; i++) this.setCell(i, state);
  }

  private setCell(index: number, state: CellState): void {
    this.cells[index] = state;
    this.pending.set(index, state);
  }

  snapshot(): ClusterMap {
    return { cellSize: this.cellSize, cells: this.cells.slice() };
  }

  /** Changes since the last call, as (index, state) pairs; undefined when nothing changed. */
  takeChanges(): Uint32Array | undefined {
    if (this.pending.size === 0) return undefined;
    const out = new Uint32Array(this.pending.size * 2);
    let i = 0;
    for (const [index, state] of this.pending) {
      out[i++] = index;
      out[i++] = state;
    }
    this.pending.clear();
    return out;
  }
}

/**
 * Draws the cluster map: one square per cell of the virtual disk, coloured by where its bytes come from, with a
 * legend that counts each kind and a hover line naming the offsets under the pointer.
 */
import { Cell, type ClusterMap } from './protocol.js';
import { formatBytes } from './format.js';

const KINDS = [
  { state: Cell.Zero, label: 'Empty (reads as zeros)', color: '#e6e8ec' },
  { state: Cell.Base, label: 'Base image, not read yet', color: '#a9c4f5' },
  { state: Cell.BaseRead, label: 'Base image, read by the guest', color: '#2563eb' },
  { state: Cell.Overlay, label: 'Written by you (overlay)', color: '#f59e0b' },
] as const;

export class MapView {
  private map: ClusterMap = { cellSize: 65536, cells: new Uint8Array(0) };
  private columns = 1;
  private cellPixels = 4;
  private readonly context: CanvasRenderingContext2D;
  private legendDirty = true;

  constructor(
    private readonly canvas: HTMLCanvasElement,
    private readonly legend: HTMLElement,
    private readonly hover: HTMLElement,
    private readonly scale: HTMLElement,
  ) {
    this.context = canvas.getContext('2d')!;
    canvas.addEventListener('mousemove', (event) => this.describe(event));
    canvas.addEventListener('mouseleave', () => (this.hover.textContent = 'Point at the map to see what a region holds.'));
  }

  show(map: ClusterMap): void {
    this.map = { cellSize: map.cellSize, cells: map.cells.slice() };
    this.layout();
    this.drawAll();
  }

  /** Applies (index, state) pairs from the Worker and repaints only those cells. */
  apply(changes: Uint32Array): void {
    for (let i = 0; i + 1 < changes.length; i += 2) {
      const index = changes[i]!;
      if (index >= this.map.cells.length) continue;
      this.map.cells[index] = changes[i + 1]!;
      this.drawCell(index);
    }
    this.legendDirty = true;
    this.updateLegend();
  }

  /** Square-ish cells that fill the canvas width; the canvas height follows the cell count. */
  private layout(): void {
    const count = this.map.cells.length;
    const width = 320;
    this.cellPixels = Math.max(2, Math.min(16, Math.floor(Math.sqrt((width * 220) / Math.max(1, count)))));
    this.columns = Math.max(1, Math.floor(width / this.cellPixels));
    const rows = Math.ceil(count / this.columns);
    this.canvas.width = this.columns * this.cellPixels;
    this.canvas.height = Math.max(this.cellPixels, rows * this.cellPixels);
    this.scale.textContent = `· each square is ${formatBytes(this.map.cellSize)} of ${formatBytes(count * this.map.cellSize)}`;
  }

  private drawAll(): void {
    this.context.clearRect(0, 0, this.canvas.width, this.canvas.height);
    for (let i = 0; i < this.map.cells.length; i++) this.drawCell(i);
    this.legendDirty = true;
    this.updateLegend();
  }

  private drawCell(index: number): void {
    const kind = KINDS[this.map.cells[index]!] ?? KINDS[0];
    const x = (index % this.columns) * this.cellPixels;
    const y = Math.floor(index / this.columns) * this.cellPixels;
    const gap = this.cellPixels >= 5 ? 1 : 0;
    this.context.fillStyle = kind.color;
    this.context.fillRect(x, y, this.cellPixels - gap, this.cellPixels - gap);
  }

  private updateLegend(): void {
    if (!this.legendDirty) return;
    this.legendDirty = false;
    const counts = [0, 0, 0, 0];
    for (const state of this.map.cells) counts[state] = (counts[state] ?? 0) + 1;
    this.legend.replaceChildren(
      ...KINDS.map((kind) => {
        const item = document.createElement('li');
        item.dataset.kind = String(kind.state);
        const swatch = document.createElement('span');
        swatch.className = 'swatch';
        swatch.style.background = kind.color;
        const label = document.createElement('span');
        label.textContent = kind.label;
        const amount = document.createElement('span');
        amount.className = 'amount';
        amount.textContent = formatBytes(counts[kind.state]! * this.map.cellSize);
        item.append(swatch, label, amount);
        return item;
      }),
    );
  }

  private describe(event: MouseEvent): void {
    const rect = this.canvas.getBoundingClientRect();
    const x = ((event.clientX - rect.left) / rect.width) * this.canvas.width;
    const y = ((event.clientY - rect.top) / rect.height) * this.canvas.height;
    const index = Math.floor(y / this.cellPixels) * this.columns + Math.floor(x / this.cellPixels);
    if (index < 0 || index >= this.map.cells.length) return;
    const start = index * this.map.cellSize;
    const kind = KINDS[this.map.cells[index]!] ?? KINDS[0];
    this.hover.textContent = `${formatBytes(start)} – ${formatBytes(start + this.map.cellSize)}: ${kind.label.toLowerCase()}`;
  }
}

/**
 * Fixed-size blocks of a read-only remote file, kept under a byte budget with least-recently-used eviction.
 * A Map iterates in insertion order, so re-inserting on every hit makes its first key the LRU victim.
 */
export class BlockCache {
  private readonly blocks = new Map<number, Uint8Array>();
  private used = 0;

  constructor(private readonly budget: number) {}

  /** Bytes currently held. */
  get bytes(): number {
    return this.used;
  }

  get(index: number): Uint8Array | undefined {
    const block = this.blocks.get(index);
    if (block) {
      this.blocks.delete(index);
      this.blocks.set(index, block);
    }
    return block;
  }

  has(index: number): boolean {
    return this.blocks.has(index);
  }

  set(index: number, block: Uint8Array): void {
    const old = this.blocks.get(index);
    if (old) {
      this.used -= old.length;
      this.blocks.delete(index);
    }
    // A block larger than the whole budget is still handed to the reader that asked, just never kept.
    if (block.length > this.budget) return;
    this.blocks.set(index, block);
    this.used += block.length;
    for (const [victim, bytes] of this.blocks) {
      if (this.used <= this.budget) break;
      this.blocks.delete(victim);
      this.used -= bytes.length;
    }
  }

  clear(): void {
    this.blocks.clear();
    this.used = 0;
  }
}

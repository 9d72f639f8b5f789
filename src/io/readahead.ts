/**
 * Adaptive readahead: while reads continue where the previous one ended, each miss fetches a window past the
 * demand that doubles up to a maximum; any jump elsewhere drops the window back to nothing. A boot reads its
 * kernel and initrd sequentially (large windows pay off) and then seeks around (readahead would waste bytes).
 */
export interface ReadaheadOptions {
  /** First window after a sequential miss, in bytes (0 disables readahead). */
  initial: number;
  /** Largest window, in bytes. */
  max: number;
}

export class Readahead {
  private lastEnd = -1;
  private window = 0;
  private wasSequential = false;

  constructor(private readonly options: ReadaheadOptions) {}

  /**
   * Notes a read of [offset, end) and returns how many bytes past `end` to fetch when it misses. A read is
   * sequential when it starts within `slack` bytes of where the previous one ended (either side: a filesystem
   * re-reading the last sector, or skipping a few, is still streaming).
   */
  next(offset: number, end: number, miss: boolean, slack: number): number {
    const sequential = this.lastEnd >= 0 && offset >= this.lastEnd - slack && offset <= this.lastEnd + slack;
    this.lastEnd = sequential ? Math.max(this.lastEnd, end) : end;
    this.wasSequential = sequential;
    if (!sequential) {
      this.window = 0;
      return 0;
    }
    if (!miss || this.options.initial <= 0) return 0;
    this.window = this.window === 0 ? this.options.initial : Math.min(this.options.max, this.window * 2);
    return this.window;
  }

  /** Whether the read last noted continued the one before it. */
  get sequential(): boolean {
    return this.wasSequential;
  }

  /** The current window, for stats. */
  get current(): number {
    return this.window;
  }
}

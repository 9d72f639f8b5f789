/**
 * Separates what a long main-thread task cost the page from what the machine cost it. The Long Tasks API gives a
 * task's wall time; on a shared two-core machine most of that can be time the renderer's main thread spent
 * runnable but waiting for a CPU that other processes held (traced: a 486 ms first frame with 24 ms on a CPU, a
 * 180 ms paint with 1 ms). Linux counts that wait per thread in /proc/PID/task/TID/schedstat (time on a CPU,
 * time waiting on a run queue, in ns); sampling it for every renderer process of this test's browser lets a test
 * subtract exactly that wait and hold the rest - running plus any time the page itself blocked - to a limit.
 */
import { readdirSync, readFileSync } from 'node:fs';

interface Sample {
  /** Epoch milliseconds (same clock as a page's performance.timeOrigin + startTime). */
  at: number;
  runNs: number;
  waitNs: number;
}

export interface TaskCost {
  start: number;
  wall: number;
  /** Wall time minus the run-queue wait that certainly fell inside the task: the page's own share. */
  own: number;
  waited: number;
}

const SAMPLE_MS = 5;
/** New renderers (a navigation may start one) are found within this; their first task is the page's first frame. */
const RESCAN_MS = 20;

function now(): number {
  return performance.timeOrigin + performance.now();
}

function read(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return undefined;
  }
}

/** Processes descended from `root` (through every thread's children list: Chromium forks from helper threads). */
function descendants(root: number): number[] {
  const out: number[] = [];
  const walk = (pid: number) => {
    let tids: string[];
    try {
      tids = readdirSync(`/proc/${pid}/task`);
    } catch {
      return;
    }
    for (const tid of tids) {
      for (const child of (read(`/proc/${pid}/task/${tid}/children`) ?? '').split(' ').filter(Boolean).map(Number)) {
        out.push(child);
        walk(child);
      }
    }
  };
  walk(root);
  return out;
}

export class MainThreadSampler {
  private readonly samples = new Map<number, Sample[]>();
  private renderers: number[] = [];
  private readonly timers: Array<ReturnType<typeof setInterval>> = [];

  /** Whether this system can tell (Linux with schedstat); elsewhere tests fall back to wall time. */
  static get available(): boolean {
    return read(`/proc/${process.pid}/schedstat`) !== undefined;
  }

  start(): void {
    this.rescan();
    this.timers.push(setInterval(() => this.rescan(), RESCAN_MS), setInterval(() => this.sample(), SAMPLE_MS));
  }

  stop(): void {
    for (const timer of this.timers) clearInterval(timer);
    this.sample();
  }

  /** Renderer processes of browsers this Node process launched. */
  private rescan(): void {
    this.renderers = descendants(process.pid).filter((pid) => (read(`/proc/${pid}/cmdline`) ?? '').includes('--type=renderer'));
  }

  private sample(): void {
    const at = now();
    for (const pid of this.renderers) {
      // A renderer's main thread has the process's id.
      const fields = read(`/proc/${pid}/task/${pid}/schedstat`)?.trim().split(' ');
      if (!fields) continue;
      const list = this.samples.get(pid) ?? this.samples.set(pid, []).get(pid)!;
      list.push({ at, runNs: Number(fields[0]), waitNs: Number(fields[1]) });
    }
  }

  /** The renderer that runs the app: the one whose process has dedicated worker threads (the app starts two). */
  appRenderer(): number {
    const candidates = this.renderers.filter((pid) => {
      try {
        return readdirSync(`/proc/${pid}/task`).some((tid) => (read(`/proc/${pid}/task/${tid}/comm`) ?? '').startsWith('DedicatedWorker'));
      } catch {
        return false;
      }
    });
    if (candidates.length !== 1) throw new Error(`expected one renderer with worker threads, found ${candidates.length} (${candidates.join(', ')})`);
    return candidates[0]!;
  }

  /**
   * Splits a task (epoch ms start, wall ms) of `pid`'s main thread. Only run-queue wait that surely lies inside
   * the task is subtracted: the wait counted between the samples around it, less the time those samples lie
   * outside it (Linux adds a wait when the thread gets a CPU back, which a running task always does before it ends).
   */
  cost(pid: number, start: number, wall: number): TaskCost {
    const list = this.samples.get(pid) ?? [];
    const end = start + wall;
    let before: Sample | undefined;
    for (const sample of list) if (sample.at <= start) before = sample;
    const after = list.find((s) => s.at >= end);
    let waited = 0;
    if (before && after) {
      const margin = start - before.at + (after.at - end);
      waited = Math.max(0, (after.waitNs - before.waitNs) / 1e6 - margin);
    }
    waited = Math.min(waited, wall);
    return { start, wall: Math.round(wall), own: Math.round(wall - waited), waited: Math.round(waited) };
  }
}

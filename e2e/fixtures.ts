/**
 * Playwright fixtures for the tab: a server per worker (dev or nginx, from the project's metadata), and helpers
 * that read the guest's serial console from the DOM (xterm.js's DOM renderer puts the text there).
 */
import { basename } from 'node:path';
import { test as base, expect, type BrowserContext, type Page } from '@playwright/test';
import { startServer, type Server, type ServerKind } from './servers.js';
import { MainThreadSampler, type TaskCost } from './main-thread.js';

export { expect };

/**
 * The page asks before it goes away while guest writes are unsaved (beforeunload). Tests reload on purpose (a
 * reload is a power cut for the guest), so every page of the test's context accepts that question unless the
 * test says otherwise; each question is counted.
 */
export class LeavePrompts {
  answer: 'accept' | 'dismiss' = 'accept';
  /** The URL of the page each time it asked. */
  readonly asked: string[] = [];

  watch(context: BrowserContext): void {
    context.on('dialog', (dialog) => {
      if (dialog.type() !== 'beforeunload') return;
      this.asked.push(dialog.page()?.url() ?? '');
      void (this.answer === 'accept' ? dialog.accept() : dialog.dismiss());
    });
  }
}

export const test = base.extend<{ longTasks: LongTasks; leavePrompts: LeavePrompts }, { server: Server }>({
  leavePrompts: async ({ context }, use) => {
    const prompts = new LeavePrompts();
    prompts.watch(context);
    await use(prompts);
  },
  // Every test gets the prompt handling, whether it names the fixture or not.
  page: async ({ page, leavePrompts }, use) => {
    void leavePrompts;
    await use(page);
  },
  server: [
    async ({}, use, workerInfo) => {
      const kind = (workerInfo.project.metadata as { server?: ServerKind }).server ?? 'dev';
      const server = await startServer(kind);
      await use(server);
      await server.close();
    },
    { scope: 'worker', timeout: 180_000 },
  ],
  longTasks: async ({ context }, use) => {
    // Records every main-thread task over 50 ms (the Long Tasks API) in each page of the context, on the epoch clock.
    await context.addInitScript(() => {
      const tasks: Array<{ start: number; duration: number }> = [];
      (window as unknown as { __longTasks: typeof tasks }).__longTasks = tasks;
      new PerformanceObserver((list) => {
        for (const entry of list.getEntries()) tasks.push({ start: performance.timeOrigin + entry.startTime, duration: entry.duration });
      }).observe({ type: 'longtask', buffered: true });
      // Long animation frames name the scripts that ran in them: kept to explain a long task when one shows up.
      const frames: unknown[] = [];
      (window as unknown as { __longFrames: unknown[] }).__longFrames = frames;
      try {
        new PerformanceObserver((list) => {
          for (const entry of list.getEntries() as unknown as Array<{ startTime: number; duration: number; blockingDuration: number; renderStart: number; styleAndLayoutStart: number; scripts: Array<{ invoker: string; sourceURL: string; sourceFunctionName: string; duration: number; forcedStyleAndLayoutDuration: number }> }>) {
            if (entry.blockingDuration < 100) continue;
            const end = entry.startTime + entry.duration;
            frames.push({
              at: Math.round(entry.startTime), duration: Math.round(entry.duration), blocking: Math.round(entry.blockingDuration),
              render: entry.renderStart ? Math.round(end - entry.renderStart) : 0,
              styleAndLayout: entry.styleAndLayoutStart ? Math.round(end - entry.styleAndLayoutStart) : 0,
              scripts: entry.scripts.map((s) => `${s.invoker} ${s.sourceFunctionName}@${s.sourceURL.split('/').pop()} ${Math.round(s.duration)}ms`),
            });
          }
        }).observe({ type: 'long-animation-frame', buffered: true });
      } catch {}
    });
    const sampler = MainThreadSampler.available ? new MainThreadSampler() : undefined;
    sampler?.start();
    await use(new LongTasks(sampler));
    sampler?.stop();
  },
});

export class LongTasks {
  constructor(private readonly sampler: MainThreadSampler | undefined) {}

  /**
   * The page's long tasks so far. Where Linux says how long the renderer's main thread waited for a CPU during
   * each (see main-thread.ts), `own` is the wall time less that wait; elsewhere it is the wall time.
   */
  async of(page: Page): Promise<TaskCost[]> {
    const tasks = await page.evaluate(() => (window as unknown as { __longTasks?: Array<{ start: number; duration: number }> }).__longTasks ?? []);
    const pid = this.sampler?.appRenderer();
    return tasks.map((task) =>
      pid !== undefined && this.sampler
        ? this.sampler.cost(pid, task.start, task.duration)
        : { start: task.start, wall: Math.round(task.duration), own: Math.round(task.duration), waited: 0 },
    );
  }

  /** The long animation frames seen so far, with the scripts that ran in each (for the failure message). */
  async frames(page: Page): Promise<string> {
    return page.evaluate(() => JSON.stringify((window as unknown as { __longFrames?: unknown[] }).__longFrames ?? []));
  }
}

/** The console's visible text, rows joined by newlines (non-breaking spaces made plain). */
export async function consoleText(page: Page): Promise<string> {
  return (await page.locator('#terminal .xterm-rows').innerText()).replace(/\u00a0/g, ' ');
}

/** Waits until the serial console shows `pattern`. */
export async function waitForConsole(page: Page, pattern: RegExp, timeout = 150_000): Promise<void> {
  await expect.poll(() => consoleText(page), { timeout, intervals: [250, 500, 1000] }).toMatch(pattern);
}

/** The shell prompt of the default guest (busybox ash on ttyS0): at the end of a line, or followed by a kernel
 * message printed after it. */
export const PROMPT = /[#$] *$|^[#$] \[ *\d+\.\d+\]/m;

/** Boots (or waits for) the guest in `page` until its shell prompt, and checks the page says so too. */
/** How long a boot may take: QCOW86_E2E_BOOT_MS raises it on a machine that is busy with other work. */
export const BOOT_TIMEOUT = Number(process.env.QCOW86_E2E_BOOT_MS ?? 300_000);

export async function waitForShell(page: Page): Promise<void> {
  // Fails at once, with the page's own words, when the page reports an error instead of booting on.
  await expect
    .poll(
      async () => {
        const phase = page.getByTestId('phase');
        if ((await phase.getAttribute('data-state')) === 'error') {
          throw new Error(`the page reports: ${await phase.innerText()} — ${await page.locator('#problems').innerText()}`);
        }
        return phase.innerText();
      },
      { timeout: BOOT_TIMEOUT, intervals: [500, 1000] },
    )
    .toContain('shell ready');
  await waitForConsole(page, PROMPT, 10_000);
}

/**
 * Types a command line into the serial console as a person would: types it, looks that the shell echoed all of
 * it after its prompt, and only then presses Enter. A line the shell did not get whole is erased (Ctrl+U, busybox's
 * kill-line) and typed again; each retry is recorded in the test's annotations, with what the console showed.
 * `noise`: output that may cut through the echoed line (a background job's lines), left out of the comparison.
 */
export async function run(page: Page, command: string, options: { noise?: RegExp } = {}): Promise<void> {
  await page.locator('#terminal').click();
  // Whitespace is left out: busybox wraps long lines at its own idea of the width (80 columns on a serial tty).
  const compact = (text: string) => text.replace(/\s+/g, '');
  const wanted = compact(command);
  /** The line ends with the whole command, right after a prompt or at the start of a line (a resumed session
   * shows no prompt: it was printed before the save). */
  const typedLine = async () => {
    let text = await consoleText(page);
    if (options.noise) text = text.replace(options.noise, '');
    const lines = text.trimEnd().split('\n');
    let tail = '';
    while (lines.length && tail.length < wanted.length) tail = compact(lines.pop()!) + tail;
    if (!tail.endsWith(wanted)) return false;
    const before = tail.slice(0, tail.length - wanted.length);
    return before === '' || before.endsWith('#') || before.endsWith('$');
  };
  for (let attempt = 1; ; attempt++) {
    await page.keyboard.type(command, { delay: 5 });
    const echoed = await expect
      .poll(typedLine, { timeout: 20_000, intervals: [100, 250, 500] })
      .toBe(true)
      .then(() => true, () => false);
    if (echoed) break;
    const shown = (await consoleText(page)).split('\n').filter((line) => line.trim()).slice(-3).join(' | ');
    if (attempt === 3) throw new Error(`the shell did not echo the typed line \`${command}\` in three tries; the console ends: ${shown}`);
    const note = `\`${command}\` (try ${attempt}); the console ended: ${shown}`;
    test.info().annotations.push({ type: 'retyped', description: note });
    console.log(`retyped ${note}`);
    await page.keyboard.press('Control+U');
    await page.waitForTimeout(500);
  }
  await page.keyboard.press('Enter');
}

/**
 * Open overlay with `file` (the file picker), confirming that it replaces the disk stored in the browser: the page
 * checks the file first and asks only about one it can open.
 */
export async function openOverlayFile(page: Page, file: string): Promise<void> {
  await page.locator('#open-file').setInputFiles(file);
  const dialog = page.locator('dialog');
  await expect(dialog).toContainText(`Replace this disk with ${basename(file)}?`);
  await dialog.getByRole('button', { name: 'Replace disk' }).click();
}

/** The names in the tab's OPFS directory of overlays, sorted. */
export async function storedFiles(page: Page): Promise<string[]> {
  return page.evaluate(async () => {
    const dir = await (await navigator.storage.getDirectory()).getDirectoryHandle('qcow86', { create: true });
    const names: string[] = [];
    for await (const name of (dir as unknown as { keys(): AsyncIterable<string> }).keys()) names.push(name);
    return names.sort();
  });
}

/** Waits until every guest write has been flushed to OPFS (the status panel says so). */
export async function waitSaved(page: Page): Promise<void> {
  await expect(page.getByTestId('overlay-saved')).toHaveText(/all saved/, { timeout: 30_000 });
}

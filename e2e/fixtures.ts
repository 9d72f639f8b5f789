/**
 * Playwright fixtures for the tab: a server per worker (dev or nginx, from the project's metadata), and helpers
 * that read the guest's serial console from the DOM (xterm.js's DOM renderer puts the text there).
 */
import { test as base, expect, type Page } from '@playwright/test';
import { startServer, type Server, type ServerKind } from './servers.js';

export { expect };

export const test = base.extend<{ longTasks: LongTasks }, { server: Server }>({
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
    // Records every main-thread task over 50 ms (the Long Tasks API) in each page of the context.
    await context.addInitScript(() => {
      const tasks: number[] = [];
      (window as unknown as { __longTasks: number[] }).__longTasks = tasks;
      new PerformanceObserver((list) => {
        for (const entry of list.getEntries()) tasks.push(entry.duration);
      }).observe({ type: 'longtask', buffered: true });
      // Long animation frames name the scripts that ran in them: kept to explain a long task when one shows up.
      const frames: unknown[] = [];
      (window as unknown as { __longFrames: unknown[] }).__longFrames = frames;
      try {
        new PerformanceObserver((list) => {
          for (const entry of list.getEntries() as unknown as Array<{ startTime: number; duration: number; blockingDuration: number; scripts: Array<{ invoker: string; sourceURL: string; sourceFunctionName: string; duration: number; forcedStyleAndLayoutDuration: number }> }>) {
            if (entry.blockingDuration < 100) continue;
            frames.push({
              at: Math.round(entry.startTime), duration: Math.round(entry.duration), blocking: Math.round(entry.blockingDuration),
              scripts: entry.scripts.map((s) => `${s.invoker} ${s.sourceFunctionName}@${s.sourceURL.split('/').pop()} ${Math.round(s.duration)}ms`),
            });
          }
        }).observe({ type: 'long-animation-frame', buffered: true });
      } catch {}
    });
    await use(new LongTasks());
  },
});

export class LongTasks {
  async of(page: Page): Promise<number[]> {
    return page.evaluate(() => (window as unknown as { __longTasks?: number[] }).__longTasks ?? []);
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

/** The shell prompt of the default guest (busybox ash on ttyS0), at the end of a line. */
export const PROMPT = /[#$] *$/m;

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

/** Types a command line into the serial console. */
export async function run(page: Page, command: string): Promise<void> {
  await page.locator('#terminal').click();
  await page.keyboard.type(command, { delay: 5 });
  await page.keyboard.press('Enter');
}

/** Waits until every guest write has been flushed to OPFS (the status panel says so). */
export async function waitSaved(page: Page): Promise<void> {
  await expect(page.getByTestId('overlay-saved')).toHaveText(/all saved/, { timeout: 30_000 });
}

/**
 * Sessions through the tab (issue 8): a counter runs in the guest, Save session stores the machine in the
 * overlay; after a reload the page offers to resume and the counter continues from its saved value without a
 * boot; the downloaded overlay lists the session in qemu-img, checks clean, resumes in `qcow86 boot --resume`,
 * and, opened in a fresh profile, offers to resume there too. One guest boot in all.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Page } from '@playwright/test';
import { test, expect, consoleText, openOverlayFile, run, waitForConsole, waitForShell, waitSaved } from './fixtures.js';
import { ROOT } from './servers.js';
import { buildEngine } from '../test/helpers/build.js';

/** `qcow86 ARGS` from a private build of src/ (dist/ may be stale or missing in a fresh clone). */
function qcow86(args: string[], cwd: string): string {
  const dist = buildEngine();
  // machine-assets.ts finds the BIOS in ../../public/images relative to the compiled file.
  const publicDir = resolve(dist, '../public');
  if (!existsSync(publicDir)) symlinkSync(join(ROOT, 'public'), publicDir);
  const script = 'const { main } = await import(process.argv[1]); process.exitCode = await main(process.argv.slice(2));';
  return execFileSync(process.execPath, ['--input-type=module', '-e', script, join(dist, 'node/cli.js'), ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], cwd });
}

const COUNTER = 'i=0; while true; do i=$((i+1)); echo $i > /c; echo C=$i; sleep 1; done &';
/** The counter's lines, which may cut through a line being typed. */
const COUNTER_LINES = /C=\d+/g;
/** What only a boot prints on the serial console (the kernel, init, the boot loader). */
const BOOT_OUTPUT = /Linux version|SYSLINUX|ISOLINUX|Run \/init|Booting the kernel|Freeing unused/;

async function counts(page: Page): Promise<number[]> {
  return [...(await consoleText(page)).matchAll(/C=(\d+)/g)].map((m) => Number(m[1]));
}

async function lastCount(page: Page): Promise<number> {
  const all = await counts(page);
  expect(all.length).toBeGreaterThan(0);
  return all.at(-1)!;
}

/** Accepts the page's resume offer and returns the first counter value the resumed guest prints. */
async function acceptResume(page: Page, title: RegExp): Promise<number> {
  const dialog = page.locator('dialog');
  await expect(dialog).toBeVisible();
  await expect(dialog).toContainText(title);
  await expect(dialog).toContainText(/disk changes .* discarded/);
  await dialog.getByRole('button', { name: "Resume 'counter'" }).click();
  await expect.poll(() => counts(page), { timeout: 180_000 }).not.toEqual([]);
  await expect(page.getByTestId('phase')).toContainText("resumed session 'counter'");
  return (await counts(page))[0]!;
}

/**
 * After a resume: the counter counts on in steps of one, the file agrees with it, the later file is gone, and the
 * guest's disk is on the bus the session was saved on.
 */
async function checkContinues(page: Page, first: number, bus: 'virtio' | 'ide' = 'virtio'): Promise<void> {
  await waitForConsole(page, new RegExp(`C=${first + 2}\\b`), 30_000);
  // The shell prints F=<file>; the typed line shows F=$(cat /c) (and the counter's lines may cut through it).
  // DISK= names the disk the resumed guest has: vda on virtio, sda on IDE.
  await run(page, 'echo F=$(cat /c); ls /after-save; echo DISK=$(cd /sys/block && echo [sv]da); echo DONE$((1+1))', { noise: COUNTER_LINES });
  await waitForConsole(page, /DONE2/, 30_000);
  const text = await consoleText(page);
  expect(text).not.toMatch(BOOT_OUTPUT);
  expect(text).toMatch(bus === 'virtio' ? /DISK=vda\b/ : /DISK=sda\b/);
  await expect(page.getByTestId('disk-bus')).toHaveValue(bus);
  // Counting on in steps of one (the console shows its last rows: the first value may have scrolled away).
  const values = [...text.matchAll(/C=(\d+)/g)].map((m) => Number(m[1]));
  expect(values[0]).toBeGreaterThanOrEqual(first);
  expect(values).toEqual(values.map((_, i) => values[0]! + i));
  const file = /F=(\d+)/.exec(text);
  expect(file, text).not.toBeNull();
  const countsIn = (part: string) => [...part.matchAll(/C=(\d+)/g)].map((m) => Number(m[1]));
  // `echo $i > /c` runs just before `echo C=$i`: when `cat /c` runs, the file holds the last printed value or the
  // next one. The counter may print again between the cat and the shell's echo of F=, so the value read lies
  // between the last one printed before the command line and one past the last printed before F=.
  const typed = text.lastIndexOf('echo F=$(cat /c)', file!.index);
  expect(typed, text).toBeGreaterThanOrEqual(0);
  const beforeCommand = countsIn(text.slice(0, typed));
  const printed = countsIn(text.slice(0, file!.index));
  const read = Number(file![1]);
  if (beforeCommand.length) expect(read, text).toBeGreaterThanOrEqual(beforeCommand.at(-1)!);
  expect(read, text).toBeLessThanOrEqual(printed.at(-1)! + 1);
  expect(text.slice(file!.index)).toMatch(/after-save: No such file or directory/);
}

/** The one boot of this test: on a loaded shared machine it can take longer than the fixture's limit. */
async function waitForFirstShell(page: Page): Promise<void> {
  await expect
    .poll(async () => {
      const phase = page.getByTestId('phase');
      if ((await phase.getAttribute('data-state')) === 'error') throw new Error(`the page reports: ${await phase.innerText()}`);
      return phase.innerText();
    }, { timeout: 900_000, intervals: [1000] })
    .toContain('shell ready');
  await waitForShell(page);
}

test('save a session, resume it after a reload, download it, resume it in qcow86 and in a fresh profile', async ({ page, server, browser }, testInfo) => {
  test.setTimeout(1_800_000);
  await page.goto(server.url);
  await waitForFirstShell(page);
  await run(page, COUNTER);
  await waitForConsole(page, /C=3\b/);

  // The saved value lies between what the console showed before the save and right after it.
  const before = await lastCount(page);
  await page.locator('#session-name').fill('counter');
  await page.getByRole('button', { name: /Save session/ }).click();
  await expect(page.getByTestId('session-status')).toContainText("Session 'counter' saved", { timeout: 120_000 });
  const after = await lastCount(page);
  const listed = page.getByTestId('session-list').locator('li[data-session="counter"]');
  await expect(listed).toContainText(/\d+(\.\d+)? (KiB|MiB)/);
  await page.screenshot({ path: testInfo.outputPath('session-saved.png') });

  // The guest runs on and changes the disk after the save: a resume must discard that.
  await run(page, 'echo later > /after-save; sync; echo synced-$((40+2))', { noise: COUNTER_LINES });
  await waitForConsole(page, /synced-42/);
  await waitForConsole(page, new RegExp(`C=${after + 4}\\b`));
  await waitSaved(page);

  await page.reload();
  const first = await acceptResume(page, /Resume your saved session/);
  expect(first).toBeGreaterThanOrEqual(before + 1);
  expect(first).toBeLessThanOrEqual(after + 1);
  await checkContinues(page, first);
  await page.screenshot({ path: testInfo.outputPath('session-resumed.png') });

  const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: /Download overlay/ }).click()]);
  const dir = mkdtempSync(join(tmpdir(), 'qcow86-e2e-session-'));
  try {
    const file = join(dir, download.suggestedFilename());
    await download.saveAs(file);
    const list = execFileSync('qemu-img', ['snapshot', '-l', file], { encoding: 'utf8' });
    const line = list.split('\n').find((l) => l.split(/\s+/)[1] === 'counter');
    expect(line, list).toBeDefined();
    expect(line).toMatch(/\s\d+(\.\d+)? (KiB|MiB)\s/);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', file], { encoding: 'utf8' })) as { snapshots: Array<{ name: string; 'vm-state-size': number }> };
    expect(info.snapshots.find((s) => s.name === 'counter')!['vm-state-size']).toBeGreaterThan(100_000);
    // check opens the whole chain: the base through QEMU's curl driver over the same server.
    execFileSync('qemu-img', ['check', file], { encoding: 'utf8' });

    // The CLI resumes the session the tab saved (its 64 MiB machine, the base over HTTP).
    const cli = qcow86(['boot', '--overlay', file, '--resume', 'counter', '--timeout', '120', '--expect', 'C=', '--send', 'cat /c; echo CLI$((1+1))\n', '--expect', 'CLI2'], dir);
    const cliCounts = [...cli.matchAll(/C=(\d+)/g)].map((m) => Number(m[1]));
    expect(cliCounts[0]).toBeGreaterThanOrEqual(before + 1);
    expect(cliCounts[0]).toBeLessThanOrEqual(after + 1);
    expect(cli).not.toMatch(BOOT_OUTPUT);

    // A fresh profile: opening the file offers its session, and the machine continues from it.
    const fresh = await browser.newContext();
    try {
      const other = await fresh.newPage();
      await other.goto(server.url);
      await expect(other.getByRole('button', { name: /Open overlay/ })).toBeEnabled({ timeout: 120_000 });
      await openOverlayFile(other, file);
      const resumedFirst = await acceptResume(other, /Resume the session saved in/);
      expect(resumedFirst).toBeGreaterThanOrEqual(before + 1);
      expect(resumedFirst).toBeLessThanOrEqual(after + 1);
      await checkContinues(other, resumedFirst);
    } finally {
      await fresh.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a session saved by qcow86 boot with another memory size and on IDE resumes in the tab, in a machine of that size and bus', async ({ page, server }) => {
  test.setTimeout(1_200_000);
  const dir = mkdtempSync(join(tmpdir(), 'qcow86-e2e-cli-session-'));
  try {
    // The CLI boots on the tab's base over HTTP, starts the counter and saves a 192 MiB machine with its disk on
    // IDE (the tab's own machines have 64 MiB, on virtio by default); v86 restores a state only into a machine of
    // the size it was saved with, and the session's guest has its disk on the bus it was saved on.
    const file = join(dir, 'cli-session.qcow2');
    const base = new URL('/images/base.qcow2', server.url).href;
    qcow86(['boot', '--base', base, '--overlay', file, '--memory', '192M', '--disk-bus', 'ide', '--timeout', '600', '--expect', '# ', '--send', `${COUNTER}\n`, '--expect', 'C=3', '--save-on-exit', 'counter'], dir);
    await page.goto(server.url);
    await expect(page.getByRole('button', { name: /Open overlay/ })).toBeEnabled({ timeout: 120_000 });
    await openOverlayFile(page, file);
    const first = await acceptResume(page, /Resume the session saved in/);
    expect(first).toBeGreaterThanOrEqual(3);
    await checkContinues(page, first, 'ide');
    await run(page, 'grep MemTotal /proc/meminfo; echo MEM$((1+1))', { noise: COUNTER_LINES });
    await waitForConsole(page, /MEM2/, 30_000);
    const total = Number(/MemTotal:\s+(\d+) kB/.exec(await consoleText(page))?.[1]);
    // A 192 MiB machine shows well over 128 MiB to the guest (a 64 MiB one under 64).
    expect(total).toBeGreaterThan(150_000);

    // A link naming the session (as the page's own reload above did, but without this tab's confirmation) never
    // reverts the disk by itself: the page asks, and 'Start normally' boots the disk as it is.
    const id = execFileSync('qemu-img', ['snapshot', '-l', file], { encoding: 'utf8' })
      .split('\n')
      .find((line) => line.split(/\s+/)[1] === 'counter')!
      .split(/\s+/)[0]!;
    await page.goto(`${server.url}?resume-session=${id}`);
    const dialog = page.locator('dialog');
    await expect(dialog).toBeVisible();
    await expect(dialog).toContainText("Resume session 'counter'?");
    await expect(dialog).toContainText('The address of this page asks to resume the saved session');
    await expect(page).not.toHaveURL(/resume-session/);
    await dialog.getByRole('button', { name: 'Start normally' }).click();
    await waitForConsole(page, /SYSLINUX/, 120_000);
    expect(await consoleText(page)).not.toMatch(/C=\d+/);
    await expect(page.getByTestId('phase')).not.toContainText('resumed');
    await expect(page.getByTestId('session-list').locator('li[data-session="counter"]')).toBeVisible();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

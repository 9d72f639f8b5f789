/**
 * The tab on a full storage, in a browser profile on disk (where Chromium enforces a site's quota on OPFS writes
 * with a real QuotaExceededError; the quota is lowered through the DevTools protocol, a deterministic stand-in for
 * a full disk). First the overlay's writes need the room the base's kept blocks take: those are deleted and the
 * writes go through. Then nothing is left to delete: the page says what to do, leaving the page asks first (the
 * writes that did not fit are unsaved), and Download overlay still hands out the disk as last saved, which QEMU
 * checks clean. The page also shows that the browser granted persistent storage. One guest boot.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Page } from '@playwright/test';
import { test, expect, LeavePrompts, run, waitForConsole, waitForShell, waitSaved } from './fixtures.js';

const MiB = 1024 * 1024;

/** Sizes of the base blocks kept in OPFS, by file. */
function keptBlocks(page: Page): Promise<number[]> {
  return page.evaluate(async () => {
    const dir = await (await navigator.storage.getDirectory()).getDirectoryHandle('qcow86-base-blocks', { create: true });
    const sizes: number[] = [];
    for await (const handle of (dir as unknown as { values(): AsyncIterable<FileSystemFileHandle> }).values()) sizes.push((await handle.getFile()).size);
    return sizes;
  });
}

function usage(page: Page): Promise<number> {
  return page.evaluate(async () => (await navigator.storage.estimate()).usage ?? 0);
}

test('storage full: kept base blocks make room first; then the page says what to do, asks before leaving, and Download still works', async ({ playwright, launchOptions, server }) => {
  test.setTimeout(900_000);
  const profile = mkdtempSync(join(tmpdir(), 'qcow86-e2e-profile-'));
  const dir = mkdtempSync(join(tmpdir(), 'qcow86-e2e-storage-'));
  const context = await playwright.chromium.launchPersistentContext(profile, { ...launchOptions, acceptDownloads: true, viewport: { width: 1400, height: 900 } });
  try {
    const prompts = new LeavePrompts();
    prompts.watch(context);
    const page = context.pages()[0] ?? (await context.newPage());
    const origin = new URL(server.url).origin;
    const cdp = await context.newCDPSession(page);
    await cdp.send('Browser.setPermission', { permission: { name: 'persistent-storage' }, setting: 'granted', origin });
    await page.goto(server.url);
    await expect(page.getByTestId('persistence')).toHaveText(/^persistent: the browser keeps this disk/);
    await waitForShell(page);
    await waitSaved(page);

    // The overlay may grow by 1 MiB only; the guest writes 3 MiB. The kept blocks (more than that) give way.
    const kept = await keptBlocks(page);
    expect(kept.length).toBe(1);
    expect(kept[0]).toBeGreaterThan(3 * MiB);
    await cdp.send('Storage.overrideQuotaForOrigin', { origin, quotaSize: (await usage(page)) + MiB });
    await run(page, 'dd if=/dev/urandom of=/fill-1 bs=65536 count=48 2>/dev/null; sync; md5sum /fill-1; echo synced-$((1 + 1))');
    await waitForConsole(page, /^synced-2/m);
    await waitSaved(page);
    await expect(page.locator('#problems')).toBeEmpty();
    expect(await keptBlocks(page)).toEqual([]);

    // Nothing left to delete: 128 KiB of room, 2 MiB written.
    await cdp.send('Storage.overrideQuotaForOrigin', { origin, quotaSize: (await usage(page)) + 128 * 1024 });
    await run(page, 'dd if=/dev/urandom of=/fill-2 bs=65536 count=32 2>/dev/null; sync; echo wrote-$((1 + 2))');
    const problem = page.locator('#problems p[data-kind="quota"]');
    await expect(problem).toContainText("The browser's storage for this site is full");
    await expect(problem).toContainText('Download overlay now: it holds the disk as last saved. Then free space');
    await expect(page.getByTestId('overlay-saved')).toHaveText(/^\d+(\.\d)? (KiB|MiB) not saved: writing failed$/);

    // Those bytes can never be saved: leaving asks first (here the answer is 'stay').
    prompts.answer = 'dismiss';
    await page.evaluate(() => location.reload());
    await expect.poll(() => prompts.asked.length).toBe(1);
    await expect(problem).toBeVisible();

    // Download reads what is stored, without the write path that failed.
    const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: /Download overlay/ }).click()]);
    const file = join(dir, 'full-overlay.qcow2');
    await download.saveAs(file);
    // qemu-img check exits 0 (clean) or 3 (leaked clusters of the write that failed: harmless); corruption is 2.
    let check: string;
    let status = 0;
    try {
      check = execFileSync('qemu-img', ['check', '--output=json', file], { encoding: 'utf8' });
    } catch (error) {
      const failed = error as { status: number; stdout: string };
      expect(failed.status, failed.stdout).toBe(3);
      ({ status, stdout: check } = failed);
    }
    expect(JSON.parse(check)).toMatchObject({ 'check-errors': 0 });
    expect(JSON.parse(check).corruptions ?? 0).toBe(0);
    // The first 3 MiB file is in it: the overlay holds at least that much guest data.
    const map = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', file], { encoding: 'utf8' })) as Array<{ length: number; depth: number; data: boolean }>;
    const own = map.filter((extent) => extent.depth === 0 && extent.data).reduce((sum, extent) => sum + extent.length, 0);
    expect(own).toBeGreaterThan(3 * MiB);
    const figures = `kept base blocks ${kept[0]} B, deleted for the first 3 MiB; download ${own} B of guest data, qemu-img check exit ${status}`;
    test.info().annotations.push({ type: 'storage', description: figures });
    console.log(figures);
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
    rmSync(dir, { recursive: true, force: true });
  }
});

/**
 * The tab's actions on one booted guest (boots are the expensive part): Open overlay by file picker and by
 * drag-and-drop refuses foreign and broken files in plain words while the guest keeps running - a file that
 * opens only read-only included, since it is opened read-write in a staging file before anything is replaced -
 * and asks before replacing the disk (Cancel changes nothing), Reset disk asks first and then really empties the
 * disk, Restart reboots, Power off stops with the disk saved and Power on boots the same disk again; with
 * nothing unsaved, a reload goes without a question.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Page } from '@playwright/test';
import { test, expect, consoleText, run, storedFiles, waitForConsole, waitForShell, waitSaved } from './fixtures.js';

/** Drops `bytes` as a file named `name` on the page, the way a person drags a file from their desktop. */
async function dropFile(page: Page, name: string, bytes: Buffer): Promise<void> {
  const transfer = await page.evaluateHandle(
    ({ name, data }) => {
      const transfer = new DataTransfer();
      transfer.items.add(new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], name));
      return transfer;
    },
    { name, data: bytes.toString('base64') },
  );
  await page.dispatchEvent('body', 'dragenter', { dataTransfer: transfer });
  await expect(page.locator('#dropzone')).toBeVisible();
  await page.dispatchEvent('body', 'drop', { dataTransfer: transfer });
  await expect(page.locator('#dropzone')).toBeHidden();
}

/** The refusal dialog: its text, then closed with OK. */
async function refusal(page: Page): Promise<string> {
  const dialog = page.locator('dialog');
  await expect(dialog).toBeVisible();
  await expect(dialog).toContainText('This overlay cannot be used here');
  const text = await dialog.innerText();
  await dialog.getByRole('button', { name: 'OK' }).click();
  await expect(dialog).toBeHidden();
  return text;
}

test('Open overlay refuses foreign and broken files, Reset disk asks first, Restart and Power off/on', async ({ page, server, leavePrompts }) => {
  const dir = mkdtempSync(join(tmpdir(), 'qcow86-e2e-actions-'));
  try {
    await page.goto(server.url);
    await waitForShell(page);
    const baseUrl = new URL('/images/base.qcow2', server.url).href;

    // A real qcow2 overlay of another base (made by qemu-img, not by us), through the file picker.
    const foreign = join(dir, 'other-overlay.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'http://elsewhere.invalid/other.qcow2', '-F', 'qcow2', foreign, '29M']);
    await page.locator('#open-file').setInputFiles(foreign);
    const foreignText = await refusal(page);
    expect(foreignText).toContain('other-overlay.qcow2 is an overlay of a different base image (http://elsewhere.invalid/other.qcow2)');
    expect(foreignText).toContain(baseUrl);

    // Not a disk image at all, dropped on the page.
    const broken = join(dir, 'notes.qcow2');
    writeFileSync(broken, 'these are some notes, not a disk image\n'.repeat(200));
    await dropFile(page, 'notes.qcow2', readFileSync(broken));
    expect(await refusal(page)).toContain('notes.qcow2 is not a qcow2 image.');

    // A whole disk (no backing file) dropped: refused as not being an overlay.
    const whole = join(dir, 'whole.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', whole, '29M']);
    await dropFile(page, 'whole.qcow2', readFileSync(whole));
    expect(await refusal(page)).toContain('whole.qcow2 has no backing file');

    // An overlay of this very base that opens read-only but not read-write (its corrupt bit is set, as QEMU
    // leaves an image it found damaged): it is opened as it will be used, in a staging file, and refused there.
    const corrupt = join(dir, 'corrupt.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', baseUrl, '-F', 'qcow2', corrupt, '30408704']);
    execFileSync('qemu-io', ['-c', 'write -P 0x5a 0 64k', corrupt]);
    const bytes = readFileSync(corrupt);
    bytes[79] = bytes[79]! | 0x02; // incompatible_features (bytes 72-79, big-endian): bit 1, corrupt
    writeFileSync(corrupt, bytes);
    execFileSync('qemu-img', ['info', '-U', corrupt]); // QEMU still reads it
    await page.locator('#open-file').setInputFiles(corrupt);
    expect(await refusal(page)).toMatch(/corrupt\.qcow2 cannot be used: .*marked corrupt/);
    expect(await storedFiles(page), 'the staging file is gone, the stored disk is the only file').toHaveLength(1);

    // The guest was not rebooted by any of this: the same shell answers.
    await expect(page.getByTestId('phase')).toContainText('shell ready');
    await run(page, 'echo still-$((40 + 2)) > /reset-marker.txt; sync; cat /reset-marker.txt');
    await waitForConsole(page, /^still-42/m);
    await waitSaved(page);

    // A good overlay of this base, dropped: the page asks before it replaces the disk (the picker's way is taken
    // in tab.spec.ts and session.spec.ts); Cancel leaves everything as it was.
    const good = join(dir, 'good.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', baseUrl, '-F', 'qcow2', good, '30408704']);
    const stored = await storedFiles(page);
    await dropFile(page, 'good.qcow2', readFileSync(good));
    const replace = page.locator('dialog');
    await expect(replace).toContainText('Replace this disk with good.qcow2?');
    await expect(replace).toContainText(/unless you download it first/);
    await replace.getByRole('button', { name: 'Cancel' }).click();
    await expect(replace).toBeHidden();
    await expect.poll(() => storedFiles(page)).toEqual(stored);

    // Reset disk: Cancel keeps everything.
    await page.getByRole('button', { name: 'Reset disk…' }).click();
    const dialog = page.locator('dialog');
    await expect(dialog).toContainText('Reset the disk?');
    await dialog.getByRole('button', { name: 'Cancel' }).click();
    await expect(dialog).toBeHidden();
    await run(page, 'cat /reset-marker.txt | sed s/still/kept/');
    await waitForConsole(page, /^kept-42/m);

    // Reset disk, confirmed: the machine reboots on an empty overlay and the file is gone.
    await page.getByRole('button', { name: 'Reset disk…' }).click();
    await dialog.getByRole('button', { name: 'Reset disk' }).click();
    await expect(page.getByTestId('phase')).not.toContainText('shell ready');
    await waitForShell(page);
    await run(page, 'ls /reset-marker.txt 2>&1 | sed s/reset-marker/gone-marker/');
    await waitForConsole(page, /gone-marker\.txt: No such file or directory/);

    // Write a file, then Restart: the console starts over with the boot loader (a real reboot).
    await run(page, 'echo power-$((6 * 7)) > /power-marker.txt; sync; echo synced-$((1 + 1))');
    await waitForConsole(page, /^synced-2/m);
    await waitSaved(page);
    await page.getByRole('button', { name: 'Restart' }).click();
    await expect.poll(() => consoleText(page), { timeout: 60_000 }).not.toMatch(/synced-2/);
    await waitForConsole(page, /SYSLINUX/, 120_000);

    // Power off (mid-boot): the page says the disk is saved; Power on boots the same disk to a shell.
    await page.getByRole('button', { name: 'Power off' }).click();
    await expect(page.getByTestId('phase')).toContainText('Powered off — the disk is saved');
    await expect(page.getByTestId('phase')).toHaveAttribute('data-state', 'off');
    const frozen = await consoleText(page);
    await page.waitForTimeout(2000);
    expect(await consoleText(page), 'a powered-off machine prints nothing').toBe(frozen);
    await page.getByRole('button', { name: 'Power on' }).click();
    await waitForShell(page);
    await run(page, 'cat /power-marker.txt');
    await waitForConsole(page, /^power-42/m);

    // Powered off, everything is saved: leaving the page asks nothing (the question is for unsaved writes, see
    // storage.spec.ts). The page says whether the browser promised to keep its storage: not in this profile.
    await expect(page.getByTestId('persistence')).toHaveText(/not persistent: the browser may evict this disk .*Download overlay/);
    await page.getByRole('button', { name: 'Power off' }).click();
    await expect(page.getByTestId('phase')).toContainText('Powered off — the disk is saved');
    await expect(page.getByTestId('overlay-saved')).toHaveText(/all saved/);
    leavePrompts.answer = 'dismiss';
    await page.reload();
    await expect(page.getByTestId('overlay-name')).toContainText('browser storage');
    expect(leavePrompts.asked).toEqual([]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

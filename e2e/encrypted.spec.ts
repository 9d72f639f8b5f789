/**
 * A disk encrypted at rest in the tab: "Encrypt disk…" turns the new disk's overlay into a LUKS qcow2 while the
 * guest runs on; the file the guest then writes is encrypted in OPFS; the cluster map and stats go on; a reload
 * asks for the passphrase (a wrong one is refused and can be tried again); the download is the encrypted file as
 * it is, which qemu-img opens with the same passphrase (check: with its base, through QEMU's curl driver; convert:
 * the overlay's own data) and which holds none of the guest's bytes in the clear. Reset disk then creates a new
 * disk encrypted with another passphrase, which qemu-img opens with that one only.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Page } from '@playwright/test';
import { test, expect, run, waitForConsole, waitForShell, waitSaved } from './fixtures.js';

const PASSPHRASE = 'tab disk passphrase';

/** Fills the passphrase dialog's field(s) and presses its button. */
async function answer(page: Page, passphrase: string, button: string): Promise<void> {
  const dialog = page.locator('dialog');
  await expect(dialog).toBeVisible();
  for (const field of await dialog.locator('input.passphrase').all()) await field.fill(passphrase);
  await dialog.getByRole('button', { name: button }).click();
}

test('Encrypt disk: LUKS in OPFS, passphrase on every open (a wrong one refused), the download opened by qemu-img with it', async ({ page, server }) => {
  await page.goto(server.url);
  await waitForShell(page);
  await expect(page.getByTestId('overlay-encryption')).toHaveText('not encrypted');
  await run(page, 'echo before-$((40 + 2)) > /before.txt; sync; echo synced-$((1 + 1))');
  await waitForConsole(page, /^synced-2/m);
  await waitSaved(page);

  // Two fields that must match; then the overlay is rewritten encrypted and the guest carries on.
  await page.locator('#encrypt').click();
  await answer(page, PASSPHRASE, 'Encrypt');
  await expect(page.getByTestId('overlay-encryption')).toContainText('encrypted (LUKS aes-256-xts-plain64)', { timeout: 120_000 });
  await expect(page.getByTestId('phase')).toContainText('shell ready');
  // The cluster map and stats read the metadata, which qcow2 does not encrypt: they go on as before.
  const overlayCells = page.locator('#map-legend li[data-kind="3"] .amount');
  await expect(overlayCells).not.toHaveText('0 B');
  await run(page, 'for i in $(seq 50); do echo secret-$((6 * 7))-text; done > /after.txt; sync; cat /before.txt');
  await waitForConsole(page, /^before-42/m);
  await waitSaved(page);

  // Reload: the passphrase is asked; a wrong one says so and asks again.
  await page.reload();
  const dialog = page.locator('dialog');
  await expect(dialog).toContainText('This disk is encrypted');
  await answer(page, 'not the passphrase', 'Open');
  await expect(dialog).toContainText('Wrong passphrase');
  await answer(page, PASSPHRASE, 'Open');
  await waitForShell(page);
  await expect(page.getByTestId('overlay-encryption')).toContainText('encrypted (LUKS');
  await run(page, 'head -n 1 /after.txt; cat /before.txt | sed s/before/kept/');
  await waitForConsole(page, /^kept-42/m);
  await waitForConsole(page, /^secret-42-text/m);
  await expect(overlayCells).not.toHaveText('0 B');
  await expect(page.getByTestId('overlay-size')).not.toHaveText('–');
  await expect(page.getByTestId('base-fetched')).not.toHaveText('–');

  // Download: the encrypted file as it is.
  const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: /Download overlay/ }).click()]);
  const dir = mkdtempSync(join(tmpdir(), 'qcow86-e2e-encrypted-'));
  try {
    const file = join(dir, download.suggestedFilename());
    await download.saveAs(file);
    expect(readFileSync(file).includes('secret-42-text')).toBe(false);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', file], { encoding: 'utf8' })) as { encrypted: boolean; 'format-specific': { data: { encrypt: Record<string, unknown> } } };
    expect(info.encrypted).toBe(true);
    expect(info['format-specific'].data.encrypt).toMatchObject({ format: 'luks', 'cipher-alg': 'aes-256', 'cipher-mode': 'xts', 'hash-alg': 'sha256' });
    const secret = ['--object', `secret,id=tab,data=${PASSPHRASE}`];
    const opts = `driver=qcow2,file.filename=${file},encrypt.key-secret=tab`;
    execFileSync('qemu-img', ['check', ...secret, '--image-opts', opts], { encoding: 'utf8' });
    // check opened the whole chain (the base through QEMU's curl driver); convert reads the overlay's own data
    // with its backing left closed (the curl driver reads a whole base too slowly for a test).
    const alone = `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: file }, 'encrypt.key-secret': 'tab', backing: null })}`;
    const raw = join(dir, 'disk.raw');
    execFileSync('qemu-img', ['convert', ...secret, '-O', 'raw', alone, raw]);
    const disk = readFileSync(raw);
    expect(disk.includes('secret-42-text')).toBe(true);
    expect(disk.includes('before-42')).toBe(true);
    // Without the passphrase qemu-img cannot read it either.
    expect(() => execFileSync('qemu-img', ['convert', '--object', 'secret,id=tab,data=nope', '-O', 'raw', alone, raw], { stdio: 'pipe' })).toThrow(/Invalid password, cannot unlock any keyslot/);

    // A disk created encrypted: Reset disk offers a new encrypted disk, with a passphrase of its own.
    await page.getByRole('button', { name: 'Reset disk…' }).click();
    await page.locator('dialog').getByRole('button', { name: 'New encrypted disk…' }).click();
    await answer(page, 'a new passphrase', 'Reset and encrypt');
    await expect(page.getByTestId('phase')).not.toContainText('shell ready');
    await waitForShell(page);
    await expect(page.getByTestId('overlay-encryption')).toContainText('encrypted (LUKS aes-256-xts-plain64)');
    await run(page, 'ls /after.txt 2>&1 | sed s/after/gone/');
    await waitForConsole(page, /gone\.txt: No such file or directory/);
    await waitSaved(page);
    const [fresh] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: /Download overlay/ }).click()]);
    const freshFile = join(dir, `fresh-${fresh.suggestedFilename()}`);
    await fresh.saveAs(freshFile);
    const freshAlone = `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: freshFile }, 'encrypt.key-secret': 'tab', backing: null })}`;
    execFileSync('qemu-img', ['check', '--object', 'secret,id=tab,data=a new passphrase', freshAlone], { encoding: 'utf8' });
    expect(() => execFileSync('qemu-img', ['check', ...secret, freshAlone], { stdio: 'pipe' })).toThrow(/Invalid password, cannot unlock any keyslot/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/**
 * A disk encrypted at rest in the tab: "Encrypt disk…" turns the new disk's overlay into a LUKS qcow2 while the
 * guest runs on; the file the guest then writes is encrypted in OPFS; the cluster map and stats go on; a reload
 * asks for the passphrase (a wrong one is refused and can be tried again); the download is the encrypted file as
 * it is, which qemu-img opens with the same passphrase (check: with its base, through QEMU's curl driver; convert:
 * the overlay's own data) and which holds none of the guest's bytes in the clear. Reset disk then creates a new
 * disk encrypted with another passphrase, which qemu-img opens with that one only; Change passphrase moves it to a
 * third one.
 *
 * The second test takes the other ways to an encrypted disk and back, on three guest boots: the first visit's disk
 * created encrypted (?encrypt=1), Open overlay of a LUKS overlay made and written by qemu-img/qemu-io, a read-only
 * tab on it, a fresh encrypted disk beside a tab that holds the disk, and Decrypt disk back to a plain overlay;
 * every disk made is downloaded and checked by qemu-img.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Page } from '@playwright/test';
import { test, expect, consoleText, run, waitForConsole, waitForShell, waitSaved } from './fixtures.js';
import { PUBLIC_IMAGES } from './servers.js';

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

    // Change passphrase (in place of Encrypt disk on an encrypted disk): the current passphrase first (a wrong one
    // is refused and asked again, the new one kept), then the disk is rewritten under the new one while the guest
    // carries on; the download opens with the new passphrase only and holds the guest's file.
    await expect(page.locator('#encrypt')).toBeHidden();
    await run(page, 'echo rekeyed-$((6 * 7)) > /rekeyed.txt; sync; echo synced-$((2 + 1))');
    await waitForConsole(page, /^synced-3/m);
    await waitSaved(page);
    await page.locator('#rekey').click();
    await expect(dialog).toContainText("Enter the disk's current passphrase");
    await answer(page, PASSPHRASE, 'Next');
    await expect(dialog).toContainText('Choose the new passphrase');
    await answer(page, 'changed passphrase', 'Change passphrase');
    await expect(dialog).toContainText('Wrong passphrase');
    await answer(page, 'a new passphrase', 'Next');
    await expect(dialog).toBeHidden();
    await expect(page.getByTestId('overlay-encryption')).toContainText('encrypted (LUKS aes-256-xts-plain64)');
    await expect(page.getByTestId('phase')).toContainText('shell ready');
    await run(page, 'cat /rekeyed.txt | sed s/rekeyed/still/');
    await waitForConsole(page, /^still-42/m);
    await waitSaved(page);
    const [rekeyed] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: /Download overlay/ }).click()]);
    const rekeyedFile = join(dir, `rekeyed-${rekeyed.suggestedFilename()}`);
    await rekeyed.saveAs(rekeyedFile);
    const rekeyedAlone = `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: rekeyedFile }, 'encrypt.key-secret': 'tab', backing: null })}`;
    expect(execFileSync('qemu-img', ['check', '--object', 'secret,id=tab,data=changed passphrase', rekeyedAlone], { encoding: 'utf8' })).toContain('No errors were found');
    expect(() => execFileSync('qemu-img', ['check', '--object', 'secret,id=tab,data=a new passphrase', rekeyedAlone], { stdio: 'pipe' })).toThrow(/Invalid password, cannot unlock any keyslot/);
    expect(readFileSync(rekeyedFile).includes('rekeyed-42')).toBe(false);
    execFileSync('qemu-img', ['convert', '--object', 'secret,id=tab,data=changed passphrase', '-O', 'raw', rekeyedAlone, raw]);
    expect(readFileSync(raw).includes('rekeyed-42')).toBe(true);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/** qemu-img, tried again where QEMU's LUKS calibration failed on a busy machine (it says nothing about the image). */
function qemuImg(args: string[]): string {
  for (let attempt = 1; ; attempt++) {
    try {
      return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (error) {
      if (attempt < 32 && String((error as { stderr?: unknown }).stderr).includes('Unable to get accurate CPU usage')) continue;
      throw error;
    }
  }
}

/** A qemu-img --image-opts/json name for the overlay `file` alone (its backing left closed), unlocked by secret `tab`. */
function overlayAlone(file: string, encrypted = true): string {
  return `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: file }, ...(encrypted ? { 'encrypt.key-secret': 'tab' } : {}), backing: null })}`;
}

interface QemuInfo {
  encrypted?: boolean;
  'backing-filename'?: string;
  'format-specific': { data: { encrypt?: Record<string, unknown> } };
}

/** Downloads the tab's overlay into `dir` as `name`; returns its path and what qemu-img info says of it. */
async function downloadOverlay(page: Page, dir: string, name: string): Promise<{ file: string; info: QemuInfo }> {
  const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: /Download overlay/ }).click()]);
  const file = join(dir, name);
  await download.saveAs(file);
  return { file, info: JSON.parse(qemuImg(['info', '--output=json', file])) as QemuInfo };
}

/** qemu-img check of the overlay alone, with `passphrase` when it is encrypted: its output (it throws on errors). */
function checkOverlay(file: string, passphrase?: string): string {
  const secret = passphrase === undefined ? [] : ['--object', `secret,id=tab,data=${passphrase}`];
  return qemuImg(['check', ...secret, overlayAlone(file, passphrase !== undefined)]);
}

/** Powers the machine off (the disk saved) and waits until the page says so. */
async function powerOff(page: Page): Promise<void> {
  await expect(page.getByRole('button', { name: 'Power off' })).toBeEnabled();
  await page.getByRole('button', { name: 'Power off' }).click();
  await expect(page.getByTestId('phase')).toHaveAttribute('data-state', 'off');
}

test('?encrypt=1, Open overlay of a qemu-img LUKS overlay, a read-only tab, a fresh encrypted disk, and Decrypt disk back to plain', async ({ context, server }) => {
  const dir = mkdtempSync(join(tmpdir(), 'qcow86-e2e-encrypted-ways-'));
  const QEMU_PASSPHRASE = 'made by qemu-img';
  try {
    const baseUrl = new URL('/images/base.qcow2', server.url).href;
    const baseSize = (JSON.parse(qemuImg(['info', '--output=json', join(PUBLIC_IMAGES, 'base.qcow2')])) as { 'virtual-size': number })['virtual-size'];
    // 64 KiB of 0x5a at 12 MiB: in the boot partition's free tail, which the guest does not touch, so only the
    // test's own reads see it (as in tab.spec.ts).
    const pattern = Buffer.alloc(65536, 0x5a);
    const patternMd5 = createHash('md5').update(pattern).digest('hex');
    const readPattern = 'dd if=/dev/vda bs=65536 skip=192 count=1 2>/dev/null | md5sum; echo read-$((40 + 2))';

    // An encrypted overlay of this base made by qemu-img (QEMU's LUKS defaults), the pattern written by qemu-io.
    const made = join(dir, 'qemu-luks.qcow2');
    const qemuSecret = `secret,id=tab,data=${QEMU_PASSPHRASE}`;
    qemuImg(['create', '-q', '--object', qemuSecret, '-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=tab,encrypt.iter-time=500', '-u', '-b', baseUrl, '-F', 'qcow2', made, String(baseSize)]);
    execFileSync('qemu-io', ['--object', qemuSecret, '-c', 'write -P 0x5a 12M 64k', overlayAlone(made)]);
    expect(readFileSync(made).includes(pattern), 'qemu-img wrote the pattern encrypted').toBe(false);

    // (1) First visit with ?encrypt=1: the passphrase (twice) is asked before the disk is made, which is then
    // encrypted from the start; the address forgets the option.
    const first = await context.newPage();
    await first.goto(`${server.url}?encrypt=1`);
    const firstDialog = first.locator('dialog');
    await expect(firstDialog).toContainText('Encrypt the new disk');
    await expect(firstDialog.locator('input.passphrase')).toHaveCount(2);
    await answer(first, 'first visit passphrase', 'Create encrypted disk');
    await expect(first.getByTestId('overlay-encryption')).toContainText('encrypted (LUKS aes-256-xts-plain64)');
    await expect(first).not.toHaveURL(/encrypt=/);
    await expect(first.locator('#decrypt')).toBeVisible();
    await expect(first.locator('#encrypt')).toBeHidden();
    await expect(first.getByRole('button', { name: /Download overlay/ })).toBeEnabled();
    await powerOff(first);
    const firstDisk = await downloadOverlay(first, dir, 'first-visit.qcow2');
    expect(firstDisk.info.encrypted).toBe(true);
    expect(firstDisk.info['format-specific'].data.encrypt).toMatchObject({ format: 'luks', 'cipher-alg': 'aes-256', 'cipher-mode': 'xts' });
    expect(firstDisk.info['backing-filename']).toBe(baseUrl);
    expect(checkOverlay(firstDisk.file, 'first visit passphrase')).toContain('No errors were found');
    expect(() => checkOverlay(firstDisk.file, 'wrong')).toThrow(/Invalid password, cannot unlock any keyslot/);

    // (2) Open overlay of qemu-img's encrypted overlay: its passphrase is asked (a wrong one refused), then it
    // replaces the disk and the guest boots on it and reads what qemu-io wrote.
    await first.locator('#open-file').setInputFiles(made);
    await expect(firstDialog).toContainText('qemu-luks.qcow2 is encrypted');
    await answer(first, 'not it', 'Open');
    await expect(firstDialog).toContainText('Wrong passphrase');
    await answer(first, QEMU_PASSPHRASE, 'Open');
    await expect(firstDialog).toContainText('Replace this disk with qemu-luks.qcow2?');
    await firstDialog.getByRole('button', { name: 'Replace disk' }).click();
    await waitForShell(first);
    await expect(first.getByTestId('overlay-encryption')).toContainText('encrypted (LUKS aes-256-xts-plain64)');
    // The root is then remounted read-only, so that its journal is clean: a read-only tab's guest cannot replay
    // a journal, and refuses to mount a file system that needs it.
    await run(first, `${readPattern}; echo opened-$((6 * 7)) > /opened.txt; mount -o remount,ro / && sync && echo synced-$((1 + 1))`);
    await waitForConsole(first, /^synced-2/m);
    expect(await consoleText(first)).toContain(patternMd5);
    await waitSaved(first);
    // Powered off, the tab keeps the disk (and its lock) without competing for the CPU with the boot below.
    await powerOff(first);

    // (3) A second tab on the same disk, read-only: the passphrase is asked (the copy it reads is encrypted too)
    // and its guest reads the disk.
    const second = await context.newPage();
    await second.goto(server.url);
    const secondDialog = second.locator('dialog');
    await expect(secondDialog).toContainText('open in another tab');
    await expect(secondDialog.getByRole('button', { name: 'Use a fresh encrypted disk…' })).toBeVisible();
    await secondDialog.getByRole('button', { name: 'Open read-only' }).click();
    await expect(secondDialog).toContainText('This disk is encrypted');
    await answer(second, QEMU_PASSPHRASE, 'Open');
    await expect(second.getByTestId('overlay-name')).toContainText('read-only in this tab');
    await expect(second.getByTestId('overlay-encryption')).toContainText('encrypted (LUKS');
    await waitForShell(second);
    await run(second, `cat /sys/block/vda/ro /opened.txt; ${readPattern}`);
    await waitForConsole(second, /^1\nopened-42\n[0-9a-f]{32} +-\nread-42/m);
    expect(await consoleText(second)).toContain(patternMd5);
    await expect(second.locator('#decrypt')).toBeDisabled();
    await second.close();

    // (4) A third tab takes a fresh encrypted disk (a cancelled passphrase goes back to the question): a new
    // overlay, remembered in the address, LUKS-encrypted with its own passphrase.
    const third = await context.newPage();
    await third.goto(server.url);
    const thirdDialog = third.locator('dialog');
    await thirdDialog.getByRole('button', { name: 'Use a fresh encrypted disk…' }).click();
    await expect(thirdDialog).toContainText('Encrypt the fresh disk');
    await thirdDialog.getByRole('button', { name: 'Cancel' }).click();
    await expect(thirdDialog).toContainText('open in another tab');
    await thirdDialog.getByRole('button', { name: 'Use a fresh encrypted disk…' }).click();
    await answer(third, 'fresh passphrase', 'Create encrypted disk');
    await expect(third).toHaveURL(/[?&]disk=/);
    await expect(third.getByTestId('overlay-name')).not.toContainText('read-only');
    await expect(third.getByTestId('overlay-encryption')).toContainText('encrypted (LUKS aes-256-xts-plain64)');
    await powerOff(third);
    const fresh = await downloadOverlay(third, dir, 'fresh.qcow2');
    expect(fresh.info.encrypted).toBe(true);
    expect(fresh.info['backing-filename']).toBe(baseUrl);
    expect(checkOverlay(fresh.file, 'fresh passphrase')).toContain('No errors were found');
    expect(() => checkOverlay(fresh.file, QEMU_PASSPHRASE)).toThrow(/Invalid password, cannot unlock any keyslot/);
    await third.close();

    // (5) Decrypt disk, the way back: the passphrase confirms it (a wrong one is refused and the disk stays
    // encrypted); the overlay becomes a plain one holding the same data.
    await first.locator('#decrypt').click();
    await expect(firstDialog).toContainText('Decrypt this disk');
    await answer(first, 'not it', 'Decrypt');
    await expect(firstDialog).toContainText('Wrong passphrase');
    await expect(first.getByTestId('overlay-encryption')).toContainText('encrypted (LUKS');
    await answer(first, QEMU_PASSPHRASE, 'Decrypt');
    await expect(first.getByTestId('overlay-encryption')).toHaveText('not encrypted', { timeout: 120_000 });
    await expect(first.locator('#encrypt')).toBeVisible();
    await expect(first.locator('#decrypt')).toBeHidden();
    await expect(first.getByTestId('phase')).toContainText('Powered off');

    // Opened again with ?encrypt=1: no passphrase is asked (the disk is plain now), and Encrypt disk is offered
    // for the disk made earlier; declined, the guest boots on the plain disk and reads the same data.
    await first.goto(`${server.url}?encrypt=1`);
    await expect(firstDialog).toContainText('made earlier and is not encrypted');
    await firstDialog.getByRole('button', { name: 'Cancel' }).click();
    await expect(first).not.toHaveURL(/encrypt=/);
    await waitForShell(first);
    await expect(first.getByTestId('overlay-encryption')).toHaveText('not encrypted');
    await run(first, `cat /opened.txt; ${readPattern}`);
    await waitForConsole(first, /^opened-42\n[0-9a-f]{32} +-\nread-42/m);
    expect(await consoleText(first)).toContain(patternMd5);
    await waitSaved(first);
    const plain = await downloadOverlay(first, dir, 'decrypted.qcow2');
    expect(plain.info.encrypted ?? false).toBe(false);
    expect(plain.info['format-specific'].data.encrypt).toBeUndefined();
    expect(plain.info['backing-filename']).toBe(baseUrl);
    expect(checkOverlay(plain.file)).toContain('No errors were found');
    // The data is in the file in the clear: qemu-io's pattern and the guest's file.
    const bytes = readFileSync(plain.file);
    expect(bytes.includes(pattern)).toBe(true);
    expect(bytes.includes('opened-42')).toBe(true);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

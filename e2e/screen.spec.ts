/**
 * The tab's Screen view and guest list (issue 16; typing on the default guest's tty1 is in tab.spec.ts's @dev
 * test, which has that guest booted already):
 * - a disk nobody here built (GRUB's rescue image from Debian's grub-rescue-pc) opened with `?base=`: the page
 *   claims no boot step it cannot know, shows the screen by itself since the serial console stays silent, lets
 *   `c` open GRUB's command line, hands GRUB a whole line of key presses sent at once without losing one (they
 *   wait for GRUB to read them, see src/v86/key-pacing.ts), and draws the graphics mode GRUB switches to on a
 *   canvas;
 * - the guest list offers the guests the image builds made, and says how to build one that is missing.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test, expect, BOOT_TIMEOUT } from './fixtures.js';

test('an unknown disk that only uses the screen: honest status, the screen shown by itself, keys, and graphics drawn', async ({ page, server }) => {
  const work = mkdtempSync(join(tmpdir(), 'qcow86-e2e-grub-'));
  const name = `grub-${Date.now()}.qcow2`;
  const disk = join(server.imagesDir, name);
  try {
    const { debianPackage } = await import('../images/build.mjs');
    execFileSync('dpkg-deb', ['-x', debianPackage('grub-rescue-pc'), work]);
    execFileSync('qemu-img', ['convert', '-c', '-O', 'qcow2', join(work, 'usr/lib/grub-rescue/grub-rescue-cdrom.iso'), disk]);
    await page.goto(`${server.url}?base=/images/${name}`);
    const screen = page.locator('#screen');
    // Nothing on the serial console: the page switches to the screen on its own.
    await expect(page.locator('section.displays')).toHaveAttribute('data-view', 'screen', { timeout: BOOT_TIMEOUT });
    await expect(screen.locator('.text')).toContainText('GNU GRUB', { timeout: BOOT_TIMEOUT });
    await expect(page.getByTestId('guest')).toHaveValue('');
    await expect(page.getByTestId('guest').locator('option:checked')).toHaveText(`Other: ${new URL(`/images/${name}`, server.url).href}`);
    const phase = page.getByTestId('phase');
    await expect(phase).toContainText('Running — booted from the disk (see its screen)');
    await expect(phase).not.toContainText(/Linux|shell|Boot loader/);

    await screen.click();
    await page.keyboard.press('c');
    await expect(screen.locator('.text')).toContainText('grub>', { timeout: 60_000 });
    // A line's key presses all at once, as a busy host delivers what someone typed (or auto-repeat does): the
    // machine Worker gets them in one burst, far faster than GRUB reads keys through the BIOS, whose buffer holds
    // 15. Every key must still arrive, in order: GRUB prints the line back on a row of its own.
    const line = 'The quick brown fox jumps over the lazy dog: 0123456789 ~!@#$%^&*()_+{}|<>?';
    await screen.evaluate((element, keys) => {
      for (const key of keys) element.dispatchEvent(new KeyboardEvent('keydown', { key, bubbles: true, cancelable: true }));
    }, [...`echo '${line}'`, 'Enter']);
    await expect(screen.locator('.text')).toContainText(new RegExp(`^${line.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`, 'm'), { timeout: 60_000 });
    await page.keyboard.type('insmod all_video; set gfxmode=640x480; terminal_output gfxterm; background_color 0,0,160');
    await page.keyboard.press('Enter');
    const canvas = screen.locator('canvas');
    await expect(canvas).toBeVisible({ timeout: 60_000 });
    await expect(screen.locator('.text')).toBeHidden();
    await expect
      .poll(() => canvas.evaluate((element: HTMLCanvasElement) => {
        const pixels = element.getContext('2d')!.getImageData(0, 0, element.width, element.height).data;
        let blue = 0;
        for (let i = 0; i < pixels.length; i += 4) if (pixels[i] === 0 && pixels[i + 1] === 0 && pixels[i + 2] === 160) blue++;
        return { width: element.width, height: element.height, mostlyBlue: blue > (pixels.length / 4) * 0.9 };
      }), { timeout: 60_000 })
      .toEqual({ width: 640, height: 480, mostlyBlue: true });
    // Scaled to fit the panel, not drawn at its own size past it.
    const box = (await canvas.boundingBox())!;
    const panel = (await page.locator('.screen-panel').boundingBox())!;
    expect(box.width).toBeLessThanOrEqual(panel.width);
  } finally {
    rmSync(work, { recursive: true, force: true });
    rmSync(disk, { force: true });
  }
});

test('choosing a guest that is not built says how to build it', async ({ page, server }) => {
  await page.route('**/images/guests.json', async (route) => {
    const response = await route.fetch();
    const list = (await response.json()) as { guests: Array<{ id: string; built: boolean }> };
    for (const guest of list.guests) if (guest.id === 'debian') guest.built = false;
    await route.fulfill({ response, json: list });
  });
  await page.goto(server.url);
  const select = page.getByTestId('guest');
  await expect(select).toBeEnabled();
  await select.selectOption('debian');
  const dialog = page.locator('dialog[open]');
  await expect(dialog).toContainText('is not built on this server');
  await expect(dialog).toContainText('npm run images -- debian');
  await dialog.getByRole('button', { name: 'OK' }).click();
  await expect(select).toHaveValue('default');
  expect(page.url()).not.toContain('debian');
});

/**
 * The browser tab end to end: boot to a shell, write a file, reload and find it, download the overlay and check
 * it with qemu-img (including its URL backing through QEMU's curl driver), boot it headless with `qcow86 boot`
 * against the same base, open it in a fresh profile.
 */
import { execFile, execFileSync } from 'node:child_process';
import { promisify } from 'node:util';
import { createHash } from 'node:crypto';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, utimesSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Page } from '@playwright/test';
import { test, expect, consoleText, openOverlayFile, run, storedFiles, waitForConsole, waitForShell, waitSaved, BOOT_TIMEOUT } from './fixtures.js';
import { copyBase, PUBLIC_IMAGES, ROOT, type Server } from './servers.js';

const execFileAsync = promisify(execFile);

/** The real command line (bin/qcow86.js on the build `npm test` made), run without blocking the test's browser. */
function qcow86(args: string[], cwd: string) {
  return execFileAsync(process.execPath, [join(ROOT, 'bin/qcow86.js'), ...args], { cwd, encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
}

test('@dev a guest sync is a barrier: the page closed right after it, the file is there when it opens again, on virtio and on IDE; the Screen view types on tty1', async ({ context, server }) => {
  const seed = 1000 + Math.floor(Math.random() * 9000);
  /** Boots `url` in a new page of this profile (the same stored disk), once the closed page let go of it. */
  const open = async (url: string) => {
    const page = await context.newPage();
    await page.goto(new URL('/images/manifest.json', server.url).href);
    await expect.poll(() => page.evaluate(async () => (await navigator.locks.query()).held?.length ?? 0), { timeout: 30_000 }).toBe(0);
    await page.goto(url);
    await waitForShell(page);
    return page;
  };
  /** Writes a file, syncs, and closes the page the moment the guest says the sync returned. */
  const writeThenClose = async (page: Page, file: string, text: string) => {
    await run(page, `echo ${text}-$((${seed} + 1)) > ${file}; sync; echo synced-$((2 * 21))`);
    await waitForConsole(page, /^synced-42/m);
    // 'all saved' means durable: true once the guest's flush completed.
    await expect(page.getByTestId('overlay-saved')).toHaveText(/all saved/, { timeout: 2000 });
    await page.close();
  };

  // The default bus: virtio.
  const first = await open(server.url);
  await expect(first.getByTestId('disk-bus')).toHaveValue('virtio');
  await run(first, "grep ' / ' /proc/mounts; cat /sys/block/vda/queue/write_cache");
  await waitForConsole(first, /^\/dev\/vda2 \/ ext4 rw[\s\S]*^write back/m);
  await writeThenClose(first, '/on-virtio', 'virtio');

  // ?disk-bus=ide: the same disk on IDE, whose FLUSH CACHE now reaches the overlay too.
  const second = await open(new URL('?disk-bus=ide', server.url).href);
  await expect(second.getByTestId('disk-bus')).toHaveValue('ide');
  await run(second, "cat /on-virtio; grep ' / ' /proc/mounts; cat /sys/block/sda/queue/write_cache");
  await waitForConsole(second, new RegExp(`^virtio-${seed + 1}\\n/dev/sda2 / ext4 rw[\\s\\S]*^write back`, 'm'));
  await writeThenClose(second, '/on-ide', 'ide');

  // Without the parameter the disk keeps its setting: IDE.
  const third = await open(server.url);
  await expect(third.getByTestId('disk-bus')).toHaveValue('ide');
  await run(third, "cat /on-ide; grep ' / ' /proc/mounts");
  await waitForConsole(third, new RegExp(`^ide-${seed + 1}\\n/dev/sda2 / ext4 rw`, 'm'));

  // The guest list names the guests the image builds made (this one chosen), unbuilt ones as such.
  const guests = JSON.parse(readFileSync(join(PUBLIC_IMAGES, 'guests.json'), 'utf8')) as { guests: Array<{ id: string; name: string; built: boolean }> };
  const select = third.getByTestId('guest');
  await expect(select).toHaveValue('default');
  for (const guest of guests.guests) {
    await expect(select.locator(`option[value="${guest.id}"]`)).toHaveText(guest.built ? guest.name : `${guest.name} — not built`);
  }
  // The Screen view takes typing as a new user tries it: a command and Enter on tty1, answered on the screen.
  await third.getByRole('button', { name: 'Screen', exact: true }).click();
  const screen = third.locator('#screen');
  await expect(screen.locator('.text')).toContainText('#', { timeout: 60_000 });
  await screen.click();
  await third.keyboard.type('echo hi-$((6*7)) $(tty)');
  await third.keyboard.press('Enter');
  await expect(screen.locator('.text')).toContainText('hi-42 /dev/tty1', { timeout: 60_000 });
});

test('the guest boots, keeps its writes across a reload, and its overlay opens in QEMU, in qcow86 boot and in a fresh profile', async ({ page, server, browser, longTasks }, testInfo) => {
  const seed = 1000 + Math.floor(Math.random() * 9000);
  const expected = `qcow86-e2e-${seed + 1}`;
  await page.goto(server.url);
  await expect(page.getByTestId('terminal').locator('.xterm-rows')).toBeVisible();
  await waitForShell(page);

  // The shell computes the marker, so the command's echo alone cannot satisfy the check.
  // A reload is a power cut for the guest: sync (twice, cheap) so the marker is on the disk before it.
  await run(page, `echo qcow86-e2e-$((${seed} + 1)) > /e2e-marker.txt; sync; sleep 1; sync; echo written-$((2 * 21))`);
  await waitForConsole(page, /written-42/);
  await page.waitForTimeout(1000);
  await waitSaved(page);
  await expect(page.getByTestId('cluster-map')).toBeVisible();
  const overlayLegend = page.locator('#map-legend li[data-kind="3"] .amount');
  await expect(overlayLegend).not.toHaveText('0 B');
  await page.screenshot({ path: testInfo.outputPath('booted-tab.png') });
  await page.locator('.panel.map').screenshot({ path: testInfo.outputPath('cluster-map.png') });
  await testInfo.attach('booted-tab', { path: testInfo.outputPath('booted-tab.png'), contentType: 'image/png' });
  await testInfo.attach('cluster-map', { path: testInfo.outputPath('cluster-map.png'), contentType: 'image/png' });

  // No main-thread task over 200 ms while booting and writing: the page's own share of each (the wall time less
  // what the main thread spent waiting for a CPU held by other work on the machine; see main-thread.ts).
  const tasks = await longTasks.of(page);
  const listed = tasks.map((task) => `${task.wall} ms (${task.own} own, ${task.waited} waiting for a CPU)`).join(', ');
  testInfo.annotations.push({ type: 'long tasks', description: listed || 'none' });
  console.log(`main-thread long tasks while booting and writing: ${listed || 'none'}`);
  expect.soft(Math.max(0, ...tasks.map((task) => task.own)), `main-thread long tasks while booting and writing: ${listed}; long frames: ${await longTasks.frames(page)}`).toBeLessThan(200);

  // Reload: the overlay in OPFS keeps the file.
  await page.reload();
  await waitForShell(page);
  await run(page, 'cat /e2e-marker.txt');
  await waitForConsole(page, new RegExp(expected));

  // Download: a valid qcow2 whose backing name is the base's absolute URL.
  const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: /Download overlay/ }).click()]);
  const dir = mkdtempSync(join(tmpdir(), 'qcow86-e2e-'));
  try {
    const file = join(dir, download.suggestedFilename());
    await download.saveAs(file);
    expect(file).toMatch(/\.qcow2$/);
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', file], { encoding: 'utf8' })) as Record<string, unknown>;
    expect(info['format']).toBe('qcow2');
    expect(info['backing-filename']).toBe(new URL('/images/base.qcow2', server.url).href);
    // check opens the whole chain: the base is reached through QEMU's curl driver over the same server.
    execFileSync('qemu-img', ['check', file], { encoding: 'utf8' });
    const compare = execFileSync('qemu-img', ['info', '--backing-chain', '--output=json', file], { encoding: 'utf8' });
    expect(compare).toContain('"format": "qcow2"');

    // Our CLI boots (a copy of) the download headless: the base comes from its recorded URL over the same server.
    const copy = join(dir, 'cli-copy.qcow2');
    copyFileSync(file, copy);
    const booted = await qcow86(['boot', '--overlay', copy, '--timeout', '300', '--expect', '# ', '--send', 'cat /e2e-marker.txt; echo cli-$((40 + 2))\n', '--expect', 'cli-42'], dir);
    expect(booted.stdout).toContain(expected);
    expect((await execFileAsync('qemu-img', ['check', copy])).stdout).toContain('No errors were found');

    // A fresh profile: nothing stored yet; opening the downloaded overlay brings the file back.
    const fresh = await browser.newContext();
    try {
      const other = await fresh.newPage();
      await other.goto(server.url);
      // No need to let its own fresh disk boot first: Open overlay works as soon as the machine exists.
      await expect(other.getByRole('button', { name: /Open overlay/ })).toBeEnabled({ timeout: 120_000 });
      await openOverlayFile(other, file);
      // The machine restarts on the opened overlay: wait for that boot's shell, not the one before it.
      await expect(other.getByTestId('phase')).not.toContainText('shell ready');
      await waitForShell(other);
      await run(other, 'cat /e2e-marker.txt');
      await waitForConsole(other, new RegExp(expected));
    } finally {
      await fresh.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a second tab on the same disk is refused write access and offered read-only (a copy, never the live file) or a fresh disk', async ({ context, server }) => {
  const dir = mkdtempSync(join(tmpdir(), 'qcow86-e2e-second-'));
  try {
    // The stored disk holds 64 KiB of 0x5a at 12 MiB: in the boot partition's free tail, which neither guest
    // touches, so only the test's own read sees it.
    const baseUrl = new URL('/images/base.qcow2', server.url).href;
    const pattern = join(dir, 'pattern.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', baseUrl, '-F', 'qcow2', pattern, '30408704']);
    execFileSync('qemu-io', ['-c', 'write -P 0x5a 12M 64k', pattern]);
    const first = await context.newPage();
    await first.goto(server.url);
    await expect(first.getByRole('button', { name: /Open overlay/ })).toBeEnabled({ timeout: 120_000 });
    await openOverlayFile(first, pattern);
    const overlayCells = first.locator('#map-legend li[data-kind="3"] .amount');
    await expect(overlayCells).not.toHaveText('0 B');
    // Powered off, the first tab keeps its disk (and the lock) open without competing for the CPU with the boot below.
    await first.getByRole('button', { name: 'Power off' }).click();
    await expect(first.getByTestId('phase')).toHaveAttribute('data-state', 'off');

    const second = await context.newPage();
    await second.goto(server.url);
    const dialog = second.locator('dialog');
    await expect(dialog).toBeVisible();
    await expect(dialog).toContainText('open in another tab');
    await dialog.getByRole('button', { name: 'Open read-only' }).click();
    await expect(second.getByTestId('overlay-name')).toContainText(/read-only in this tab: a copy taken at \d/);
    await expect(second.getByRole('button', { name: /Download overlay/ })).toBeDisabled();
    const copies = (await storedFiles(first)).filter((name) => name.includes('.copy-'));
    expect(copies).toHaveLength(1);
    await waitForShell(second);
    // On virtio the read-only tab's guest is told so (the RO feature): its root is mounted read-only.
    await run(second, 'cat /sys/block/vda/ro; touch /x || echo refused-$((6 * 7))');
    await waitForConsole(second, /^1\n[\s\S]*^refused-42/m);

    // The writing tab throws its disk away: the stored file no longer holds the pattern.
    await first.getByRole('button', { name: 'Reset disk…' }).click();
    await first.locator('dialog').getByRole('button', { name: 'Reset disk' }).click();
    await expect(overlayCells).toHaveText('0 B');
    await expect(first.getByRole('button', { name: 'Power off' })).toBeEnabled();
    await first.getByRole('button', { name: 'Power off' }).click();
    await expect(first.getByTestId('phase')).toHaveAttribute('data-state', 'off');
    // The read-only tab reads its copy, as of when it opened: the pattern is still there.
    await run(second, 'dd if=/dev/vda bs=65536 skip=192 count=1 2>/dev/null | md5sum; echo read-$((40 + 2))');
    await waitForConsole(second, /^read-42/m);
    expect(await consoleText(second)).toContain(createHash('md5').update(Buffer.alloc(65536, 0x5a)).digest('hex'));

    // A third tab takes a fresh disk: a different overlay, writable, remembered in its address. Opening a disk
    // deletes the copies of readers that are gone.
    await second.close();
    const third = await context.newPage();
    await third.goto(server.url);
    await third.locator('dialog').getByRole('button', { name: 'Use a fresh disk' }).click();
    await expect(third.getByTestId('overlay-name')).not.toContainText('read-only');
    await expect(third).toHaveURL(/[?&]disk=/);
    await expect(third.getByRole('button', { name: /Download overlay/ })).toBeEnabled();
    expect((await storedFiles(third)).filter((name) => name.includes('.copy-'))).toEqual([]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a base whose ETag changed on the server is refused with a readable message; the old disk can be downloaded, then reset', async ({ page, server }) => {
  const copy = copyOf(server);
  try {
    await page.goto(`${server.url}?base=${copy.path}`);
    await expect(page.getByTestId('overlay-name')).toContainText('browser storage');
    await expect(page.getByTestId('base-fetched')).not.toHaveText('–');
    // A new version of the base on the server: same name, different ETag.
    const later = new Date(Date.now() + 60_000);
    utimesSync(copy.file, later, later);
    await page.reload();
    await expect(page.locator('#problems')).toContainText('base image on the server has changed');
    await expect(page.getByTestId('phase')).toContainText(/could not open|changed/i);

    // The way out the message names: download the old disk (a valid overlay of the old base), then reset it.
    const dialog = page.locator('dialog');
    await expect(dialog).toContainText('The base image has changed');
    const [download] = await Promise.all([page.waitForEvent('download'), dialog.getByRole('button', { name: 'Download overlay' }).click()]);
    const dir = mkdtempSync(join(tmpdir(), 'qcow86-e2e-changed-'));
    try {
      const file = join(dir, download.suggestedFilename());
      await download.saveAs(file);
      const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', file], { encoding: 'utf8' })) as Record<string, unknown>;
      expect(info['backing-filename']).toBe(new URL(copy.path, server.url).href);
      expect((await execFileAsync('qemu-img', ['check', file])).stdout).toContain('No errors were found');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    // The question comes back after the download; Reset starts a new disk on the new base, which then opens.
    await dialog.getByRole('button', { name: 'Reset disk' }).click();
    await expect(page.getByTestId('overlay-name')).toContainText('browser storage');
    await expect(page.getByTestId('base-fetched')).not.toHaveText('–');
    await expect(page.locator('#problems')).not.toContainText('base image on the server has changed');
    await page.reload();
    await expect(page.getByTestId('overlay-name')).toContainText('browser storage');
    await expect(page.getByTestId('phase')).not.toContainText(/could not open|changed/i);
  } finally {
    copy.remove();
  }
});

test('the base blocks kept in the browser stay for the four most recently used bases only', async ({ page, server }) => {
  const bases = Array.from({ length: 5 }, (_, i) => copyBase(server, `e2e-kept-${i}-${Date.now().toString(36)}.qcow2`));
  try {
    // Visits 0 1 2 3 0 4: base 1 is then the least recently used.
    for (const base of [...bases.slice(0, 4), bases[0]!, bases[4]!]) {
      await page.goto(`${server.url}?base=${base.path}`);
      await expect(page.getByTestId('overlay-name')).toContainText('browser storage');
      await expect(page.getByTestId('base-fetched')).not.toHaveText('–');
    }
    const kept = await page.evaluate(async () => {
      const dir = await (await navigator.storage.getDirectory()).getDirectoryHandle('qcow86-base-blocks');
      const names: string[] = [];
      for await (const name of (dir as unknown as { keys(): AsyncIterable<string> }).keys()) names.push(name);
      return names.sort();
    });
    // One file per base URL, named by the first 16 bytes of the URL's SHA-256 (src/io/opfs.ts).
    const fileOf = (base: { path: string }) => `${createHash('sha256').update(new URL(base.path, server.url).href).digest('hex').slice(0, 32)}.blocks`;
    expect(kept).toEqual([0, 2, 3, 4].map((i) => fileOf(bases[i]!)).sort());
  } finally {
    for (const base of bases) base.remove();
  }
});

test('a read-only tab whose writer has gone makes its copy itself', async ({ context, server }) => {
  const writer = await context.newPage();
  await writer.goto(server.url);
  await expect(writer.getByTestId('overlay-name')).toContainText('browser storage');
  const reader = await context.newPage();
  await reader.goto(server.url);
  await expect(reader.locator('dialog')).toContainText('open in another tab');
  // The writing tab closes while the question is up: nobody answers a request for a copy any more.
  await writer.close();
  await reader.locator('dialog').getByRole('button', { name: 'Open read-only' }).click();
  await expect(reader.getByTestId('overlay-name')).toContainText(/read-only in this tab: a copy taken at \d/);
  expect((await storedFiles(reader)).filter((name) => name.includes('.copy-'))).toHaveLength(1);
});

test('a replacement the tab did not finish is undone or completed at the next open', async ({ page, server }) => {
  const dir = mkdtempSync(join(tmpdir(), 'qcow86-e2e-recover-'));
  try {
    // Two overlays of the base, told apart by 64 KiB at 12 MiB that no guest touches.
    const baseUrl = new URL('/images/base.qcow2', server.url).href;
    const overlay = (name: string, byte: number) => {
      const file = join(dir, name);
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', baseUrl, '-F', 'qcow2', file, '30408704']);
      execFileSync('qemu-io', ['-c', `write -P ${byte} 12M 64k`, file]);
      return readFileSync(file).toString('base64');
    };
    const old = overlay('old.qcow2', 0x11);
    const replacement = overlay('new.qcow2', 0x22);
    // A page of the same origin that is not the app, to arrange the stored files as a closed tab left them.
    await page.goto(new URL('/images/manifest.json', server.url).href);
    await page.evaluate(async (files: Record<string, string>) => {
      const dir = await (await navigator.storage.getDirectory()).getDirectoryHandle('qcow86', { create: true });
      for (const [name, data] of Object.entries(files)) {
        const writable = await (await dir.getFileHandle(name, { create: true })).createWritable();
        await writable.write(Uint8Array.from(atob(data), (c) => c.charCodeAt(0)));
        await writable.close();
      }
    }, {
      // Closed between the two renames: the old disk set aside, the new one still staged.
      'between.qcow2.previous': old,
      'between.qcow2.incoming': replacement,
      // Closed after them: the new disk in place, the old one not yet deleted.
      'after.qcow2': replacement,
      'after.qcow2.previous': old,
    });
    // An address cannot name one of those files as its disk (a later open would take it for a leftover).
    for (const name of ['after.qcow2.previous', 'between.qcow2.copy-1-a']) {
      await page.goto(`${server.url}?disk=${name}`);
      await expect(page.locator('#problems')).toContainText(`'${name}' cannot name a disk in this browser`);
    }
    for (const [name, byte] of [['between.qcow2', 0x11], ['after.qcow2', 0x22]] as const) {
      await page.goto(`${server.url}?disk=${name}`);
      await expect(page.getByTestId('overlay-name')).toContainText(`browser storage: ${name}`);
      await expect(page.getByRole('button', { name: /Download overlay/ })).toBeEnabled({ timeout: 120_000 });
      expect((await storedFiles(page)).filter((file) => file.startsWith(name))).toEqual([name]);
      const [download] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: /Download overlay/ }).click()]);
      const file = join(dir, `${name}-downloaded.qcow2`);
      await download.saveAs(file);
      const read = execFileSync('qemu-io', ['-c', `read -P ${byte} 12M 64k`, file], { encoding: 'utf8' });
      expect(read, `${name} holds the ${byte === 0x11 ? 'old' : 'new'} disk`).not.toContain('Pattern verification failed');
      expect(read).toContain('read 65536/65536 bytes');
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

function copyOf(server: Server) {
  return copyBase(server, `e2e-changing-${Date.now().toString(36)}.qcow2`);
}

test('a network failure while the guest reads the base shows a retry countdown, and the boot goes on once it is back', async ({ page, server }) => {
  // Opening the base gets through; once the disk is open, the guest's reads of the base fail until `back`.
  let failing = false;
  let back = false;
  let refused = 0;
  await page.route('**/images/base.qcow2', (route) => {
    if (!failing || back) return route.continue();
    refused++;
    return route.abort('connectionrefused');
  });
  await page.goto(server.url);
  await expect(page.getByTestId('overlay-name')).toContainText('browser storage');
  failing = true;
  const problems = page.locator('#problems');
  await expect(problems).toContainText(/Cannot reach the server for the base image .*Retrying in \d+ s/);
  // The countdown counts: the number changes while the page waits.
  const first = await problems.innerText();
  await expect.poll(() => problems.innerText(), { timeout: 20_000 }).not.toBe(first);
  expect(refused).toBeGreaterThan(0);
  back = true;
  await expect(problems).toBeEmpty({ timeout: 60_000 });
  await expect(page.getByTestId('phase')).toContainText(/Linux is starting|shell ready/, { timeout: BOOT_TIMEOUT });
});

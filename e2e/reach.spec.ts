/**
 * The tab reaches its base image URL and nothing else an image names: a base that names a backing or data file,
 * and overlays (opened with Open overlay) that name another base or an external data file - by absolute URL,
 * protocol-relative URL or host path - are refused with the name shown, and the browser sends no request for any
 * of them; a base URL that redirects is refused too (the browser cannot see where a redirect goes before it
 * follows it, so the tab follows none). The names point at a decoy server on loopback that counts what reaches it; every request the page
 * and its Workers send is checked too. No guest boot is waited for.
 */
import { execFileSync } from 'node:child_process';
import { createServer, type Server as HttpServer } from 'node:http';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Page } from '@playwright/test';
import { test, expect } from './fixtures.js';

/** A server on 127.0.0.1 that answers 404 to everything and remembers what it was asked. */
async function decoy(): Promise<{ url: string; seen: string[]; close(): Promise<void> }> {
  const seen: string[] = [];
  const server: HttpServer = createServer((request, response) => {
    seen.push(`${request.method} ${request.url}`);
    response.writeHead(404, { 'Access-Control-Allow-Origin': '*' }).end();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  return { url: `http://127.0.0.1:${port}/`, seen, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

/**
 * A qcow2 whose data file is recorded as `name` (qemu-img opens a data file it records, so the image is made with
 * a placeholder of the same length and the name written over it).
 */
function withDataFile(dir: string, file: string, name: string, backing?: string): void {
  const placeholder = 'd'.repeat(name.length);
  const options = ['-o', `data_file=${placeholder}`, ...(backing ? ['-u', '-b', backing, '-F', 'qcow2'] : [])];
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...options, file, '30408704'], { cwd: dir });
  const bytes = readFileSync(file);
  const at = bytes.indexOf(placeholder);
  expect(at).toBeGreaterThan(0);
  bytes.write(name, at, 'latin1');
  writeFileSync(file, bytes);
  rmSync(join(dir, placeholder), { force: true });
}

async function refusal(page: Page): Promise<string> {
  const dialog = page.locator('dialog');
  // Visible first: a closed dialog keeps the text of the last question.
  await expect(dialog).toBeVisible();
  await expect(dialog).toContainText('This overlay cannot be used here');
  const text = await dialog.innerText();
  await dialog.getByRole('button', { name: 'OK' }).click();
  await expect(dialog).toBeHidden();
  return text;
}

test('the tab reaches only its base image: files an image names are refused, never fetched', async ({ page, server }) => {
  const trap = await decoy();
  const dir = mkdtempSync(join(tmpdir(), 'qcow86-e2e-reach-'));
  const stamp = Date.now().toString(36);
  const placed: string[] = [];
  const requests: string[] = [];
  page.context().on('request', (request) => requests.push(request.url()));
  try {
    const origin = new URL(server.url).origin;
    const baseUrl = new URL('/images/base.qcow2', server.url).href;

    // Bases on this server that name other files: a backing file, a data file.
    const namesBacking = `e2e-names-backing-${stamp}.qcow2`;
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', `${trap.url}secret.qcow2`, '-F', 'qcow2', join(server.imagesDir, namesBacking), '30408704']);
    const namesData = `e2e-names-data-${stamp}.qcow2`;
    withDataFile(dir, join(server.imagesDir, namesData), `${trap.url}base-data.raw`);
    placed.push(namesBacking, namesData);
    for (const [name, named] of [[namesBacking, `${trap.url}secret.qcow2`], [namesData, `${trap.url}base-data.raw`]] as const) {
      await page.goto(`${server.url}?base=/images/${name}`);
      await expect(page.getByTestId('phase')).toHaveAttribute('data-state', 'error');
      await expect(page.locator('#problems')).toContainText(`names another file (${named}); this page reaches only the base image itself`);
    }

    // A base URL that redirects, to another origin or within its own: the tab follows neither.
    for (const [name, location] of [['elsewhere', `${trap.url}images/base.qcow2`], ['here', baseUrl]] as const) {
      await page.route((url) => url.pathname === `/images/redirect-${name}.qcow2`, (route) => route.fulfill({ status: 302, headers: { Location: location } }));
      await page.goto(`${server.url}?base=/images/redirect-${name}.qcow2`);
      await expect(page.getByTestId('phase')).toHaveAttribute('data-state', 'error');
      await expect(page.locator('#problems')).toContainText('the server answered with a redirect, which is not followed');
      await expect(page.locator('#problems')).not.toContainText('Cannot reach the server');
    }

    // Overlays of other places, opened on the default base.
    await page.goto(server.url);
    await expect(page.getByRole('button', { name: /Open overlay/ })).toBeEnabled({ timeout: 120_000 });
    const overlays: Array<{ name: string; make(file: string): void; says: RegExp }> = [
      {
        name: 'absolute.qcow2',
        make: (file) => execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', `${trap.url}images/base.qcow2`, '-F', 'qcow2', file, '30408704']),
        says: /absolute\.qcow2 is an overlay of a different base image \(http:\/\/127\.0\.0\.1:\d+\/images\/base\.qcow2\)/,
      },
      {
        name: 'protocol-relative.qcow2',
        make: (file) => execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', `//${new URL(trap.url).host}/images/base.qcow2`, '-F', 'qcow2', file, '30408704']),
        says: /protocol-relative\.qcow2 is an overlay of a different base image \(\/\/127\.0\.0\.1:\d+\/images\/base\.qcow2\)/,
      },
      {
        name: 'host-path.qcow2',
        make: (file) => execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', '/etc/passwd', '-F', 'raw', file, '30408704']),
        says: /host-path\.qcow2 is an overlay of a different base image \(\/etc\/passwd\)/,
      },
      {
        name: 'data-file.qcow2',
        make: (file) => withDataFile(dir, file, `${trap.url}overlay-data.raw`, baseUrl),
        says: /data-file\.qcow2 keeps its data in an external data file \(http:\/\/127\.0\.0\.1:\d+\/overlay-data\.raw\); this page .* reaches no file but its base image/,
      },
    ];
    for (const overlay of overlays) {
      const file = join(dir, overlay.name);
      overlay.make(file);
      await page.locator('#open-file').setInputFiles(file);
      expect(await refusal(page)).toMatch(overlay.says);
    }

    // Nothing reached the decoy, and the browser asked its own server only for the app, its firmware, its guest
    // list and the bases named in the address (its Workers' requests are seen here: the base's ranges are among them).
    expect(trap.seen).toEqual([]);
    expect(requests.filter((url) => new URL(url).origin !== origin)).toEqual([]);
    const images = [...new Set(requests.filter((url) => new URL(url).pathname.startsWith('/images/')).map((url) => new URL(url).pathname))].sort();
    expect(images).toEqual(['/images/base.qcow2', '/images/bios.bin', `/images/${namesBacking}`, `/images/${namesData}`, '/images/redirect-elsewhere.qcow2', '/images/redirect-here.qcow2', '/images/vgabios-stdvga.bin', '/images/guests.json'].sort());
  } finally {
    for (const name of placed) rmSync(join(server.imagesDir, name), { force: true });
    rmSync(dir, { recursive: true, force: true });
    await trap.close();
  }
});

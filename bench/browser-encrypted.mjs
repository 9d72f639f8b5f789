#!/usr/bin/env node
// The guest's dd in the tab (headless Chromium, the `vite build` output from nginx) on its plain overlay, then on
// the same disk after "Encrypt disk" (LUKS aes-256-xts-plain64 in OPFS, AES from @noble/ciphers in the disk
// Worker; bulk decryption by WebCrypto's native AES): 4 MiB copied into a new file with fsync, the page cache
// dropped, the file read back. The figures are the guest's clock around each dd (busybox `time`), after a
// discarded warm-up, the faster of two per kind. Rounds: QCOW86_BENCH_ROUNDS (default 2, each a fresh profile, one boot).
// Target: encrypted at most 1.3x slower. Never fails on speed.
import { join } from 'node:path';
import { buildTab, root, startTab } from './_tab.mjs';

const ROUNDS = Number(process.env.QCOW86_BENCH_ROUNDS ?? 2);
const TIMEOUT = 600_000;
/** MiB per dd: the default guest's file system has room for two such files, not two of 8 MiB. */
const MIB = 4;

await buildTab();
const tab = await startTab(join(root, 'dist/web'));
const { nginx, browser } = tab;

const consoleText = async (page) => (await page.locator('#terminal .xterm-rows').innerText()).replace(/\u00a0/g, ' ');

/**
 * Types `command` into the serial console and returns its wall-clock seconds by the guest's clock: busybox's
 * `time` (on stderr; this busybox's dd prints no "copied, N seconds" line).
 */
async function dd(page, command, prepare = 'true') {
  const tag = `m${Math.random().toString(36).slice(2, 7)}`;
  await page.locator('#terminal').click();
  await page.keyboard.type(`${prepare}; (time sh -c "${command} || echo FAILED >&2") 2>&1 >/dev/null | grep 'real\\|FAILED\\|dd:' | sed 's/^/${tag} /'\n`, { delay: 5 });
  const pattern = new RegExp(`${tag} real\\s+(\\d+)m\\s*([\\d.]+)s`);
  for (const started = Date.now(); Date.now() - started < TIMEOUT; await page.waitForTimeout(500)) {
    const text = await consoleText(page);
    // A dd that failed (a file missing, keys lost) would time as nearly nothing: it is an error, not a figure.
    if (text.includes(`${tag} FAILED`)) throw new Error(`failed in the guest: ${command}\n${text.slice(-1500)}`);
    const match = pattern.exec(text);
    if (match) return Number(match[1]) * 60 + Number(match[2]);
  }
  throw new Error(`no time result for: ${command}`);
}

/** Waits until the guest's shell answers on the serial console (after Encrypt disk the machine restarts on the new disk). */
async function shellAnswers(page) {
  for (const started = Date.now(); Date.now() - started < TIMEOUT;) {
    const tag = `r${Math.random().toString(36).slice(2, 7)}`;
    await page.locator('#terminal').click();
    await page.keyboard.type(`echo ${tag}-$((1+1))\n`, { delay: 5 });
    for (const asked = Date.now(); Date.now() - asked < 10_000; await page.waitForTimeout(500)) {
      if ((await consoleText(page)).includes(`${tag}-2`)) return;
    }
  }
  throw new Error('the guest shell did not answer');
}

async function measure(page, name) {
  await shellAnswers(page);
  // Only the dd is timed: making the random source and dropping the page cache come before it.
  const write = await dd(page, `dd if=/root/src-${name} of=/root/dd-${name} bs=1M conv=fsync`, `dd if=/dev/urandom of=/root/src-${name} bs=1M count=${MIB} 2>/dev/null; sync; echo 3 > /proc/sys/vm/drop_caches; cat /root/src-${name} > /dev/null`);
  const read = await dd(page, `dd if=/root/dd-${name} of=/dev/null bs=1M`, 'sync; echo 3 > /proc/sys/vm/drop_caches');
  await dd(page, 'true', `rm -f /root/src-${name} /root/dd-${name}; sync`);
  return { write: MIB / write, read: MIB / read };
}

/** Per direction, the faster of two measurements. */
const faster = (a, b) => ({ write: Math.max(a.write, b.write), read: Math.max(a.read, b.read) });

const results = { plain: [], encrypted: [] };
try {
  for (let round = 0; round < ROUNDS; round++) {
    const context = await browser.newContext();
    try {
      const page = await context.newPage();
      await page.goto(nginx.url);
      await page.waitForFunction(() => /shell ready/.test(document.getElementById('phase')?.textContent ?? ''), undefined, { timeout: TIMEOUT, polling: 500 });
      // A first round right after boot runs slower (the guest is still settling): measured and thrown away. Then
      // two of each kind, the faster one counted (the slower is the one a background hiccup hit).
      await measure(page, 'warm-up');
      const plain = faster(await measure(page, 'plain-1'), await measure(page, 'plain-2'));
      await page.locator('#encrypt').click();
      for (const field of await page.locator('dialog input.passphrase').all()) await field.fill('benchmark passphrase');
      await page.locator('dialog').getByRole('button', { name: 'Encrypt' }).click();
      await page.waitForFunction(() => /encrypted \(LUKS/.test(document.querySelector('[data-testid=overlay-encryption]')?.textContent ?? ''), undefined, { timeout: TIMEOUT, polling: 500 });
      const encrypted = faster(await measure(page, 'encrypted-1'), await measure(page, 'encrypted-2'));
      results.plain.push(plain);
      results.encrypted.push(encrypted);
      console.log(`  round ${round + 1}: plain write ${plain.write.toFixed(1)} read ${plain.read.toFixed(1)} MiB/s; encrypted write ${encrypted.write.toFixed(1)} read ${encrypted.read.toFixed(1)} MiB/s`);
    } finally {
      await context.close();
    }
  }
} finally {
  await tab.close();
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const m = (kind, key) => median(results[kind].map((r) => r[key]));
console.log(`\nguest dd in the tab (${ROUNDS} round(s), median)`);
console.log('| direction | plain overlay MiB/s | encrypted overlay MiB/s | slowdown (plain/encrypted) | target |');
console.log('| --- | ---: | ---: | ---: | --- |');
for (const key of ['write', 'read']) {
  console.log(`| ${key} (${MIB} MiB, ${key === 'write' ? 'file copy, fsync' : 'cache dropped'}) | ${m('plain', key).toFixed(1)} | ${m('encrypted', key).toFixed(1)} | ${(m('plain', key) / m('encrypted', key)).toFixed(2)}x | <= 1.3x |`);
}

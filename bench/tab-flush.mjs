#!/usr/bin/env node
// Flush latency in the tab: the built app behind nginx in headless Chromium, the default guest booted with its
// disk on virtio and on IDE (?disk-bus=), and the guest's own clock around a `sync` right after writing 1 MiB
// (busybox time), three times per boot. A guest sync in the tab goes machine Worker -> disk Worker -> the OPFS
// handle's flush before it returns. Rounds: QCOW86_BENCH_ROUNDS (default 1). Never fails on speed.
import { join } from 'node:path';
import { buildTab, root, startTab } from './_tab.mjs';

const ROUNDS = Number(process.env.QCOW86_BENCH_ROUNDS ?? 1);
const BOOT_TIMEOUT = 600_000;

await buildTab();
const tab = await startTab(join(root, 'dist/web'));
const { nginx, browser } = tab;

const consoleText = (page) => page.evaluate(() => document.querySelector('#terminal .xterm-rows')?.textContent ?? '');

/** Types a command with a marker the shell computes, waits for the marker, returns the console text after the command. */
async function run(page, command) {
  const tag = `t${Math.random().toString(36).slice(2, 7)}`;
  await page.locator('#terminal').click();
  await page.keyboard.type(`${command}; echo ${tag}-$((1+1))`, { delay: 2 });
  await page.keyboard.press('Enter');
  await page.waitForFunction((marker) => (document.querySelector('#terminal .xterm-rows')?.textContent ?? '').includes(marker), `${tag}-2`, { timeout: 120_000, polling: 100 });
  return consoleText(page);
}

const results = { virtio: [], ide: [] };
try {
  for (let round = 0; round < ROUNDS; round++) {
    for (const bus of round % 2 ? ['ide', 'virtio'] : ['virtio', 'ide']) {
      const context = await browser.newContext();
      try {
        const page = await context.newPage();
        await page.goto(`${nginx.url}?disk-bus=${bus}`);
        await page.waitForFunction(() => /shell ready/.test(document.getElementById('phase')?.textContent ?? ''), undefined, { timeout: BOOT_TIMEOUT, polling: 500 });
        for (let i = 0; i < 3; i++) {
          await page.keyboard.press('Control+L').catch(() => {});
          const text = await run(page, `dd if=/dev/urandom of=/root/f${i} bs=1M count=1 2>/dev/null; time sync`);
          const all = [...text.matchAll(/real\s+(\d+)m\s*([\d.]+)s/g)];
          const last = all.at(-1);
          if (!last) throw new Error(`no time output on the console: ${text.slice(-300)}`);
          results[bus].push((Number(last[1]) * 60 + Number(last[2])) * 1000);
          console.log(`  round ${round + 1} ${bus}: sync after 1 MiB ${results[bus].at(-1).toFixed(0)} ms`);
        }
      } finally {
        await context.close();
      }
    }
  }
} finally {
  await tab.close();
}

const median = (values) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];
console.log(`\nFlush latency in the tab (guest \`time sync\` after writing 1 MiB; ${ROUNDS} round(s) of 3, median)`);
console.log('| disk bus | sync after 1 MiB |');
console.log('| --- | ---: |');
for (const bus of ['virtio', 'ide']) console.log(`| ${bus} | ${median(results[bus]).toFixed(0)} ms |`);

import { defineConfig } from '@playwright/test';

/**
 * End-to-end tests of the browser tab, driving Debian's chromium (Playwright never downloads a browser here).
 * Two projects: the `vite build` output served by nginx (the deployment the app is made for) runs every test;
 * the Vite dev server runs the tests tagged @dev (boot, write, reload), since guest boots dominate the suite's
 * time. Each project starts its own server through e2e/servers.ts.
 */
export default defineConfig({
  testDir: 'e2e',
  outputDir: 'test-results/e2e',
  // A test boots the guest up to four times; QCOW86_E2E_TEST_MS raises the limit on a busy machine.
  timeout: Number(process.env.QCOW86_E2E_TEST_MS ?? 900_000),
  expect: { timeout: 120_000 },
  // One guest boot at a time: they are CPU-bound and the machines have two cores.
  workers: 1,
  fullyParallel: false,
  reporter: [['list']],
  use: {
    headless: true,
    viewport: { width: 1400, height: 900 },
    acceptDownloads: true,
    screenshot: 'only-on-failure',
    launchOptions: {
      executablePath: '/usr/bin/chromium',
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    },
  },
  projects: [
    { name: 'dev', metadata: { server: 'dev' }, grep: /@dev/ },
    { name: 'nginx', metadata: { server: 'nginx' }, grepInvert: /@dev/ },
  ],
});

import { defineConfig } from '@playwright/test';

/**
 * End-to-end tests of the browser tab, driving Debian's chromium (Playwright never downloads a browser here).
 * Two projects run the same specs: against the Vite dev server and against the `vite build` output served by
 * nginx. Each spec starts its own server through e2e/servers.ts so that both are exercised the same way.
 */
export default defineConfig({
  testDir: 'e2e',
  outputDir: 'test-results/e2e',
  timeout: 900_000,
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
    { name: 'dev', metadata: { server: 'dev' } },
    { name: 'nginx', metadata: { server: 'nginx' } },
  ],
});

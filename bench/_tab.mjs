// The tab as the browser benchmarks drive it: the `vite build` output served by nginx (the test helper, loaded
// through Vite's module runner rather than copied) to Debian's headless Chromium. Not run by bench/run.mjs
// (leading _).
import { execFileSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const root = join(dirname(fileURLToPath(import.meta.url)), '..');

/**
 * Installs what the tab needs (chromium, nginx), builds the default guest when missing, runs `beforeBuild` (more
 * guests: vite copies public/ into the build), then builds the app into dist/web.
 */
export async function buildTab(beforeBuild = async () => {}) {
  execFileSync(process.execPath, [join(root, 'scripts/system-deps.mjs'), 'chromium', 'nginx-light'], { stdio: 'inherit' });
  execFileSync(process.execPath, [join(root, 'scripts/ensure-images.mjs')], { stdio: 'inherit' });
  await beforeBuild();
  execFileSync(process.execPath, [join(root, 'node_modules/vite/bin/vite.js'), 'build', '--logLevel', 'error'], { cwd: root, stdio: 'inherit' });
}

/** nginx serving `webRoot` (options as test/helpers/nginx.ts takes them) and a headless Chromium; close() ends both. */
export async function startTab(webRoot, nginxOptions = {}) {
  const { createServer } = await import('vite');
  const vite = await createServer({ configFile: false, root, logLevel: 'error', server: { middlewareMode: true, hmr: false, watch: null } });
  const { startNginx } = await vite.ssrLoadModule('/test/helpers/nginx.ts');
  const nginx = await startNginx(webRoot, nginxOptions);
  const { chromium } = await import('@playwright/test');
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  return {
    nginx,
    browser,
    async close() {
      await browser.close();
      await nginx.close();
      await vite.close();
    },
  };
}

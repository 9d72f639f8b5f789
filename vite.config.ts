/// <reference types="vitest/config" />
import { defineConfig } from 'vite';

// One config for the web app (src/web) and for Vitest.
export default defineConfig({
  root: '.',
  publicDir: 'public',
  test: {
    include: ['test/**/*.test.ts'],
    // Boot tests are costly: they live under test/boot and run in one worker (see the project below).
    testTimeout: 60_000,
    hookTimeout: 300_000,
    pool: 'forks',
  },
});

// Vitest setup file: after each test file's own hooks, its temporary directories go.
import { afterAll } from 'vitest';
import { cleanupTempDirs } from './temp.js';

afterAll(cleanupTempDirs);

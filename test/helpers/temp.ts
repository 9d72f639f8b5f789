/**
 * Temporary directories for tests. Each is removed after its test file (test/helpers/cleanup.ts registers the
 * hook for every file): Vitest's fork workers can end without Node's 'exit' event, and directories left behind
 * filled the disk of a machine that runs the suite repeatedly (256 MiB per differential run).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const tempDirs: string[] = [];
process.on('exit', cleanupTempDirs);

/** A fresh temporary directory, removed when its test file ends (or by cleanupTempDirs()). */
export function tempDir(prefix = 'qcow86-test-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  tempDirs.push(dir);
  return dir;
}

/** Removes every directory tempDir() made so far (symbolic links inside are removed, never followed). */
export function cleanupTempDirs(): void {
  for (const dir of tempDirs.splice(0)) rmSync(dir, { recursive: true, force: true });
}

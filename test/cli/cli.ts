/**
 * Runs the CLI as a user would: a child `node` process on the bundled CLI (test/helpers/build.ts compiles and
 * bundles src/ privately, so a concurrent build elsewhere cannot interfere). Exit codes are the child's real exit
 * codes.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { buildEngine } from '../helpers/build.js';
import type { RunResult } from '../helpers/qemu.js';
import { vi } from 'vitest';
import { main } from '../../src/node/cli.js';

export function qcow86(args: string[], options: { cwd?: string; timeoutMs?: number; env?: Record<string, string> } = {}): Promise<RunResult> {
  // The bundled CLI, as bin/qcow86.js runs it.
  const cli = pathToFileURL(join(buildEngine(), 'cli/cli.js')).href;
  // As bin/qcow86.js runs it.
  const script = `import { main, exitOnStrayErrors } from ${JSON.stringify(cli)}; exitOnStrayErrors(process.argv[1]); process.exitCode = await main(process.argv.slice(1));`;
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      ['--input-type=module', '-e', script, ...args],
      { cwd: options.cwd, maxBuffer: 256 * 1024 * 1024, encoding: 'utf8', timeout: options.timeoutMs ?? 120_000, ...(options.env ? { env: { ...process.env, ...options.env } } : {}) },
      (error, stdout, stderr) => {
        if (error && typeof error.code !== 'number') return reject(error);
        resolve({ stdout, stderr, exitCode: error ? (error.code as number) : 0 });
      },
    );
  });
}

/** The CLI's stdout parsed as JSON; fails with stderr when the command did not succeed. */
export async function qcow86Json(args: string[], options: { cwd?: string } = {}): Promise<any> {
  const result = await qcow86(args, options);
  if (result.exitCode !== 0) throw new Error(`qcow86 ${args.join(' ')} exited with ${result.exitCode}: ${result.stderr}`);
  return JSON.parse(result.stdout);
}

/**
 * The CLI run inside the test process (for tests that run it hundreds of times: a child process each would take
 * minutes), stdout and stderr captured. Tests using it also run the real binary at least once.
 */
export async function qcow86InProcess(args: string[]): Promise<RunResult> {
  let stdout = '';
  let stderr = '';
  const out = vi.spyOn(process.stdout, 'write').mockImplementation((chunk: string | Uint8Array) => ((stdout += String(chunk)), true));
  const log = vi.spyOn(console, 'log').mockImplementation((...parts: unknown[]) => void (stdout += `${parts.join(' ')}\n`));
  const error = vi.spyOn(console, 'error').mockImplementation((...parts: unknown[]) => void (stderr += `${parts.join(' ')}\n`));
  try {
    const exitCode = await main(args);
    return { stdout, stderr, exitCode };
  } finally {
    out.mockRestore();
    log.mockRestore();
    error.mockRestore();
  }
}

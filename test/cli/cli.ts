/**
 * Runs the CLI as a user would: a child `node` process on the compiled tree (test/helpers/build.ts compiles src/
 * privately, so a concurrent build elsewhere cannot interfere). Exit codes are the child's real exit codes.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { buildEngine } from '../helpers/build.js';
import type { RunResult } from '../helpers/qemu.js';

export function qcow86(args: string[], options: { cwd?: string; timeoutMs?: number } = {}): Promise<RunResult> {
  const cli = pathToFileURL(join(buildEngine(), 'node/cli.js')).href;
  const script = `import { main } from ${JSON.stringify(cli)}; process.exitCode = await main(process.argv.slice(1));`;
  return new Promise((resolve, reject) => {
    execFile(
      process.execPath,
      ['--input-type=module', '-e', script, ...args],
      { cwd: options.cwd, maxBuffer: 256 * 1024 * 1024, encoding: 'utf8', timeout: options.timeoutMs ?? 120_000 },
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

/**
 * Child processes in tests (crash writers, lock holders) run the compiled engine: this compiles src/ once per
 * test file into a private directory, so a concurrent `npm run build` elsewhere cannot interfere.
 */
import { execFileSync } from 'node:child_process';
import { symlinkSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { tempDir } from './qemu.js';

const root = resolve(import.meta.dirname, '../..');
let built: string | undefined;

/**
 * Directory holding the compiled qcow2/, io/, v86/ and node/ trees and the bundled CLI in cli/ (with
 * node_modules reachable for pako and friends, and ../public for the default guest).
 */
export function buildEngine(): string {
  if (built) return built;
  const dir = tempDir('qcow86-build-');
  const out = join(dir, 'dist');
  try {
    execFileSync(process.execPath, [join(root, 'node_modules/typescript/bin/tsc'), '-p', join(root, 'tsconfig.build.json'), '--outDir', out], { stdio: 'pipe' });
  } catch {
    // Type errors elsewhere in src/ do not stop emitting; the import below fails if the engine itself is missing.
  }
  symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'));
  // The CLI and the machine library find the default guest and the BIOS in ../public/images next to dist/.
  symlinkSync(join(root, 'public'), join(dir, 'public'));
  // The bundled CLI (dist/cli/), what bin/qcow86.js runs.
  execFileSync(process.execPath, [join(root, 'scripts/bundle-cli.mjs'), out], { stdio: 'pipe' });
  built = out;
  return out;
}

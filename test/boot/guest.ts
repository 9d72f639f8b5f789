/**
 * Booting the default guest from tests: builds public/images/ when missing (the same ensureImages as `npm start`)
 * and boots it with the library `qcow86 boot` is built on.
 */
import { ensureImages } from '../../images/build.mjs';
import { DEFAULT_BASE } from '../../src/node/boot-disk.js';
import { bootMachine, type BootedMachine } from '../../src/node/machine.js';
import type { Machine } from '../../src/v86/machine.js';
import type { DiskBus } from '../../src/v86/disk-bus.js';

export { DEFAULT_BASE };

/** This shared 2-core machine boots the guest in 20-120 s depending on load. */
export const BOOT_TIMEOUT_MS = 400_000;

export async function bootGuest(options: { overlay?: string; base?: string; log?: boolean; diskBus?: DiskBus } = {}): Promise<BootedMachine> {
  await ensureImages();
  const machine = await bootMachine({
    ...(options.overlay !== undefined ? { overlay: options.overlay } : {}),
    ...(options.base !== undefined ? { base: options.base } : {}),
    ...(options.diskBus !== undefined ? { diskBus: options.diskBus } : {}),
    timeout: 120_000,
    ...(options.log || process.env.QCOW86_SERIAL ? { onSerial: (text: string) => process.stderr.write(text) } : {}),
  });
  await machine.expect('# ', { timeout: BOOT_TIMEOUT_MS });
  return machine;
}

/** Runs a shell command and returns its output: the text between two unique markers the guest prints. */
export async function shell(machine: Machine, command: string, timeout = 120_000): Promise<string> {
  const tag = `q${Math.random().toString(36).slice(2, 8)}`;
  // The markers are built by the shell ($((...)) expansion) so the echoed command line never matches them.
  const result = await machine
    .send(`echo ${tag}-$((1+1)); ${command}; echo ${tag}-$((2+1)) rc=$?\n`)
    .expect(new RegExp(`${tag}-2\\n([\\s\\S]*?)${tag}-3 rc=(\\d+)\\n`), { timeout });
  const [, output = '', rc = '?'] = result.match;
  if (rc !== '0') throw new Error(`guest command failed (rc=${rc}): ${command}\n${output}`);
  return output;
}

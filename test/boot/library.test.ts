/**
 * `qcow86/machine`, the boot harness as a library, used as its users use it:
 *
 * - from Vitest: README's example, verbatim (test/boot/readme-example.ts is that example; a test here checks the
 *   README still shows exactly it), booting the default guest;
 * - from a plain Node script in a project that depends on qcow86 (node_modules/qcow86 holding package.json and
 *   a private build), importing `qcow86/machine` through the package's exports, on a disk nobody here built;
 * - from TypeScript in that project: the exports' types entry type-checks a consumer and rejects misuse.
 */
import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { beforeAll, describe, expect, test } from 'vitest';
import { ensureImages } from '../../images/build.mjs';
import { buildEngine } from '../helpers/build.js';
import { grubRescueDisk } from '../helpers/grub.js';
import { decodePng } from '../helpers/png.js';
import { tempDir } from '../helpers/qemu.js';
import './readme-example.js';

const root = resolve(import.meta.dirname, '../..');

// The README example boots the default guest: build it first when missing, as `npm start` does.
beforeAll(() => ensureImages(), 900_000);

test('README shows the Vitest example this suite runs', () => {
  const example = readFileSync(join(import.meta.dirname, 'readme-example.ts'), 'utf8').replace(/^\/\*\*[\s\S]*?\*\/\n/, '');
  expect(readFileSync(join(root, 'README.md'), 'utf8')).toContain('```ts\n' + example + '```');
});

describe('a project that depends on qcow86', { timeout: 600_000 }, () => {
  const project = tempDir('qcow86-consumer-');
  let disk: string;

  beforeAll(async () => {
    disk = await grubRescueDisk(project);
    // node_modules/qcow86 as npm would lay it out: the package's manifest and its build.
    const pkg = join(project, 'node_modules/qcow86');
    mkdirSync(pkg, { recursive: true });
    copyFileSync(join(root, 'package.json'), join(pkg, 'package.json'));
    symlinkSync(buildEngine(), join(pkg, 'dist'));
  }, 300_000);

  test('a plain Node script boots a disk, waits for its screen, types, and saves a screenshot', () => {
    writeFileSync(join(project, 'boot-test.mjs'), `
import { writeFileSync } from 'node:fs';
import { bootMachine } from 'qcow86/machine';

const machine = await bootMachine({ base: process.argv[2], memory: '64M', timeout: 120000 });
try {
  await machine.expect('GNU GRUB', { on: 'screen' });
  await machine.sendKeys('c').expect(/grub> +$/m, { on: 'screen' });
  await machine.sendKeys('echo "script-ok <<done"<Enter>');
  const { match } = await machine.expect(/^(script-\\S+) <done/m, { on: 'screen' });
  writeFileSync('screen.png', machine.screenshot());
  console.log(JSON.stringify({ echoed: match[1], lines: machine.screenText().split('\\n').length }));
} finally {
  await machine.close();
}
`);
    const run = spawnSync(process.execPath, ['boot-test.mjs', disk], { cwd: project, encoding: 'utf8', timeout: 300_000 });
    expect(run.status, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout)).toEqual({ echoed: 'script-ok', lines: 25 });
    const png = decodePng(readFileSync(join(project, 'screen.png')));
    expect([png.width, png.height]).toEqual([720, 400]);
  });

  test('TypeScript: the types entry checks a consumer and catches misuse', () => {
    const tsc = join(root, 'node_modules/typescript/bin/tsc');
    writeFileSync(join(project, 'tsconfig.json'), JSON.stringify({
      compilerOptions: { module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', strict: true, noEmit: true, skipLibCheck: true, types: ['node'], typeRoots: [join(root, 'node_modules/@types')] },
      files: ['consumer.ts'],
    }));
    writeFileSync(join(project, 'consumer.ts'), `
import { bootMachine, StepError, type BootMachineOptions, type ExpectResult } from 'qcow86/machine';
const options: BootMachineOptions = { base: 'disk.qcow2', overlay: 'run.qcow2', memory: '256M', resume: 'ready' };
export async function check(): Promise<Uint8Array> {
  const machine = await bootMachine(options);
  const result: ExpectResult = await machine.send('x\\n').expect(/y/, { timeout: 1000, on: 'serial' });
  await machine.sendKeys('<Ctrl-C>').expect('login:', { on: 'screen' });
  const text: string = machine.screenText() + result.text;
  await machine.saveSession(text);
  await machine.close();
  void StepError;
  return machine.screenshot();
}
`);
    const good = spawnSync(process.execPath, [tsc, '-p', project], { encoding: 'utf8' });
    expect(good.status, good.stdout + good.stderr).toBe(0);
    writeFileSync(join(project, 'consumer.ts'), `
import { bootMachine } from 'qcow86/machine';
export async function check(): Promise<void> {
  const machine = await bootMachine({ bass: 'typo.qcow2' });
  await machine.expect('x', { on: 'keyboard' });
}
`);
    const bad = spawnSync(process.execPath, [tsc, '-p', project], { encoding: 'utf8' });
    expect(bad.status).not.toBe(0);
    expect(bad.stdout).toMatch(/'bass' does not exist/);
    expect(bad.stdout).toMatch(/"keyboard"' is not assignable/);
  });
});

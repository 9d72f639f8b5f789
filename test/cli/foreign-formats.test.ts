/**
 * Images in formats qcow86 does not read (VMDK, VDI, VHDX, VHD, QED, Parallels), made by qemu-img: probing names
 * the format qemu-img finds (`qemu-img info`'s "format") and refuses, where taking them for raw disks would hand
 * out their container bytes as the guest's; `-f raw` still reads the bytes as given, as qemu-img does.
 */
import { describe, expect, it } from 'vitest';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuImg, run, tempDir } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

const dir = tempDir('qcow86-foreign-');

async function made(format: string, options: string[] = []): Promise<string> {
  const path = join(dir, `disk-${format}-${options.join('_').replace(/\W/g, '')}.img`);
  await qemuImg(['create', '-q', '-f', format, ...options.flatMap((o) => ['-o', o]), path, '4M']);
  const write = await run('qemu-io', ['-f', format, '-c', 'write -P 0x5a 64k 64k', path]);
  expect(write.exitCode, write.stderr).toBe(0);
  return path;
}

describe('images in formats qcow86 does not read', () => {
  const cases: [string, string[]][] = [
    ['vmdk', []],
    ['vmdk', ['subformat=monolithicFlat']],
    ['vdi', []],
    ['vhdx', []],
    ['vpc', []],
    ['qed', []],
    ['parallels', []],
  ];
  for (const [format, options] of cases) {
    it(`${format} ${options.join(' ')}: info and convert refuse it by name; -f raw reads its bytes like qemu-img`, async () => {
      const path = await made(format, options);
      const theirs = JSON.parse(await qemuImg(['info', '--output=json', path])) as { format: string };
      expect(theirs.format).toBe(format);
      for (const command of [['info', path], ['convert', '-O', 'raw', path, join(dir, 'out.raw')], ['map', '--output=json', path], ['check', path]]) {
        const ours = await qcow86(command);
        expect(ours.exitCode, `${command[0]}: ${ours.stdout}`).toBe(1);
        expect(ours.stderr).toContain(`this is a ${format} image, which qcow86 does not read`);
      }
      await qemuImg(['convert', '-f', 'raw', '-O', 'raw', path, join(dir, 'theirs.raw')]);
      const ours = await qcow86(['convert', '-f', 'raw', '-O', 'raw', path, join(dir, 'ours.raw')]);
      expect(ours.exitCode, ours.stderr).toBe(0);
      expect(Buffer.compare(await readFile(join(dir, 'ours.raw')), await readFile(join(dir, 'theirs.raw')))).toBe(0);
    });
  }

  it('text files: a VMDK descriptor is recognised exactly where qemu-img recognises one', async () => {
    // Which of these qemu-img takes for VMDK descriptors (and then fails to open) and which for raw disks.
    const heads = ['\nversion=1\n', '   \nversion=1\n', '  x\nversion=1\n', '#c\r\nversion=1\r\n', 'version=1\r\n', 'version=1', '\r\nversion=1\n',
      '  \r\nversion=2\n', 'version=3\n', 'version=4\n', '#a\n#b\n\n\nversion=2\n', ' version=1\n', '# Disk DescriptorFile\nversion=1\nCID=1\n', '<<< Oracle VM VirtualBox Disk Image >>>\n'];
    for (const [i, head] of heads.entries()) {
      const path = join(dir, `text-${i}.raw`);
      await writeFile(path, Buffer.concat([Buffer.from(head), Buffer.alloc(65536 - head.length)]));
      const theirs = await run('qemu-img', ['info', '--output=json', path]);
      const ours = await qcow86(['info', '--output=json', path]);
      const theirVmdk = theirs.exitCode !== 0 && theirs.stderr.includes('VMDK');
      expect(theirVmdk || JSON.parse(theirs.stdout).format === 'raw', `${JSON.stringify(head)}: ${theirs.stderr}`).toBe(true);
      if (theirVmdk) {
        expect(ours.exitCode, JSON.stringify(head)).toBe(1);
        expect(ours.stderr).toContain('this is a vmdk image');
      } else {
        expect(ours.exitCode, `${JSON.stringify(head)}: ${ours.stderr}`).toBe(0);
        expect(JSON.parse(ours.stdout).format).toBe('raw');
      }
    }
  });
});

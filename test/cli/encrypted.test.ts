/**
 * Encrypted qcow2 images made by qemu-img (LUKS with its defaults, LUKS aes-128-cbc-essiv, the legacy AES
 * method): `info` shows them as qemu-img does without the key (JSON and human, every field of the LUKS header);
 * reading their data is refused by name (qcow86 does not decrypt; qemu-img needs the secret for it).
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { qemuImg, run, tempDir } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

const dir = tempDir('qcow86-encrypted-');

async function encrypted(name: string, options: string): Promise<string> {
  const path = join(dir, name);
  await qemuImg(['create', '-q', '--object', 'secret,id=sec0,data=abc', '-f', 'qcow2', '-o', `${options},encrypt.key-secret=sec0`, path, '4M']);
  return path;
}

const withoutActualSize = (json: string) => {
  const info = JSON.parse(json);
  delete info['actual-size'];
  return info;
};

describe('encrypted images', () => {
  const cases: [string, string][] = [
    ['luks.qcow2', 'encrypt.format=luks'],
    ['luks-cbc.qcow2', 'encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256'],
    ['aes.qcow2', 'encrypt.format=aes'],
  ];
  for (const [name, options] of cases) {
    it(`${options}: info as qemu-img's; data refused`, async () => {
      const path = await encrypted(name, options);
      const theirs = await qemuImg(['info', '--output=json', path]);
      const ours = await qcow86(['info', '--output=json', path]);
      expect(ours.exitCode, ours.stderr).toBe(0);
      expect(withoutActualSize(ours.stdout)).toEqual(withoutActualSize(theirs));
      expect(JSON.parse(ours.stdout).encrypted).toBe(true);
      const human = await qcow86(['info', path]);
      const theirHuman = await qemuImg(['info', path]);
      const noDiskSize = (text: string) => text.replace(/^disk size: .*$/m, '');
      expect(noDiskSize(human.stdout)).toBe(noDiskSize(theirHuman));
      for (const command of [['convert', '-O', 'raw', path, join(dir, 'out.raw')], ['map', path], ['compare', path, path], ['io', '-c', 'read 0 64k', path]]) {
        const result = await qcow86(command);
        // compare's error code is 2, as qemu-img's (1 means 'different').
        expect(result.exitCode, `${command[0]}: ${result.stdout}`).toBe(command[0] === 'compare' ? 2 : 1);
        expect(result.stderr).toContain('encrypted images are not supported');
      }
      // qemu-img cannot read the data without the secret either.
      expect((await run('qemu-img', ['convert', '-O', 'raw', path, join(dir, 'theirs.raw')])).exitCode).toBe(1);
    });
  }
});

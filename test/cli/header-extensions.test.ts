/**
 * Header extensions validated on open as QEMU 7.2 validates them: images made by qemu-img (persistent bitmaps
 * added with `qemu-img bitmap`, a LUKS image), one field patched per case. Wherever qemu-img refuses to open the
 * image, we refuse too, with an error naming the field; wherever it opens it, so do we, and info agrees.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { qemuImg, run, tempDir } from '../helpers/qemu.js';
import { qcow86 } from './cli.js';

const dir = tempDir('qcow86-extensions-');
const EXT_BITMAPS = 0x23852875;
const EXT_BACKING_FORMAT = 0xe2792aca;
let template: string;

/** Offset of the extension of `type` in the header (its type field), by walking the extensions. */
function extensionAt(bytes: Buffer, type: number): number {
  let at = bytes.readUInt32BE(100); // header_length (version 3)
  for (;;) {
    const t = bytes.readUInt32BE(at);
    if (t === 0) throw new Error(`no extension ${type.toString(16)}`);
    if (t === type) return at;
    at += 8 + Math.ceil(bytes.readUInt32BE(at + 4) / 8) * 8;
  }
}

beforeAll(async () => {
  template = join(dir, 'bitmaps.qcow2');
  await qemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', template, '64M']);
  await qemuImg(['bitmap', '--add', '-g', '65536', template, 'first']);
  await qemuImg(['bitmap', '--add', '--disable', template, 'second']);
});

type Patch = (bytes: Buffer, ext: number, directory: number) => void;

const cases: [string, string, Patch][] = [
  ['the untouched image', '', () => {}],
  ['extension length 16', 'bitmaps extension length', (b, ext) => b.writeUInt32BE(16, ext + 4)],
  ['reserved field set', 'bitmaps reserved', (b, ext) => b.writeUInt32BE(1, ext + 12)],
  ['zero bitmaps', 'nb_bitmaps', (b, ext) => b.writeUInt32BE(0, ext + 8)],
  ['65536 bitmaps', 'nb_bitmaps', (b, ext) => b.writeUInt32BE(65536, ext + 8)],
  ['three bitmaps listed, two in the directory', 'nb_bitmaps', (b, ext) => b.writeUInt32BE(3, ext + 8)],
  ['one bitmap listed, two in the directory', 'nb_bitmaps', (b, ext) => b.writeUInt32BE(1, ext + 8)],
  ['directory offset not aligned', 'bitmap_directory_offset', (b, ext) => b.writeBigUInt64BE(b.readBigUInt64BE(ext + 24) + 512n, ext + 24)],
  ['directory size over the maximum', 'bitmap_directory_size', (b, ext) => b.writeBigUInt64BE(67107841n, ext + 16)],
  ['directory size cutting an entry', 'bitmap directory', (b, ext) => b.writeBigUInt64BE(b.readBigUInt64BE(ext + 16) - 8n, ext + 16)],
  ['bitmap table size 0', 'bitmap_table_size', (b, _e, d) => b.writeUInt32BE(0, d + 8)],
  ['bitmap table offset not aligned', 'bitmap_table_offset', (b, _e, d) => b.writeBigUInt64BE(b.readBigUInt64BE(d) + 8n, d)],
  ['reserved flag', 'flags', (b, _e, d) => b.writeUInt32BE(b.readUInt32BE(d + 12) | 4, d + 12)],
  ['type 2', 'type', (b, _e, d) => b.writeUInt8(2, d + 16)],
  ['granularity bits 8', 'granularity_bits', (b, _e, d) => b.writeUInt8(8, d + 17)],
  ['granularity bits 32', 'granularity_bits', (b, _e, d) => b.writeUInt8(32, d + 17)],
  ['extra data', 'extra_data_size', (b, _e, d) => b.writeUInt32BE(8, d + 20)],
  ['bitmaps not consistent (autoclear bit 0 clear): ignored', '', (b) => b.writeBigUInt64BE(b.readBigUInt64BE(88) & ~1n, 88)],
  ['not consistent and a damaged directory: still ignored', '', (b, ext) => {
    b.writeBigUInt64BE(b.readBigUInt64BE(88) & ~1n, 88);
    b.writeUInt32BE(0, ext + 8);
  }],
  ['backing format extension of 16 bytes', 'backing format', (b) => {
    // The bitmaps extension becomes a backing format extension of 16 bytes, which QEMU refuses by its length.
    const ext = extensionAt(b, EXT_BITMAPS);
    b.writeUInt32BE(EXT_BACKING_FORMAT, ext);
    b.writeUInt32BE(16, ext + 4);
  }],
  ['an encryption header extension in an image without encryption', 'crypt_method', (b) => {
    const ext = extensionAt(b, EXT_BITMAPS);
    b.writeUInt32BE(0x0537be77, ext);
    b.writeUInt32BE(16, ext + 4);
  }],
];

describe('header extensions are validated as QEMU 7.2 validates them', () => {
  for (const [name, field, patch] of cases) {
    it(name, async () => {
      const path = join(dir, `${name.replace(/[^a-z0-9]+/gi, '-')}.qcow2`);
      copyFileSync(template, path);
      const bytes = readFileSync(path);
      const ext = extensionAt(bytes, EXT_BITMAPS);
      const directory = Number(bytes.readBigUInt64BE(ext + 24));
      patch(bytes, ext, directory);
      writeFileSync(path, bytes);
      const theirs = await run('qemu-img', ['info', '--output=json', path]);
      const ours = await qcow86(['info', '--output=json', path]);
      expect(ours.exitCode, `${name}: ours ${ours.stderr} / qemu-img ${theirs.stderr}`).toBe(theirs.exitCode);
      for (const command of [['check', path], ['convert', '-O', 'raw', path, join(dir, 'out.raw')]]) {
        const theirResult = await run('qemu-img', command);
        const ourResult = await qcow86(command);
        expect(ourResult.exitCode === 1, `${command[0]}: ours ${ourResult.stderr} / qemu-img ${theirResult.stderr}`).toBe(theirResult.exitCode === 1);
      }
      if (theirs.exitCode === 0) {
        const strip = (json: string) => {
          const info = JSON.parse(json);
          delete info['actual-size'];
          return info;
        };
        expect(strip(ours.stdout)).toEqual(strip(theirs.stdout));
      } else {
        // The refusal names the field.
        expect(ours.stderr).toContain(field);
      }
    });
  }
});

/**
 * LUKS in every parameter set qemu-img 7.2 creates with AES: 128/192/256-bit keys, XTS and CBC, IV generators
 * plain, plain64 and essiv (sha256, QEMU's default for it), PBKDF2/anti-forensic hashes sha1, sha256, sha512 -
 * except AES-192 in CBC mode, which qemu-img 7.2 aborts on (an assertion: its key material is not whole sectors).
 * - Images qemu-img creates and qemu-io writes read back byte-identical in qcow86 (and `info` shows them as
 *   qemu-img does). qemu-img spends about a second calibrating PBKDF2 per image, so its headers are made for a
 *   covering set: every cipher/mode/ivgen combination, each with a different hash, every key size with every hash.
 * - Images qcow86 creates, in all 54 sets: what qcow86 writes reads back in qemu-img, what qemu-io then writes
 *   into them reads back in qcow86, and qemu-img check finds nothing wrong. So QEMU unlocks every header qcow86
 *   makes and both sides encrypt the payload (keyed by host offsets) identically in every set.
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { run, qemuImg, tempDir, type ImageWrite } from '../helpers/qemu.js';
import { SECRET, applyWrites, firstDifference, imageOpts, luksOptions, openEncrypted, ourContents, ourLuks, qemuContents, qemuLuks, qemuWrite } from '../helpers/luks.js';
import type { CipherSpec, HashAlgorithm } from '../../src/qcow2/crypto.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { FileStore } from '../../src/io/node.js';
import { encryptionInfo } from '../../src/qcow2/encryption.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const dir = tempDir('qcow86-luks-params-');

/** Whole clusters, unaligned runs inside a cluster and across a cluster boundary, a zero write, the last sector. */
const FIRST: ImageWrite[] = [
  { offset: 0, length: 65536, pattern: 0x11 },
  { offset: 100_000, length: 5000, pattern: 0x22 },
  { offset: 130_000, length: 3000, pattern: 0x33 },
  { offset: 196_608, length: 65536, zero: true },
  { offset: MiB, length: 512, pattern: 0x44 },
  { offset: SIZE - 4096, length: 4096, pattern: 0x55 },
];
/** Written second (by the other side): in place into clusters already there, and into new ones. */
const SECOND: ImageWrite[] = [
  { offset: 50, length: 10, pattern: 0x66 },
  { offset: 2 * MiB + 7, length: 70_000, pattern: 0x77 },
  { offset: 129_000, length: 2000, pattern: 0x88 },
];

const HASHES: HashAlgorithm[] = ['sha1', 'sha256', 'sha512'];
interface ParameterSet {
  spec: CipherSpec;
  hash: HashAlgorithm;
  name: string;
  /** In the covering subset qemu-img makes headers for. */
  covering: boolean;
}
const SETS: ParameterSet[] = [];
[16, 24, 32].forEach((aesKeyBytes, k) =>
  (['xts', 'cbc'] as const).forEach((mode, m) =>
    (['plain', 'plain64', 'essiv'] as const).forEach((ivgen, g) => {
      const spec: CipherSpec = { aesKeyBytes: aesKeyBytes as 16 | 24 | 32, mode, ivgen, ivgenHash: ivgen === 'essiv' ? 'sha256' : undefined };
      HASHES.forEach((hash, h) => {
        const name = `aes-${aesKeyBytes * 8}-${mode}-${ivgen}${ivgen === 'essiv' ? ':sha256' : ''} ${hash}`;
        // qemu-img 7.2 aborts on aes-192-cbc (its key material, 96000 bytes, is not whole sectors): not a set it
        // creates, and one qcow86 refuses to create (see encrypted.test.ts).
        if (aesKeyBytes === 24 && mode === 'cbc') return;
        SETS.push({ spec, hash, name, covering: h === (k + m + g) % 3 });
      });
    }),
  ),
);

function expected(...writes: ImageWrite[][]): Uint8Array {
  const image = new Uint8Array(SIZE);
  for (const list of writes) applyWrites(image, list);
  return image;
}

/** Applies writes with our engine, as qemu-io would. */
async function ourWrite(path: string, writes: ImageWrite[]): Promise<void> {
  const image = await openEncrypted(path, { readOnly: false });
  if (!(image instanceof Qcow2Image)) throw new Error('not qcow2');
  try {
    for (const w of writes) {
      if ('pattern' in w) await image.write(w.offset, new Uint8Array(w.length).fill(w.pattern));
      else await image.writeZeroes(w.offset, w.length);
    }
  } finally {
    await image.close();
  }
}

describe.concurrent('LUKS images made by qemu-img, read by qcow86', () => {
  for (const set of SETS.filter((s) => s.covering)) {
    it(set.name, async () => {
      const path = await qemuLuks(join(dir, `qemu ${set.name}.qcow2`), SIZE, luksOptions(set.spec, set.hash), FIRST);
      expect(firstDifference(await ourContents(path), expected(FIRST))).toBe(-1);
      // info's encrypt object from the header qemu-img wrote (the engine call: these tests run concurrently, and the
      // in-process CLI captures the process's console).
      const theirs = JSON.parse(await qemuImg(['info', '--output=json', path]));
      const store = await FileStore.open(path, { readOnly: true });
      try {
        const { header } = await Qcow2Image.readMetadata(store);
        expect(await encryptionInfo(store, header)).toEqual(theirs['format-specific'].data.encrypt);
      } finally {
        await store.close();
      }
      // qemu-img's PBKDF2 calibration takes seconds on a busy machine and is retried when it measures nothing.
    }, 300_000);
  }
});

describe.concurrent('LUKS images made by qcow86, read and written by QEMU', () => {
  for (const set of SETS) {
    it(set.name, async () => {
      const path = await ourLuks(join(dir, `ours ${set.name}.qcow2`), { size: SIZE, cipher: set.spec, hash: set.hash });
      await ourWrite(path, FIRST);
      // qemu-io unlocks our header and writes into what we wrote; qemu-img then reads both (FIRST's bytes that
      // SECOND does not cover are ours).
      await qemuWrite(path, SECOND);
      const both = expected(FIRST, SECOND);
      expect(firstDifference(await ourContents(path), both)).toBe(-1);
      expect(firstDifference(await qemuContents(path), both)).toBe(-1);
      const check = await run('qemu-img', ['check', ...SECRET, '--output=json', '--image-opts', imageOpts(path)]);
      expect(check.exitCode, check.stderr + check.stdout).toBe(0);
    }, 120_000);
  }
});

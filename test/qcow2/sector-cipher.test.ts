/**
 * The XTS, CBC and ESSIV layers (src/qcow2/sector-cipher.ts) against independent implementations: Node's own
 * aes-128-xts / aes-256-xts and aes-*-cbc (OpenSSL), and for AES-192-XTS (which Node lacks) a block-at-a-time
 * reference written from IEEE 1619 on Node's aes-192-ecb. Both providers run the same layers: Node's crypto and
 * the browser's (@noble/ciphers, @noble/hashes, WebCrypto's PBKDF2) must give the same bytes. The LUKS
 * anti-forensic split/merge round-trips. Images made by QEMU check all of it end to end (test/cli/encrypted*).
 */
import { describe, expect, it } from 'vitest';
import { createCipheriv, createDecipheriv, createHash, pbkdf2Sync, randomBytes } from 'node:crypto';
import { SectorCipher } from '../../src/qcow2/sector-cipher.js';
import { afMerge, afSplit } from '../../src/qcow2/luks.js';
import { nodeCryptoPrimitives } from '../../src/io/node-crypto.js';
import { webCrypto } from '../../src/io/web-crypto.js';
import type { CipherSpec, HashAlgorithm } from '../../src/qcow2/crypto.js';

const node = nodeCryptoPrimitives();
const web = webCrypto();

/** 16-byte little-endian sector number (plain64), or its low 32 bits (plain). */
function plainIv(sector: number, wide = true): Buffer {
  const iv = Buffer.alloc(16);
  iv.writeUInt32LE(sector % 2 ** 32, 0);
  if (wide) iv.writeUInt32LE(Math.floor(sector / 2 ** 32), 4);
  return iv;
}

/** IEEE 1619 XTS over one data unit, one block at a time on an ECB cipher: the reference for AES-192-XTS. */
function referenceXts(decrypt: boolean, key: Buffer, iv: Buffer, data: Buffer): Buffer {
  const half = key.length / 2;
  const ecb = (k: Buffer, enc: boolean) => {
    const c = enc ? createCipheriv(`aes-${half * 8}-ecb`, k, null) : createDecipheriv(`aes-${half * 8}-ecb`, k, null);
    c.setAutoPadding(false);
    return c;
  };
  const tweak = ecb(key.subarray(half), true).update(iv);
  const block = ecb(key.subarray(0, half), !decrypt);
  const out = Buffer.alloc(data.length);
  for (let at = 0; at < data.length; at += 16) {
    const x = Buffer.alloc(16);
    for (let i = 0; i < 16; i++) x[i] = data[at + i]! ^ tweak[i]!;
    const y = block.update(x);
    for (let i = 0; i < 16; i++) out[at + i] = y[i]! ^ tweak[i]!;
    // tweak *= x in GF(2^128), little-endian bytes.
    let carry = 0;
    for (let i = 0; i < 16; i++) {
      const next = tweak[i]! >> 7;
      tweak[i] = ((tweak[i]! << 1) | carry) & 0xff;
      carry = next;
    }
    if (carry) tweak[0]! ^= 0x87;
  }
  return out;
}

/** What one sector should encrypt to, per an independent implementation. */
function expectedSector(spec: CipherSpec, key: Buffer, sector: number, plain: Buffer): Buffer {
  let iv = plainIv(sector, spec.ivgen !== 'plain');
  if (spec.ivgen === 'essiv') {
    const salt = createHash(spec.ivgenHash!).update(key).digest();
    const essiv = createCipheriv(`aes-${salt.length * 8}-ecb`, salt, null);
    essiv.setAutoPadding(false);
    iv = essiv.update(iv);
  }
  if (spec.mode === 'cbc') {
    const c = createCipheriv(`aes-${spec.aesKeyBytes * 8}-cbc`, key, iv);
    c.setAutoPadding(false);
    return c.update(plain);
  }
  if (spec.aesKeyBytes === 24) return referenceXts(false, key, iv, plain);
  const c = createCipheriv(`aes-${spec.aesKeyBytes * 8}-xts`, key, iv);
  return Buffer.concat([c.update(plain), c.final()]);
}

const SPECS: CipherSpec[] = [];
for (const aesKeyBytes of [16, 24, 32] as const) {
  for (const mode of ['xts', 'cbc'] as const) {
    for (const ivgen of ['plain', 'plain64', 'essiv'] as const) SPECS.push({ aesKeyBytes, mode, ivgen, ivgenHash: ivgen === 'essiv' ? 'sha256' : undefined });
  }
}
// ESSIV's cipher takes the digest's size: md5 makes it AES-128 whatever the data cipher.
SPECS.push({ aesKeyBytes: 32, mode: 'cbc', ivgen: 'essiv', ivgenHash: 'md5' });

describe('sector cipher', () => {
  // Sector numbers past 2^32 tell plain from plain64; the last sector is short (key material ends mid-sector).
  const first = 2 ** 32 - 3;
  // Long enough that the browser provider decrypts through WebCrypto (above its 8 KiB threshold).
  const data = randomBytes(40 * 512 + 256);

  for (const spec of SPECS) {
    const name = `aes-${spec.aesKeyBytes * 8}-${spec.mode}-${spec.ivgen}${spec.ivgenHash ? `:${spec.ivgenHash}` : ''}`;
    it(`${name}: matches OpenSSL sector by sector, in both providers, and decrypts back`, async () => {
      const key = randomBytes(spec.mode === 'xts' ? spec.aesKeyBytes * 2 : spec.aesKeyBytes);
      const expected = Buffer.alloc(data.length);
      for (let at = 0; at < data.length; at += 512) {
        const piece = data.subarray(at, Math.min(data.length, at + 512));
        expected.set(expectedSector(spec, key, first + at / 512, piece), at);
      }
      for (const provider of [node, web]) {
        const cipher = new SectorCipher(provider, spec, key);
        const encrypted = cipher.encrypt(data, first);
        expect(Buffer.from(encrypted).equals(expected)).toBe(true);
        // In place, and from an unaligned view (the layer copies to work on whole words).
        const copy = new Uint8Array(encrypted.length + 1).subarray(1);
        copy.set(encrypted);
        cipher.decrypt(copy, first);
        expect(Buffer.from(copy).equals(data)).toBe(true);
        // The data path's asynchronous decryption, two runs at once, one of them from an unaligned view.
        const a = encrypted.slice(0, 20 * 512);
        const b = new Uint8Array(encrypted.length - 20 * 512 + 1).subarray(1);
        b.set(encrypted.subarray(20 * 512));
        await Promise.all([cipher.decryptAsync(a, first), cipher.decryptAsync(b, first + 20)]);
        expect(Buffer.from(a).equals(data.subarray(0, 20 * 512))).toBe(true);
        expect(Buffer.from(b).equals(data.subarray(20 * 512))).toBe(true);
      }
    });
  }

  it('the browser provider decrypts bulk blocks through WebCrypto, equal to OpenSSL ECB, at every size', async () => {
    expect(globalThis.crypto?.subtle).toBeDefined();
    for (const keyBytes of [16, 24, 32]) {
      const key = randomBytes(keyBytes);
      const aes = web.aes(key);
      expect(aes.decryptBlocksAsync).toBeDefined();
      for (const length of [16, 8176, 8192, 8208, 65536, 1 << 20]) {
        const blocks = randomBytes(length);
        const decipher = createDecipheriv(`aes-${keyBytes * 8}-ecb`, key, null).setAutoPadding(false);
        const expected = Buffer.concat([decipher.update(blocks), decipher.final()]);
        const got = await aes.decryptBlocksAsync!(blocks);
        expect(got.length).toBe(length);
        expect(Buffer.from(got).equals(expected)).toBe(true);
      }
    }
  });

  it('refuses data that is not whole blocks, and keys of the wrong size', () => {
    const cipher = new SectorCipher(node, { aesKeyBytes: 32, mode: 'xts', ivgen: 'plain64' }, randomBytes(64));
    expect(() => cipher.encrypt(new Uint8Array(100), 0)).toThrow(/whole 16-byte blocks/);
    expect(() => new SectorCipher(node, { aesKeyBytes: 32, mode: 'xts', ivgen: 'plain64' }, randomBytes(32))).toThrow(/64 bytes, not 32/);
  });
});

describe('LUKS primitives in both providers', () => {
  for (const hash of ['sha1', 'sha256', 'sha512', 'md5', 'ripemd160', 'sha224', 'sha384'] as HashAlgorithm[]) {
    it(`${hash}: anti-forensic split and merge round-trip; PBKDF2 and hashes agree with OpenSSL`, async () => {
      // 48 and 64-byte keys against 20..64-byte digests: whole and partial hash pieces.
      for (const keyBytes of [16, 48, 64]) {
        const key = randomBytes(keyBytes);
        const split = afSplit(node, hash, key, 4000);
        expect(Buffer.from(afMerge(node, hash, split, keyBytes, 4000)).equals(key)).toBe(true);
        expect(Buffer.from(afMerge(web, hash, split, keyBytes, 4000)).equals(key)).toBe(true);
      }
      const password = Buffer.from('pässwörd');
      const salt = randomBytes(32);
      const reference = pbkdf2Sync(password, salt, 1000, 64, hash);
      expect(Buffer.from(await node.pbkdf2(hash, password, salt, 1000, 64)).equals(reference)).toBe(true);
      expect(Buffer.from(await web.pbkdf2(hash, password, salt, 1000, 64)).equals(reference)).toBe(true);
      expect(Buffer.from(web.hash(hash, salt)).equals(createHash(hash).update(salt).digest())).toBe(true);
    });
  }
});

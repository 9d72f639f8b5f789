/**
 * The engine's cryptography in a browser (or any Worker). WebCrypto has AES-CBC, -CTR and -GCM but neither ECB nor
 * XTS, and its calls are asynchronous: the AES block comes from @noble/ciphers (audited, constant-time, no
 * dependencies) and the hashes the LUKS anti-forensic splitter needs thousands of times from @noble/hashes;
 * PBKDF2 - the expensive part, calibrated to take seconds - is WebCrypto's native one where it has the hash.
 * Bulk decryption (every read of an encrypted disk) goes through WebCrypto's native AES-CBC, which is an ECB
 * decryption plus a chaining XOR that is undone here: several times faster than AES in JavaScript.
 */
import { cbc, ecb } from '@noble/ciphers/aes.js';
import { md5, ripemd160, sha1 } from '@noble/hashes/legacy.js';
import { sha224, sha256, sha384, sha512 } from '@noble/hashes/sha2.js';
import { pbkdf2Async } from '@noble/hashes/pbkdf2.js';
import type { AesKey, CryptoProvider, HashAlgorithm } from '../qcow2/crypto.js';

const HASHES = { md5, sha1, sha224, sha256, sha384, sha512, ripemd160 } as const;
const WEB_HASH_NAMES: Partial<Record<HashAlgorithm, string>> = { sha1: 'SHA-1', sha256: 'SHA-256', sha384: 'SHA-384', sha512: 'SHA-512' };
/** crypto.getRandomValues fills at most this many bytes per call. */
const RANDOM_CHUNK = 65536;

/**
 * Below this many bytes a WebCrypto call (a round trip to another thread) costs more than AES in JavaScript.
 * Measured in Node 20 (the same split as in a browser): at 8 KiB noble takes 0.09-0.10 ms and a WebCrypto call
 * 0.08-0.19 ms; at 64 KiB 0.56-0.72 ms against 0.19-0.21 ms.
 */
const NATIVE_MIN_BYTES = 8192;
const ZERO_IV = new Uint8Array(16);

/** One AES key. noble's ciphers are single-use, so each call makes one (the key schedule is cheap next to the data). */
class NobleAesKey implements AesKey {
  private cbcKey: Promise<CryptoKey> | undefined;

  constructor(
    private readonly key: Uint8Array,
    private readonly subtle: SubtleCrypto | undefined,
  ) {
    if (key.length !== 16 && key.length !== 24 && key.length !== 32) throw new Error(`an AES key is 16, 24 or 32 bytes, not ${key.length}`);
  }

  encryptBlocks(data: Uint8Array): Uint8Array {
    return ecb(this.key, { disablePadding: true }).encrypt(data);
  }

  decryptBlocks(data: Uint8Array): Uint8Array {
    return ecb(this.key, { disablePadding: true }).decrypt(data);
  }

  /**
   * ECB decryption by WebCrypto's AES-CBC: decrypting C_1..C_n from a zero IV gives D(C_i) xor C_(i-1), so XORing
   * each output block with the ciphertext block before it leaves D(C_i). CBC decryption also checks PKCS#7
   * padding; one more block, E(C_n xor 0x10...), decrypts (after its XOR with C_n) to a whole block of padding,
   * which WebCrypto checks and strips, leaving exactly n blocks.
   */
  async decryptBlocksAsync(data: Uint8Array): Promise<Uint8Array> {
    const subtle = this.subtle;
    if (!subtle || data.length < NATIVE_MIN_BYTES) return this.decryptBlocks(data);
    this.cbcKey ??= subtle.importKey('raw', this.key as Uint8Array<ArrayBuffer>, 'AES-CBC', false, ['decrypt']);
    const n = data.length;
    const input = new Uint8Array(n + 16);
    input.set(data);
    const pad = data.slice(n - 16);
    for (let i = 0; i < 16; i++) pad[i]! ^= 16;
    input.set(this.encryptBlocks(pad), n);
    const out = new Uint8Array(await subtle.decrypt({ name: 'AES-CBC', iv: ZERO_IV }, await this.cbcKey, input));
    if (out.length !== n) throw new Error(`AES-CBC decryption returned ${out.length} bytes for ${n}`);
    // Undo the chaining; input's copy of the ciphertext is 4-byte aligned, as out is.
    const plain = new Uint32Array(out.buffer, 0, n >>> 2);
    const cipher = new Uint32Array(input.buffer, 0, n >>> 2);
    for (let i = 4; i < plain.length; i++) plain[i]! ^= cipher[i - 4]!;
    return out;
  }

  encryptCbc(iv: Uint8Array, data: Uint8Array): Uint8Array {
    return cbc(this.key, iv, { disablePadding: true }).encrypt(data);
  }
}

export function webCrypto(): CryptoProvider {
  const subtle = globalThis.crypto?.subtle;
  return {
    aes: (key) => new NobleAesKey(key.slice(), subtle),
    hash: (algorithm, data) => HASHES[algorithm](data),
    async pbkdf2(algorithm, password, salt, iterations, length) {
      const name = WEB_HASH_NAMES[algorithm];
      if (!subtle || !name) return pbkdf2Async(HASHES[algorithm], password, salt, { c: iterations, dkLen: length });
      const key = await subtle.importKey('raw', password as Uint8Array<ArrayBuffer>, 'PBKDF2', false, ['deriveBits']);
      const bits = await subtle.deriveBits({ name: 'PBKDF2', hash: name, salt: salt as Uint8Array<ArrayBuffer>, iterations }, key, length * 8);
      return new Uint8Array(bits);
    },
    randomBytes(length) {
      const out = new Uint8Array(length);
      for (let at = 0; at < length; at += RANDOM_CHUNK) globalThis.crypto.getRandomValues(out.subarray(at, Math.min(length, at + RANDOM_CHUNK)));
      return out;
    },
    clock: () => performance.now(),
  };
}

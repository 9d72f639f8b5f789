/**
 * The engine's cryptography in a browser (or any Worker). WebCrypto has AES-CBC, -CTR and -GCM but neither ECB nor
 * XTS, and its calls are asynchronous: the AES block comes from @noble/ciphers (audited, constant-time, no
 * dependencies) and the hashes the LUKS anti-forensic splitter needs thousands of times from @noble/hashes;
 * PBKDF2 - the expensive part, calibrated to take seconds - is WebCrypto's native one where it has the hash.
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

/** One AES key. noble's ciphers are single-use, so each call makes one (the key schedule is cheap next to the data). */
class NobleAesKey implements AesKey {
  constructor(private readonly key: Uint8Array) {
    if (key.length !== 16 && key.length !== 24 && key.length !== 32) throw new Error(`an AES key is 16, 24 or 32 bytes, not ${key.length}`);
  }

  encryptBlocks(data: Uint8Array): Uint8Array {
    return ecb(this.key, { disablePadding: true }).encrypt(data);
  }

  decryptBlocks(data: Uint8Array): Uint8Array {
    return ecb(this.key, { disablePadding: true }).decrypt(data);
  }

  encryptCbc(iv: Uint8Array, data: Uint8Array): Uint8Array {
    return cbc(this.key, iv, { disablePadding: true }).encrypt(data);
  }
}

export function webCrypto(): CryptoProvider {
  const subtle = globalThis.crypto?.subtle;
  return {
    aes: (key) => new NobleAesKey(key.slice()),
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

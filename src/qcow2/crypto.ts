/**
 * The cryptography the engine needs for encrypted images, as an interface the caller injects (the way codecs
 * are): the engine never picks an implementation. Node passes its `crypto` module (src/io/node-crypto.ts), the
 * browser a vetted library for the AES block plus WebCrypto's PBKDF2 (src/io/web-crypto.ts). What is built on
 * top of the block cipher - the XTS and CBC sector modes and the IV generators - is in sector-cipher.ts and is
 * the same everywhere.
 */

/** The hash algorithms QEMU's LUKS code knows, by the names it writes into LUKS headers. */
export type HashAlgorithm = 'md5' | 'sha1' | 'sha224' | 'sha256' | 'sha384' | 'sha512' | 'ripemd160';

export const HASH_LENGTHS: Readonly<Record<HashAlgorithm, number>> = {
  md5: 16,
  sha1: 20,
  sha224: 28,
  sha256: 32,
  sha384: 48,
  sha512: 64,
  ripemd160: 20,
};

export function isHashAlgorithm(name: string): name is HashAlgorithm {
  return Object.hasOwn(HASH_LENGTHS, name);
}

/** One AES key (16, 24 or 32 bytes). Inputs are whole 16-byte blocks; nothing is padded. */
export interface AesKey {
  /** ECB: each block on its own. Returns a new array; `data` is not changed. */
  encryptBlocks(data: Uint8Array): Uint8Array;
  decryptBlocks(data: Uint8Array): Uint8Array;
  /**
   * Optional: the same as decryptBlocks, done elsewhere (the browser's native WebCrypto, on its own threads).
   * The data path uses it for whole runs of sectors; key material and IVs use the synchronous calls.
   */
  decryptBlocksAsync?(data: Uint8Array): Promise<Uint8Array>;
  /** One CBC chain from `iv`. Returns a new array. */
  encryptCbc(iv: Uint8Array, data: Uint8Array): Uint8Array;
}

/** How a LUKS payload (or key material) is encrypted: what the LUKS header's cipher fields say. */
export interface CipherSpec {
  /** AES key size in bytes of one key (an XTS key is two of them). */
  aesKeyBytes: 16 | 24 | 32;
  mode: 'xts' | 'cbc';
  ivgen: 'plain' | 'plain64' | 'essiv';
  /** ESSIV's hash (the salt is the hash of the key). */
  ivgenHash?: HashAlgorithm | undefined;
}

/**
 * Encrypts and decrypts a run of whole 512-byte sectors (the last may be shorter, a multiple of 16 bytes),
 * `sector` numbering the first for the IVs. Asynchronous so an implementation can do the work on other threads.
 */
export interface DataCipher {
  /** Decrypts `data` in place. */
  decrypt(data: Uint8Array, sector: number): Promise<void>;
  /** The encrypted form of `data` as a new array; `data` is not changed. */
  encrypt(data: Uint8Array, sector: number): Promise<Uint8Array>;
}

export interface CryptoProvider {
  aes(key: Uint8Array): AesKey;
  hash(algorithm: HashAlgorithm, data: Uint8Array): Uint8Array;
  pbkdf2(algorithm: HashAlgorithm, password: Uint8Array, salt: Uint8Array, iterations: number, length: number): Promise<Uint8Array>;
  /** Cryptographically strong random bytes (keys, salts, the LUKS UUID). */
  randomBytes(length: number): Uint8Array;
  /**
   * A clock in milliseconds for calibrating PBKDF2 iteration counts: CPU time where the platform can tell (as
   * QEMU measures), wall time otherwise.
   */
  clock(): number;
  /**
   * Optional: a DataCipher that does the work elsewhere (Node's worker threads). Without it the engine runs
   * sector-cipher.ts on this provider's `aes` in the calling thread.
   */
  dataCipher?(spec: CipherSpec, key: Uint8Array): DataCipher;
}

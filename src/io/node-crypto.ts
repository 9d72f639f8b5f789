/**
 * The engine's cryptography in Node, on Node's `crypto` (OpenSSL): AES-ECB and AES-CBC for the block cipher the
 * sector modes are built on, hashes, PBKDF2, random bytes and a CPU-time clock for calibrating PBKDF2 (QEMU also
 * measures CPU time). Large runs of sectors are encrypted and decrypted on worker threads (cluster-workers.ts).
 */
import * as cryptoModule from 'node:crypto';
import { createCipheriv, createDecipheriv, createHash, pbkdf2, randomFillSync, type Cipher, type Decipher } from 'node:crypto';
import type { AesKey, CipherSpec, CryptoProvider, DataCipher, HashAlgorithm } from '../qcow2/crypto.js';
import { SectorCipher } from '../qcow2/sector-cipher.js';
import { clusterWorkers } from './cluster-workers.js';

/** Bytes below which a run is encrypted on the calling thread: a worker round trip costs more than the work. */
const INLINE_BYTES = 128 * 1024;

const oneShotHash = (cryptoModule as { hash?: (algorithm: string, data: Uint8Array, encoding: 'buffer') => Uint8Array }).hash;

/** One AES key over Node's ECB contexts, kept open: with padding off, update() returns every whole block. */
class NodeAesKey implements AesKey {
  private encryptor: Cipher | undefined;
  private decryptor: Decipher | undefined;
  private readonly ecb: string;
  private readonly cbc: string;

  constructor(private readonly key: Uint8Array) {
    if (key.length !== 16 && key.length !== 24 && key.length !== 32) throw new Error(`an AES key is 16, 24 or 32 bytes, not ${key.length}`);
    this.ecb = `aes-${key.length * 8}-ecb`;
    this.cbc = `aes-${key.length * 8}-cbc`;
  }

  encryptBlocks(data: Uint8Array): Uint8Array {
    if (!this.encryptor) {
      this.encryptor = createCipheriv(this.ecb, this.key, null);
      this.encryptor.setAutoPadding(false);
    }
    return this.encryptor.update(data);
  }

  decryptBlocks(data: Uint8Array): Uint8Array {
    if (!this.decryptor) {
      this.decryptor = createDecipheriv(this.ecb, this.key, null);
      this.decryptor.setAutoPadding(false);
    }
    return this.decryptor.update(data);
  }

  encryptCbc(iv: Uint8Array, data: Uint8Array): Uint8Array {
    const cipher = createCipheriv(this.cbc, this.key, iv);
    cipher.setAutoPadding(false);
    const out = cipher.update(data);
    cipher.final();
    return out;
  }
}

/** The primitives, without worker threads (what a worker itself uses). */
export function nodeCryptoPrimitives(): CryptoProvider {
  return {
    aes: (key) => new NodeAesKey(key),
    // The one-shot crypto.hash (Node 20.12+) is twice as fast as a Hash object for the short inputs the LUKS
    // anti-forensic merge hashes thousands of times on every unlock.
    hash: oneShotHash ? (algorithm, data) => oneShotHash(algorithm, data, 'buffer') : (algorithm, data) => createHash(algorithm).update(data).digest(),
    pbkdf2: (algorithm: HashAlgorithm, password, salt, iterations, length) =>
      new Promise((resolve, reject) => pbkdf2(password, salt, iterations, length, algorithm, (error, key) => (error ? reject(error) : resolve(key)))),
    randomBytes: (length) => randomFillSync(new Uint8Array(length)),
    clock: () => {
      const { user, system } = process.cpuUsage();
      return (user + system) / 1000;
    },
  };
}

/** Node's cryptography for the engine: runs of sectors of at least 128 KiB go to worker threads. */
export function nodeCrypto(): CryptoProvider {
  const primitives = nodeCryptoPrimitives();
  return {
    ...primitives,
    dataCipher: (spec, key) => workerDataCipher(primitives, spec, key),
  };
}

function workerDataCipher(primitives: CryptoProvider, spec: CipherSpec, key: Uint8Array): DataCipher {
  const local = new SectorCipher(primitives, spec, key);
  const workers = clusterWorkers();
  return {
    async decrypt(data, sector) {
      if (data.length < INLINE_BYTES || !workers) return local.decrypt(data, sector);
      await workers.cipher('decrypt', spec, key, data, sector, data);
    },
    async encrypt(data, sector) {
      if (data.length < INLINE_BYTES || !workers) return local.encrypt(data, sector);
      const out = new Uint8Array(data.length);
      await workers.cipher('encrypt', spec, key, data, sector, out);
      return out;
    },
  };
}

/**
 * Sector encryption as QEMU does it for LUKS and the legacy AES method (crypto/block.c, crypto/ivgen*.c,
 * crypto/xts.c): data is cut into 512-byte sectors, each encrypted on its own with a 16-byte IV made from its
 * sector number by the IV generator:
 * - plain: the low 32 bits of the sector number, little-endian, then zeros;
 * - plain64: the sector number as a little-endian u64, then zeros;
 * - essiv: the plain64 block encrypted (one AES block, ECB) with a key that is the hash of the data key.
 * Modes, over one AES key per direction:
 * - XTS (IEEE 1619): the key is two AES keys K1|K2; the IV encrypted with K2 is the first block's tweak, each
 *   next block's tweak is the previous one multiplied by x in GF(2^128) (a 1-bit left shift of the 16 bytes read
 *   as a little-endian number, 0x87 folded back in when a bit falls off); every block is
 *   E_K1(P xor T) xor T.
 * - CBC: one chain per sector, starting from the IV.
 * Everything here runs over the provider's AES block (ECB and a plain CBC chain): XTS tweaks and the CBC
 * decryption chaining are done in bulk over whole runs of sectors, one block-cipher call for all of them.
 */
import type { AesKey, CipherSpec, CryptoProvider } from './crypto.js';

export const SECTOR_SIZE = 512;
const BLOCK = 16;
const BLOCKS_PER_SECTOR = SECTOR_SIZE / BLOCK;
const TWO_32 = 2 ** 32;

// XTS tweaks are shifted as four 32-bit words of a little-endian 128-bit number: word order equals memory order
// only on little-endian hosts, which is every platform JavaScript runs on in practice; a big-endian one is refused.
const LITTLE_ENDIAN = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

/** Key bytes one spec needs: an XTS key is two AES keys. */
export function keyBytesOf(spec: CipherSpec): number {
  return spec.mode === 'xts' ? spec.aesKeyBytes * 2 : spec.aesKeyBytes;
}

/** A decryption between beginDecrypt and endDecrypt; `first` holds each sector's first XTS tweak. */
interface DecryptRun {
  data: Uint8Array;
  aligned: Uint8Array;
  sector: number;
  first?: Uint32Array | undefined;
}

export class SectorCipher {
  private readonly k1: AesKey;
  private readonly k2: AesKey | undefined;
  private readonly essiv: AesKey | undefined;

  constructor(
    provider: Pick<CryptoProvider, 'aes' | 'hash'>,
    readonly spec: CipherSpec,
    key: Uint8Array,
  ) {
    if (!LITTLE_ENDIAN) throw new Error('sector encryption needs a little-endian host');
    if (key.length !== keyBytesOf(spec)) throw new Error(`a ${spec.mode} key for AES-${spec.aesKeyBytes * 8} is ${keyBytesOf(spec)} bytes, not ${key.length}`);
    const n = spec.aesKeyBytes;
    this.k1 = provider.aes(key.subarray(0, n));
    this.k2 = spec.mode === 'xts' ? provider.aes(key.subarray(n, 2 * n)) : undefined;
    if (spec.ivgen === 'essiv') {
      if (!spec.ivgenHash) throw new Error('ESSIV needs a hash');
      // The ESSIV key is the whole digest (only digests of an AES key size are accepted, see luks-header.ts).
      this.essiv = provider.aes(provider.hash(spec.ivgenHash, key));
    }
  }

  /** Decrypts `data` (whole 16-byte blocks) in place; `sector` numbers its first 512 bytes. */
  decrypt(data: Uint8Array, sector: number): void {
    const run = this.beginDecrypt(data, sector);
    if (run) this.endDecrypt(run, this.k1.decryptBlocks(run.aligned));
  }

  /**
   * As decrypt, with the bulk block decryption through the key's asynchronous call when it has one (the browser's
   * native AES); otherwise the same synchronous work.
   */
  async decryptAsync(data: Uint8Array, sector: number): Promise<void> {
    if (!this.k1.decryptBlocksAsync) return this.decrypt(data, sector);
    const run = this.beginDecrypt(data, sector);
    if (run) this.endDecrypt(run, await this.k1.decryptBlocksAsync(run.aligned));
  }

  /**
   * Decryption before the block cipher: the data checked and made 4-byte aligned (a copy when it is not), and for
   * XTS whitened with its tweaks. `aligned` then goes through the block decryption, then endDecrypt.
   */
  private beginDecrypt(data: Uint8Array, sector: number): DecryptRun | undefined {
    checkLength(data);
    if (data.length === 0) return undefined;
    const aligned = (data.byteOffset & 3) === 0 ? data : data.slice();
    if (this.spec.mode !== 'xts') return { data, aligned, sector };
    const first = this.firstTweaks(sector, aligned.length);
    const x = words(aligned);
    this.xorTweaks(first, x, x);
    return { data, aligned, sector, first };
  }

  /** Decryption after the block cipher: the tweaks again (XTS) or CBC's chaining, the plaintext back in `data`. */
  private endDecrypt(run: DecryptRun, decrypted: Uint8Array): void {
    if (run.first) this.xorTweaks(run.first, words(decrypted), words(run.aligned));
    else this.cbcUnchain(run.aligned, run.sector, words(decrypted));
    if (run.aligned !== run.data) run.data.set(run.aligned);
  }

  /** The encrypted form of `data` (whole 16-byte blocks) as a new array. */
  encrypt(data: Uint8Array, sector: number): Uint8Array {
    checkLength(data);
    if (data.length === 0) return new Uint8Array(0);
    return this.spec.mode === 'xts' ? this.xtsEncrypt(data, sector) : this.cbcEncrypt(data, sector);
  }

  /** One IV per sector from `sector` on, 16 bytes each. */
  private ivs(sector: number, count: number): Uint8Array {
    const ivs = new Uint8Array(count * BLOCK);
    const view = new DataView(ivs.buffer);
    const wide = this.spec.ivgen !== 'plain';
    for (let i = 0; i < count; i++) {
      const s = sector + i;
      view.setUint32(i * BLOCK, s % TWO_32, true);
      if (wide) view.setUint32(i * BLOCK + 4, Math.floor(s / TWO_32), true);
    }
    return this.essiv ? this.essiv.encryptBlocks(ivs) : ivs;
  }

  /** Each sector's first XTS tweak: its IV encrypted with the second key. */
  private firstTweaks(sector: number, length: number): Uint32Array {
    return words(this.k2!.encryptBlocks(this.ivs(sector, Math.ceil(length / SECTOR_SIZE))));
  }

  /**
   * `into[i] = from[i] ^ tweak[i]` over whole blocks, each sector's tweaks generated from its first one. `into`
   * may be `from`. XTS needs the same tweaks before and after the block cipher: they are generated twice, in
   * registers, rather than stored once and read back (a tweak array as large as the data costs more in memory
   * traffic than the shifts do).
   */
  private xorTweaks(first: Uint32Array, from: Uint32Array, into: Uint32Array): void {
    const total = from.length;
    const sectors = Math.ceil(total / (BLOCKS_PER_SECTOR * 4));
    for (let s = 0; s < sectors; s++) {
      let a = first[s * 4]!;
      let b = first[s * 4 + 1]!;
      let c = first[s * 4 + 2]!;
      let d = first[s * 4 + 3]!;
      let at = s * BLOCKS_PER_SECTOR * 4;
      const end = Math.min(total, at + BLOCKS_PER_SECTOR * 4);
      while (at < end) {
        into[at] = from[at]! ^ a;
        into[at + 1] = from[at + 1]! ^ b;
        into[at + 2] = from[at + 2]! ^ c;
        into[at + 3] = from[at + 3]! ^ d;
        at += 4;
        // Multiply by x: shift the little-endian 128-bit value left, folding the top bit back as 0x87.
        const fold = (d >> 31) & 0x87;
        d = (d << 1) | (c >>> 31);
        c = (c << 1) | (b >>> 31);
        b = (b << 1) | (a >>> 31);
        a = (a << 1) ^ fold;
      }
    }
  }

  private xtsEncrypt(data: Uint8Array, sector: number): Uint8Array {
    const first = this.firstTweaks(sector, data.length);
    const mixed = new Uint32Array(data.length >>> 2);
    this.xorTweaks(first, words(data), mixed);
    const out = words(this.k1.encryptBlocks(new Uint8Array(mixed.buffer)));
    this.xorTweaks(first, out, out);
    return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
  }

  /** CBC's chaining over `decrypted`, the block-wise decryption of `data`: the plaintext, written into `data`. */
  private cbcUnchain(data: Uint8Array, sector: number, decrypted: Uint32Array): void {
    const sectors = Math.ceil(data.length / SECTOR_SIZE);
    const iv = words(this.ivs(sector, sectors));
    const x = words(data);
    const blocks = data.length >>> 4;
    for (let s = 0; s < sectors; s++) {
      const first = s * BLOCKS_PER_SECTOR;
      // Backwards, so each block's predecessor is still ciphertext when it is needed.
      for (let j = Math.min(blocks, first + BLOCKS_PER_SECTOR) - 1; j >= first; j--) {
        const at = j * 4;
        const prev = j === first ? iv : x;
        const p = j === first ? s * 4 : at - 4;
        x[at] = decrypted[at]! ^ prev[p]!;
        x[at + 1] = decrypted[at + 1]! ^ prev[p + 1]!;
        x[at + 2] = decrypted[at + 2]! ^ prev[p + 2]!;
        x[at + 3] = decrypted[at + 3]! ^ prev[p + 3]!;
      }
    }
  }

  private cbcEncrypt(data: Uint8Array, sector: number): Uint8Array {
    const sectors = Math.ceil(data.length / SECTOR_SIZE);
    const ivs = this.ivs(sector, sectors);
    const out = new Uint8Array(data.length);
    for (let s = 0; s < sectors; s++) {
      const from = s * SECTOR_SIZE;
      const to = Math.min(data.length, from + SECTOR_SIZE);
      out.set(this.k1.encryptCbc(ivs.subarray(s * BLOCK, (s + 1) * BLOCK), data.subarray(from, to)), from);
    }
    return out;
  }
}

function checkLength(data: Uint8Array): void {
  if (data.length % BLOCK !== 0) throw new Error(`encrypted data must be whole 16-byte blocks (got ${data.length} bytes)`);
}

/** A 32-bit word view of `bytes`, over a copy when they are not 4-byte aligned (writes then go to the copy). */
function words(bytes: Uint8Array): Uint32Array {
  if ((bytes.byteOffset & 3) !== 0) bytes = bytes.slice();
  return new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 2);
}


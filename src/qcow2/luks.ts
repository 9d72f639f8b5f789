/**
 * LUKS1 key management (cryptsetup's format, as QEMU implements it in crypto/block-luks.c and crypto/afsplit.c):
 * unlocking the master key from a password, and making a new header with one key slot.
 *
 * A key slot holds the master key spread over `stripes` blocks by the anti-forensic splitter (AF), encrypted with
 * a key derived from the password (PBKDF2 with the slot's salt and iterations) in the payload's own cipher and
 * IV scheme, sectors numbered from 0. AF: with H the header's hash, d(x) replaces each hash-sized piece i of x by
 * H(be32(i) | piece) (cut to the piece's length); the key is s[n-1] xor d(...d(d(s[0]) xor s[1])... xor s[n-2]).
 * A candidate master key is right when PBKDF2 over it with the header's salt and iterations gives the 20-byte
 * digest stored in the header.
 */
import type { CipherSpec, CryptoProvider, HashAlgorithm } from './crypto.js';
import { HASH_LENGTHS } from './crypto.js';
import { SectorCipher, keyBytesOf } from './sector-cipher.js';
import {
  LUKS_DIGEST_BYTES,
  LUKS_KEY_SLOT_ALIGN,
  LUKS_SALT_BYTES,
  LUKS_SECTOR,
  LUKS_SLOTS,
  LUKS_STRIPES,
  SLOT_ACTIVE,
  SLOT_INACTIVE,
  encodeLuksHeader,
  splitKeySectors,
  type LuksHeader,
} from './luks-header.js';

/** QEMU's floor for both iteration counts. */
export const MIN_ITERATIONS = 1000;
/** QEMU's default encrypt.iter-time: the time a slot's PBKDF2 should take, in milliseconds. */
export const DEFAULT_ITER_TIME_MS = 2000;

/** QEMU's message, which qemu-img prints for a wrong password. */
export const WRONG_PASSWORD = 'Invalid password, cannot unlock any keyslot';

/** Reads bytes of the LUKS area (offsets relative to its start). */
export type AreaReader = (offset: number, length: number) => Promise<Uint8Array>;

/**
 * The master key the password unlocks, trying every active slot in order; undefined when none opens (the caller
 * reports WRONG_PASSWORD). The header must have passed parseLuksHeader.
 */
export async function unlockMasterKey(provider: CryptoProvider, header: LuksHeader, spec: CipherSpec, hash: HashAlgorithm, password: Uint8Array, read: AreaReader): Promise<Uint8Array | undefined> {
  const keyBytes = header.keyBytes;
  for (const slot of header.slots) {
    if (slot.state !== SLOT_ACTIVE) continue;
    const slotKey = await provider.pbkdf2(hash, password, slot.salt, slot.iterations, keyBytes);
    const material = (await read(slot.keyOffset * LUKS_SECTOR, keyBytes * slot.stripes)).slice();
    new SectorCipher(provider, spec, slotKey).decrypt(material, 0);
    const candidate = afMerge(provider, hash, material, keyBytes, slot.stripes);
    const digest = await provider.pbkdf2(hash, candidate, header.masterKeySalt, header.masterKeyIterations, LUKS_DIGEST_BYTES);
    if (equal(digest, header.masterKeyDigest)) return candidate;
  }
  return undefined;
}

export interface NewLuksOptions {
  spec: CipherSpec;
  hash: HashAlgorithm;
  password: Uint8Array;
  /** The time one unlock of the slot should take (QEMU's encrypt.iter-time), in milliseconds. */
  iterTimeMs: number;
  /** Whether ivgen-hash-alg was given: QEMU then names it in the mode string even for plain/plain64. */
  nameIvgenHash?: boolean;
}

/**
 * A new LUKS area as QEMU lays it out: the header, 8 slots of key material aligned to 4096 bytes from 4096 on, of
 * which slot 0 holds the master key for `password`; the area is `payloadOffset` sectors long (zeros where nothing
 * is written). Iteration counts are calibrated as QEMU does: the slot's PBKDF2 takes `iterTimeMs`, the master
 * key digest's an eighth of that; both at least 1000.
 */
export async function newLuksArea(provider: CryptoProvider, options: NewLuksOptions): Promise<{ area: Uint8Array; masterKey: Uint8Array; header: LuksHeader }> {
  const { spec, hash, password, iterTimeMs } = options;
  const problem = unportableCipher(spec);
  if (problem) throw new Error(problem);
  const keyBytes = keyBytesOf(spec);
  const masterKey = provider.randomBytes(keyBytes);
  const masterKeySalt = provider.randomBytes(LUKS_SALT_BYTES);
  const digestRate = await iterationsPerSecond(provider, hash, masterKey, masterKeySalt, LUKS_DIGEST_BYTES, iterTimeMs);
  const masterKeyIterations = Math.max(MIN_ITERATIONS, checkIterations(Math.floor(Math.floor((digestRate * iterTimeMs) / 1000) / 8)));
  const masterKeyDigest = await provider.pbkdf2(hash, masterKey, masterKeySalt, masterKeyIterations, LUKS_DIGEST_BYTES);

  const slotSectors = splitKeySectors(keyBytes, LUKS_STRIPES);
  const firstSlot = LUKS_KEY_SLOT_ALIGN / LUKS_SECTOR;
  const slotSalt = provider.randomBytes(LUKS_SALT_BYTES);
  const slotRate = await iterationsPerSecond(provider, hash, password, slotSalt, keyBytes, iterTimeMs);
  const slotIterations = Math.max(MIN_ITERATIONS, checkIterations(Math.floor((slotRate * iterTimeMs) / 1000)));
  const slotKey = await provider.pbkdf2(hash, password, slotSalt, slotIterations, keyBytes);
  const material = new SectorCipher(provider, spec, slotKey).encrypt(afSplit(provider, hash, masterKey, LUKS_STRIPES), 0);

  const ivgen = spec.ivgenHash !== undefined && (spec.ivgen === 'essiv' || options.nameIvgenHash) ? `${spec.ivgen}:${spec.ivgenHash}` : spec.ivgen;
  const header: LuksHeader = {
    cipherName: 'aes',
    cipherMode: `${spec.mode}-${ivgen}`,
    hashSpec: hash,
    payloadOffset: firstSlot + LUKS_SLOTS * slotSectors,
    keyBytes,
    masterKeyDigest,
    masterKeySalt,
    masterKeyIterations,
    uuid: uuidV4(provider.randomBytes(16)),
    slots: Array.from({ length: LUKS_SLOTS }, (_, i) => ({
      state: i === 0 ? SLOT_ACTIVE : SLOT_INACTIVE,
      iterations: i === 0 ? slotIterations : 0,
      salt: i === 0 ? slotSalt : new Uint8Array(LUKS_SALT_BYTES),
      keyOffset: firstSlot + i * slotSectors,
      stripes: LUKS_STRIPES,
    })),
  };
  const area = new Uint8Array(header.payloadOffset * LUKS_SECTOR);
  area.set(encodeLuksHeader(header), 0);
  area.set(material, firstSlot * LUKS_SECTOR);
  return { area, masterKey, header };
}

/**
 * Why a new image must not use this cipher, if it must not: QEMU 7.2 encrypts key material in whole sectors and
 * aborts (an assertion) on AES-192-CBC, whose 96000 bytes are not - an image it cannot open is no use.
 */
export function unportableCipher(spec: CipherSpec): string | undefined {
  const material = keyBytesOf(spec) * LUKS_STRIPES;
  if (spec.mode === 'cbc' && material % LUKS_SECTOR !== 0) {
    return `aes-${spec.aesKeyBytes * 8} in cbc mode is not supported for new images: its key material (${material} bytes) is not a whole number of 512-byte sectors, and QEMU 7.2 aborts opening such an image`;
  }
  return undefined;
}

/** Bytes of the LUKS area a new image with this cipher gets (qemu-img measure adds them). */
export function newLuksAreaBytes(spec: CipherSpec): number {
  return (LUKS_KEY_SLOT_ALIGN / LUKS_SECTOR + LUKS_SLOTS * splitKeySectors(keyBytesOf(spec), LUKS_STRIPES)) * LUKS_SECTOR;
}

/** The anti-forensic merge: `stripes` blocks of `blockBytes` back into one block. */
export function afMerge(provider: Pick<CryptoProvider, 'hash'>, hash: HashAlgorithm, split: Uint8Array, blockBytes: number, stripes: number): Uint8Array {
  const block = diffusedPrefix(provider, hash, split, blockBytes, stripes);
  xorInto(block, split.subarray((stripes - 1) * blockBytes, stripes * blockBytes));
  return block;
}

/** The anti-forensic split: `key` spread over `stripes` blocks, all but the last random, the last what merges to `key`. */
export function afSplit(provider: Pick<CryptoProvider, 'hash' | 'randomBytes'>, hash: HashAlgorithm, key: Uint8Array, stripes: number): Uint8Array {
  const n = key.length;
  const split = new Uint8Array(n * stripes);
  split.set(provider.randomBytes(n * (stripes - 1)), 0);
  const block = diffusedPrefix(provider, hash, split, n, stripes);
  xorInto(block, key);
  split.set(block, (stripes - 1) * n);
  return split;
}

/**
 * What both directions share: the first `stripes - 1` blocks of `split` folded by xor and diffusion. Runs on every
 * unlock (4000 stripes, thousands of hashes), before any code is warm: one block and one hash input are reused.
 */
function diffusedPrefix(provider: Pick<CryptoProvider, 'hash'>, hash: HashAlgorithm, split: Uint8Array, blockBytes: number, stripes: number): Uint8Array {
  const block = new Uint8Array(blockBytes);
  const size = HASH_LENGTHS[hash];
  const input = new Uint8Array(4 + size);
  for (let i = 0; i < stripes - 1; i++) {
    xorInto(block, split.subarray(i * blockBytes, (i + 1) * blockBytes));
    diffuse(provider, hash, block, size, input);
  }
  return block;
}

/** LUKS's diffusion of `block` in place: each hash-sized piece replaced by the hash of its index and itself. */
function diffuse(provider: Pick<CryptoProvider, 'hash'>, hash: HashAlgorithm, block: Uint8Array, size: number, input: Uint8Array): void {
  for (let i = 0, at = 0; at < block.length; i++, at += size) {
    const length = Math.min(size, block.length - at);
    input[0] = i >>> 24;
    input[1] = (i >>> 16) & 0xff;
    input[2] = (i >>> 8) & 0xff;
    input[3] = i & 0xff;
    input.set(block.subarray(at, at + length), 4);
    block.set(provider.hash(hash, length === size ? input : input.subarray(0, 4 + length)).subarray(0, length), at);
  }
}

/**
 * PBKDF2 iterations per second for this input, measured on the provider's clock. QEMU times batches until one
 * takes over half a second; qcow86 stops at a batch of a quarter of the wanted time (20..250 ms), which keeps a
 * small encrypt.iter-time cheap and a large one as precise as QEMU's.
 */
export async function iterationsPerSecond(provider: CryptoProvider, hash: HashAlgorithm, password: Uint8Array, salt: Uint8Array, length: number, iterTimeMs: number): Promise<number> {
  const target = Math.min(250, Math.max(20, iterTimeMs / 4));
  let iterations = 1000;
  for (let round = 0; round < 40; round++) {
    const start = provider.clock();
    await provider.pbkdf2(hash, password, salt, iterations, length);
    const elapsed = provider.clock() - start;
    if (elapsed >= target) return (iterations * 1000) / elapsed;
    // A clock that saw nothing (coarse CPU time) says little: grow tenfold; otherwise aim just past the target.
    iterations = elapsed <= 0 ? iterations * 10 : Math.min(iterations * 10, Math.ceil((iterations * target * 1.25) / elapsed));
    if (iterations > 0xffffffff) break;
  }
  throw new Error('Unable to measure PBKDF2 speed: the clock did not advance');
}

function checkIterations(iterations: number): number {
  if (iterations > 0xffffffff) throw new Error(`PBKDF iterations ${iterations} larger than ${0xffffffff}`);
  return iterations;
}

function uuidV4(random: Uint8Array): string {
  const bytes = random.slice(0, 16);
  bytes[6] = (bytes[6]! & 0x0f) | 0x40;
  bytes[8] = (bytes[8]! & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function xorInto(target: Uint8Array, source: Uint8Array): void {
  for (let i = 0; i < target.length; i++) target[i]! ^= source[i]!;
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i]! ^ b[i]!;
  return diff === 0;
}

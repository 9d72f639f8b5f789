/**
 * The LUKS1 header (cryptsetup's on-disk format, as QEMU reads and writes it in crypto/block-luks.c), big-endian,
 * 592 bytes: magic "LUKS\xba\xbe" and version 1, then the cipher name, cipher mode and hash name (32-byte
 * NUL-padded strings) at 8, 40 and 72, the payload offset (sectors) and key size at 104 and 108, the master key's
 * PBKDF2 digest (20 bytes), salt (32) and iterations at 112, 132 and 164, the UUID (40 bytes of text) at 168 and
 * 8 key slots of 48 bytes from 208: state (0x00ac71f3 active, 0x0000dead inactive), iterations, 32 bytes of
 * salt, key material offset (sectors) and anti-forensic stripes.
 *
 * Parsing checks what QEMU 7.2 checks before it trusts a header, in its order and with its words (qemu-img
 * prints them, so scripts and people see the same thing): the structure first, then the cipher strings.
 */
import { HASH_LENGTHS, isHashAlgorithm, type CipherSpec, type HashAlgorithm } from './crypto.js';
import { putU16, putU32, u16, u32 } from './bytes.js';

export const LUKS_HEADER_BYTES = 592;
export const LUKS_SECTOR = 512;
/** Key material starts 4096 bytes into the area, and every slot's material is a whole number of 4096 bytes. */
export const LUKS_KEY_SLOT_ALIGN = 4096;
export const LUKS_SLOTS = 8;
export const LUKS_STRIPES = 4000;
export const LUKS_SALT_BYTES = 32;
export const LUKS_DIGEST_BYTES = 20;
export const SLOT_ACTIVE = 0x00ac71f3;
export const SLOT_INACTIVE = 0x0000dead;
const MAGIC = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe];
const HEADER_SECTORS = LUKS_KEY_SLOT_ALIGN / LUKS_SECTOR;

export interface LuksKeySlot {
  /** The raw state word (SLOT_ACTIVE or SLOT_INACTIVE once validated). */
  state: number;
  iterations: number;
  salt: Uint8Array;
  /** Where the slot's key material starts, in 512-byte sectors from the start of the LUKS area. */
  keyOffset: number;
  stripes: number;
}

export interface LuksHeader {
  cipherName: string;
  /** The whole mode string, e.g. "xts-plain64" or "cbc-essiv:sha256". */
  cipherMode: string;
  hashSpec: string;
  /** In sectors. qcow2 keeps the payload in its data clusters; the field is written but not used for data. */
  payloadOffset: number;
  keyBytes: number;
  masterKeyDigest: Uint8Array;
  masterKeySalt: Uint8Array;
  masterKeyIterations: number;
  /** The UUID field's text (NUL padding removed). */
  uuid: string;
  slots: LuksKeySlot[];
}

/** The cipher fields decoded: QEMU's names and what they stand for. */
export interface LuksCipher {
  cipherName: string;
  /** Key size of one cipher key (XTS keys are two). */
  cipherKeyBytes: number;
  mode: string;
  ivgen: string;
  ivgenHash: HashAlgorithm | undefined;
  hash: HashAlgorithm;
}

/** A header QEMU would refuse; `message` is QEMU's wording. */
export class LuksHeaderError extends Error {
  constructor(
    message: string,
    /** Which field: 'magic', 'version', 'cipher_name', 'cipher_mode', 'hash_spec', 'payload_offset', ... */
    readonly field: string,
    /** Byte offset of that field inside the LUKS header. */
    readonly offset: number,
  ) {
    super(message);
  }
}

/** Sectors one slot's key material takes, rounded up to the slot alignment, as QEMU and cryptsetup lay it out. */
export function splitKeySectors(keyBytes: number, stripes: number): number {
  const sectors = Math.ceil((keyBytes * stripes) / LUKS_SECTOR);
  return Math.ceil(sectors / HEADER_SECTORS) * HEADER_SECTORS;
}

/** Parses and checks the 592-byte header: the structure (qcrypto_block_luks_check_header) and nothing else. */
export function parseLuksHeader(bytes: Uint8Array): LuksHeader {
  if (!MAGIC.every((byte, i) => bytes[i] === byte)) throw new LuksHeaderError('Volume is not in LUKS format', 'magic', 0);
  const version = u16(bytes, 6);
  if (version !== 1) throw new LuksHeaderError(`LUKS version ${version} is not supported`, 'version', 6);
  const cipherName = nulTerminated(bytes, 8, 'cipher name', 'cipher_name');
  const cipherMode = nulTerminated(bytes, 40, 'cipher mode', 'cipher_mode');
  const hashSpec = nulTerminated(bytes, 72, 'hash spec', 'hash_spec');
  const header: LuksHeader = {
    cipherName,
    cipherMode,
    hashSpec,
    payloadOffset: u32(bytes, 104),
    keyBytes: u32(bytes, 108),
    masterKeyDigest: bytes.slice(112, 132),
    masterKeySalt: bytes.slice(132, 164),
    masterKeyIterations: u32(bytes, 164),
    uuid: textOf(bytes.subarray(168, 208)),
    slots: [],
  };
  for (let i = 0; i < LUKS_SLOTS; i++) {
    const at = 208 + 48 * i;
    header.slots.push({ state: u32(bytes, at), iterations: u32(bytes, at + 4), salt: bytes.slice(at + 8, at + 40), keyOffset: u32(bytes, at + 40), stripes: u32(bytes, at + 44) });
  }
  if (header.payloadOffset < HEADER_SECTORS) throw new LuksHeaderError('LUKS payload is overlapping with the header', 'payload_offset', 104);
  if (header.masterKeyIterations === 0) throw new LuksHeaderError('LUKS key iteration count is zero', 'master_key_iterations', 164);
  const slotAt = (i: number, field: number) => 208 + 48 * i + field;
  header.slots.forEach((slot, i) => {
    if (slot.stripes !== LUKS_STRIPES) throw new LuksHeaderError(`Keyslot ${i} is corrupted (stripes ${slot.stripes} != ${LUKS_STRIPES})`, `key slot ${i} stripes`, slotAt(i, 44));
    if (slot.state !== SLOT_ACTIVE && slot.state !== SLOT_INACTIVE) throw new LuksHeaderError(`Keyslot ${i} state (active/disable) is corrupted`, `key slot ${i} state`, slotAt(i, 0));
    if (slot.state === SLOT_ACTIVE && slot.iterations === 0) throw new LuksHeaderError(`Keyslot ${i} iteration count is zero`, `key slot ${i} iterations`, slotAt(i, 4));
    if (slot.keyOffset < HEADER_SECTORS) throw new LuksHeaderError(`Keyslot ${i} is overlapping with the LUKS header`, `key slot ${i} key offset`, slotAt(i, 40));
    const length = splitKeySectors(header.keyBytes, slot.stripes);
    if (slot.keyOffset + length > header.payloadOffset) throw new LuksHeaderError(`Keyslot ${i} is overlapping with the encrypted payload`, `key slot ${i} key offset`, slotAt(i, 40));
    for (let j = i + 1; j < LUKS_SLOTS; j++) {
      const other = header.slots[j]!;
      const otherLength = splitKeySectors(header.keyBytes, other.stripes);
      if (slot.keyOffset < other.keyOffset + otherLength && other.keyOffset < slot.keyOffset + length) {
        throw new LuksHeaderError(`Keyslots ${i} and ${j} are overlapping in the header`, `key slot ${j} key offset`, slotAt(j, 40));
      }
    }
  });
  return header;
}

const CIPHER_KEY_SIZES: Record<string, number[]> = { aes: [16, 24, 32], cast5: [16], serpent: [16, 24, 32], twofish: [16, 24, 32] };
const CIPHER_MODES = ['ecb', 'cbc', 'xts', 'ctr'];
const IV_GENERATORS = ['plain', 'plain64', 'essiv'];

/** Decodes the cipher strings as QEMU's qcrypto_block_luks_parse_header does, with its messages. */
export function luksCipherOf(header: LuksHeader): LuksCipher {
  const dash = header.cipherMode.indexOf('-');
  if (dash < 0) throw new LuksHeaderError(`Unexpected cipher mode string format '${header.cipherMode}'`, 'cipher_mode', 40);
  const mode = header.cipherMode.slice(0, dash);
  let ivgen = header.cipherMode.slice(dash + 1);
  let ivgenHash: HashAlgorithm | undefined;
  const colon = ivgen.indexOf(':');
  if (colon >= 0) {
    const name = ivgen.slice(colon + 1);
    ivgen = ivgen.slice(0, colon);
    if (!isHashAlgorithm(name)) throw new LuksHeaderError(`Hash algorithm '${name}' not supported`, 'cipher_mode', 40);
    ivgenHash = name;
  }
  if (!CIPHER_MODES.includes(mode)) throw new LuksHeaderError(`Cipher mode '${mode}' not supported`, 'cipher_mode', 40);
  const cipherKeyBytes = mode === 'xts' ? Math.floor(header.keyBytes / 2) : header.keyBytes;
  if (!CIPHER_KEY_SIZES[header.cipherName]?.includes(cipherKeyBytes)) {
    throw new LuksHeaderError(`Algorithm '${header.cipherName}' with key size ${cipherKeyBytes} bytes not supported`, 'key_bytes', 108);
  }
  if (!isHashAlgorithm(header.hashSpec)) throw new LuksHeaderError(`Hash algorithm '${header.hashSpec}' not supported`, 'hash_spec', 72);
  if (!IV_GENERATORS.includes(ivgen)) throw new LuksHeaderError(`IV generator '${ivgen}' not supported`, 'cipher_mode', 40);
  if (ivgen === 'essiv') {
    if (ivgenHash === undefined) throw new LuksHeaderError('Missing IV generator hash specification', 'cipher_mode', 40);
    essivKeyBytes(header.cipherName, ivgenHash, 'cipher_mode', 40);
  }
  return { cipherName: header.cipherName, cipherKeyBytes, mode, ivgen, ivgenHash, hash: header.hashSpec };
}

/**
 * ESSIV encrypts with the cipher of the key size that equals the hash's digest (dm-crypt's rule, which QEMU
 * follows): for AES only 16, 24 or 32-byte digests work (md5, sha256), others are refused with QEMU's message.
 */
export function essivKeyBytes(cipherName: string, hash: HashAlgorithm, field: string, offset: number): number {
  const digest = HASH_LENGTHS[hash];
  if (!CIPHER_KEY_SIZES[cipherName]?.includes(digest)) {
    const label = cipherName === 'aes' ? 'AES' : cipherName === 'serpent' ? 'Serpent' : cipherName === 'twofish' ? 'Twofish' : cipherName;
    throw new LuksHeaderError(`No ${label} cipher with key size ${digest} available`, field, offset);
  }
  return digest;
}

/**
 * The sector cipher a decoded header describes, when qcow86 implements it (AES in XTS or CBC mode); otherwise an
 * error naming what is not supported. (QEMU also knows serpent, twofish and cast5, and the ecb and ctr modes.)
 */
export function cipherSpecOf(cipher: LuksCipher): CipherSpec {
  if (cipher.cipherName !== 'aes') throw new LuksHeaderError(`cipher '${cipher.cipherName}' is not supported by qcow86 (it supports aes)`, 'cipher_name', 8);
  if (cipher.mode !== 'xts' && cipher.mode !== 'cbc') throw new LuksHeaderError(`cipher mode '${cipher.mode}' is not supported by qcow86 (it supports xts and cbc)`, 'cipher_mode', 40);
  return {
    aesKeyBytes: cipher.cipherKeyBytes as 16 | 24 | 32,
    mode: cipher.mode,
    ivgen: cipher.ivgen as CipherSpec['ivgen'],
    ivgenHash: cipher.ivgenHash,
  };
}

/** The 592 header bytes for `header`. */
export function encodeLuksHeader(header: LuksHeader): Uint8Array {
  const out = new Uint8Array(LUKS_HEADER_BYTES);
  out.set(MAGIC, 0);
  putU16(out, 6, 1);
  putText(out, 8, header.cipherName);
  putText(out, 40, header.cipherMode);
  putText(out, 72, header.hashSpec);
  putU32(out, 104, header.payloadOffset);
  putU32(out, 108, header.keyBytes);
  out.set(header.masterKeyDigest, 112);
  out.set(header.masterKeySalt, 132);
  putU32(out, 164, header.masterKeyIterations);
  putText(out, 168, header.uuid);
  header.slots.forEach((slot, i) => {
    const at = 208 + 48 * i;
    putU32(out, at, slot.state);
    putU32(out, at + 4, slot.iterations);
    out.set(slot.salt, at + 8);
    putU32(out, at + 40, slot.keyOffset);
    putU32(out, at + 44, slot.stripes);
  });
  return out;
}

function nulTerminated(bytes: Uint8Array, at: number, what: string, field: string): string {
  const value = bytes.subarray(at, at + 32);
  if (value.indexOf(0) < 0) throw new LuksHeaderError(`LUKS header ${what} is not NUL terminated`, field, at);
  return textOf(value);
}

function textOf(field: Uint8Array): string {
  const end = field.indexOf(0);
  return String.fromCharCode(...field.subarray(0, end < 0 ? field.length : end));
}

function putText(out: Uint8Array, at: number, text: string): void {
  for (let i = 0; i < text.length; i++) out[at + i] = text.charCodeAt(i);
}

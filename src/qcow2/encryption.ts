/**
 * Encrypted images (qcow2 crypt_method 1 and 2, qcow crypt_method 1): what `info` shows without the key, and the
 * cipher that reads and writes their data once a password unlocks it. Metadata is never encrypted; data
 * clusters are, sector by sector (sector-cipher.ts), compressed clusters never are.
 * - LUKS (qcow2 crypt_method 2): a LUKS1 header and key material in the clusters the full-disk-encryption header
 *   extension points at (offsets inside it are relative to its start); IVs from the HOST offset / 512, so moving
 *   a cluster means re-encrypting it.
 * - Legacy AES (crypt_method 1, qcow2 and qcow): AES-128-CBC, IV plain64 of the GUEST offset / 512, the key the
 *   password's first 16 bytes (zero-padded); no check that the password is right (QEMU has none either).
 */
import type { ByteStore } from './store.js';
import type { Qcow2Header } from './header.js';
import type { CipherSpec, CryptoProvider, DataCipher } from './crypto.js';
import { FormatError, KeyError, UnsupportedError } from './errors.js';
import { readIntoPadded } from './store.js';
import { LUKS_HEADER_BYTES, LuksHeaderError, cipherSpecOf, luksCipherOf, parseLuksHeader, type LuksCipher, type LuksHeader } from './luks-header.js';
import { WRONG_PASSWORD, unlockMasterKey } from './luks.js';
import { SECTOR_SIZE, SectorCipher } from './sector-cipher.js';

export type EncryptionInfo = { [key: string]: string | number | boolean | EncryptionInfo[] };

/** QEMU's message when an encrypted image is opened without a key. */
export const KEY_REQUIRED = "Parameter 'encrypt.key-secret' is required for cipher";

/** The data cipher of an unlocked image. */
export interface ImageEncryption {
  readonly method: 'luks' | 'aes';
  /** True when IVs come from host (file) offsets (LUKS in qcow2); false for guest offsets (legacy AES). */
  readonly keyedByHost: boolean;
  /** Decrypts whole sectors in place; `offset` (a multiple of 512) is the host or guest offset of data[0]. */
  decrypt(data: Uint8Array, offset: number): Promise<void>;
  /** Encrypts whole sectors into a new array. */
  encrypt(data: Uint8Array, offset: number): Promise<Uint8Array>;
}

/** The message for writes to a legacy AES image, which qcow86 refuses as QEMU's system emulators do. */
export function legacyWriteRefusal(file: string): UnsupportedError {
  return new UnsupportedError(
    file,
    'encryption',
    "writing to an image encrypted with the legacy AES method (encrypt.format=aes) is not supported: convert it to LUKS, e.g. 'qcow86 convert --object secret,id=sec0,data=... --image-opts driver=qcow2,file.filename=OLD,encrypt.key-secret=sec0 -O qcow2 -o encrypt.format=luks,encrypt.key-secret=sec0 NEW'",
  );
}

/** qemu-img info's format-specific "encrypt" object, its keys in qemu-img 7.2's order. */
export async function encryptionInfo(store: ByteStore, header: Qcow2Header): Promise<EncryptionInfo | undefined> {
  if (header.cryptMethod === 1) return { format: 'aes' };
  if (header.cryptMethod !== 2 || !header.fde) return undefined;
  const { luks, cipher } = await readLuks(store, header);
  const slots = luks.slots.map((slot): EncryptionInfo =>
    slot.state === 0x00ac71f3
      ? { active: true, iters: slot.iterations, 'key-offset': slot.keyOffset * SECTOR_SIZE, stripes: slot.stripes }
      : { active: false, 'key-offset': slot.keyOffset * SECTOR_SIZE },
  );
  const info: EncryptionInfo = { 'ivgen-alg': cipher.ivgen, 'hash-alg': cipher.hash, 'cipher-alg': `${cipher.cipherName}-${cipher.cipherKeyBytes * 8}`, uuid: luks.uuid };
  if (cipher.ivgen === 'essiv' && cipher.ivgenHash !== undefined) info['ivgen-hash-alg'] = cipher.ivgenHash;
  return { ...info, format: 'luks', 'cipher-mode': cipher.mode, slots, 'payload-offset': luks.payloadOffset * SECTOR_SIZE, 'master-key-iters': luks.masterKeyIterations };
}

/**
 * Unlocks a qcow2 image's encryption with `password`: KeyError when there is none or it opens no key slot; a
 * FormatError naming the field for a damaged LUKS header; UnsupportedError for a cipher qcow86 does not have.
 */
export async function openQcow2Encryption(store: ByteStore, header: Qcow2Header, crypto: CryptoProvider | undefined, password: Uint8Array | undefined): Promise<ImageEncryption> {
  if (header.cryptMethod === 1) return legacyAes(store.name, crypto, password);
  const { luks, cipher, read } = await readLuks(store, header);
  let spec: CipherSpec;
  try {
    spec = cipherSpecOf(cipher);
  } catch (error) {
    if (error instanceof LuksHeaderError) throw new UnsupportedError(store.name, 'encryption', error.message);
    throw error;
  }
  if (password === undefined) throw new KeyError(store.name, KEY_REQUIRED);
  if (!crypto) throw new UnsupportedError(store.name, 'encryption', 'no cryptography provider was given to open an encrypted image');
  const masterKey = await unlockMasterKey(crypto, luks, spec, cipher.hash, password, read);
  if (!masterKey) throw new KeyError(store.name, WRONG_PASSWORD, true);
  return sectorEncryption('luks', true, dataCipherFor(crypto, spec, masterKey));
}

/** Legacy AES for qcow2 and qcow (version 1) images. */
export function legacyAes(file: string, crypto: CryptoProvider | undefined, password: Uint8Array | undefined): ImageEncryption {
  if (password === undefined) throw new KeyError(file, KEY_REQUIRED);
  if (!crypto) throw new UnsupportedError(file, 'encryption', 'no cryptography provider was given to open an encrypted image');
  const key = new Uint8Array(16);
  key.set(password.subarray(0, 16));
  return sectorEncryption('aes', false, dataCipherFor(crypto, { aesKeyBytes: 16, mode: 'cbc', ivgen: 'plain64' }, key));
}

/**
 * Reads encrypted data bytes into `into` and decrypts them. Encryption works on whole 512-byte sectors: a read that
 * starts or ends inside one reads and decrypts the whole sector. `ivOffset` is the offset the IVs count from for
 * into[0] (the host offset for LUKS, the guest offset for legacy AES): a data cluster keeps the guest's place in
 * the cluster, so both are equally far into their sector. Bytes past the end of the file read as zeros (QEMU).
 */
export async function readDecrypted(store: ByteStore, encryption: ImageEncryption, hostOffset: number, ivOffset: number, into: Uint8Array): Promise<void> {
  const head = hostOffset % SECTOR_SIZE;
  if (head === 0 && into.length % SECTOR_SIZE === 0) {
    await readIntoPadded(store, hostOffset, into);
    await encryption.decrypt(into, ivOffset);
    return;
  }
  const span = new Uint8Array(Math.ceil((head + into.length) / SECTOR_SIZE) * SECTOR_SIZE);
  await readIntoPadded(store, hostOffset - head, span);
  await encryption.decrypt(span, ivOffset - head);
  into.set(span.subarray(head, head + into.length));
}

function dataCipherFor(crypto: CryptoProvider, spec: CipherSpec, key: Uint8Array): DataCipher {
  if (crypto.dataCipher) return crypto.dataCipher(spec, key);
  const cipher = new SectorCipher(crypto, spec, key);
  return {
    decrypt: (data, sector) => cipher.decryptAsync(data, sector),
    encrypt: async (data, sector) => cipher.encrypt(data, sector),
  };
}

function sectorEncryption(method: 'luks' | 'aes', keyedByHost: boolean, cipher: DataCipher): ImageEncryption {
  return {
    method,
    keyedByHost,
    decrypt: (data, offset) => cipher.decrypt(data, offset / SECTOR_SIZE),
    encrypt: (data, offset) => cipher.encrypt(data, offset / SECTOR_SIZE),
  };
}

/** The LUKS header of a qcow2 image, checked as QEMU checks it, and a reader for its key material. */
async function readLuks(store: ByteStore, header: Qcow2Header): Promise<{ luks: LuksHeader; cipher: LuksCipher; read: (offset: number, length: number) => Promise<Uint8Array> }> {
  // parseHeader has checked the extension (present with LUKS, cluster-aligned): only its extent is trusted here.
  const fde = header.fde;
  if (!fde) throw new FormatError(store.name, 'crypt_method is 2 (LUKS) but there is no full disk encryption header extension', { field: 'crypt_method', offset: 32 });
  // The area is read as QEMU reads it: only inside the extent the extension declares, and past the end of the
  // file as zeros.
  const read = async (offset: number, length: number): Promise<Uint8Array> => {
    if (offset + length > fde.length) {
      throw new FormatError(store.name, `Request for data outside of extension header (LUKS area of ${fde.length} bytes at ${fde.offset}; wanted ${length} bytes at ${offset})`, { field: 'encryption header length', value: fde.length });
    }
    const bytes = await store.read(fde.offset + offset, length);
    if (bytes.length === length) return bytes;
    const padded = new Uint8Array(length);
    padded.set(bytes);
    return padded;
  };
  const bytes = await read(0, LUKS_HEADER_BYTES);
  try {
    const luks = parseLuksHeader(bytes);
    return { luks, cipher: luksCipherOf(luks), read };
  } catch (error) {
    if (!(error instanceof LuksHeaderError)) throw error;
    throw new FormatError(store.name, `${error.message} (LUKS header field ${error.field} at offset ${fde.offset + error.offset})`, { field: error.field, offset: fde.offset + error.offset });
  }
}

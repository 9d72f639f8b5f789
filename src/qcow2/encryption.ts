/**
 * What an encrypted qcow2 image says about its encryption, for `info` (qemu-img shows it without the key):
 * the legacy AES method (crypt_method 1) has nothing more to say; a LUKS image (crypt_method 2) holds a LUKS1
 * header in the clusters the full-disk-encryption header extension points at. The engine does not decrypt:
 * such an image opens for its metadata only, and reading its data is refused.
 *
 * LUKS1 header (big-endian; cryptsetup's on-disk format): magic "LUKS\xba\xbe" and version 1, then cipher name,
 * cipher mode and hash name (32-byte NUL-padded strings) at 8, 40 and 72, the payload offset and key size at 104
 * and 108 (u32; the offset in 512-byte sectors), the master key digest's iterations at 164, the UUID (40
 * bytes) at 168, and 8 key slots of 48 bytes from 208: state (0x00ac71f3 active), iterations, 32 bytes of salt,
 * key material offset (sectors) and anti-forensic stripes.
 */
import type { ByteStore } from './store.js';
import type { Qcow2Header } from './header.js';
import { FormatError } from './errors.js';
import { readExact } from './store.js';
import { u32 } from './bytes.js';

export type EncryptionInfo = { [key: string]: string | number | boolean | EncryptionInfo[] };

const LUKS_MAGIC = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe];
const LUKS_HEADER_BYTES = 592;
const SLOT_ACTIVE = 0x00ac71f3;

/** qemu-img info's format-specific "encrypt" object, its keys in qemu-img 7.2's order. */
export async function encryptionInfo(store: ByteStore, header: Qcow2Header): Promise<EncryptionInfo | undefined> {
  if (header.cryptMethod === 1) return { format: 'aes' };
  if (header.cryptMethod !== 2 || !header.fde) return undefined;
  const where = header.fde.offset;
  const bytes = await readExact(store, where, LUKS_HEADER_BYTES, 'LUKS header');
  const bad = (what: string) => new FormatError(store.name, `LUKS header at offset ${where}: ${what}`, { field: 'LUKS header', offset: where });
  if (!LUKS_MAGIC.every((byte, i) => bytes[i] === byte)) throw bad('no LUKS magic');
  const version = (bytes[6]! << 8) | bytes[7]!;
  if (version !== 1) throw bad(`version ${version} (only LUKS version 1 exists in qcow2)`);
  const cipherName = text(bytes, 8, 32);
  const [mode = '', ivgen = ''] = text(bytes, 40, 32).split('-');
  const [ivgenAlg = '', ivgenHash] = ivgen.split(':');
  const keyBytes = u32(bytes, 108);
  // XTS keys are two keys of the cipher's size.
  const cipherBits = ((mode === 'xts' ? keyBytes / 2 : keyBytes) * 8) | 0;
  const slots: EncryptionInfo[] = [];
  for (let i = 0; i < 8; i++) {
    const at = 208 + 48 * i;
    const keyOffset = u32(bytes, at + 40) * 512;
    slots.push(u32(bytes, at) === SLOT_ACTIVE ? { active: true, iters: u32(bytes, at + 4), 'key-offset': keyOffset, stripes: u32(bytes, at + 44) } : { active: false, 'key-offset': keyOffset });
  }
  const info: EncryptionInfo = { 'ivgen-alg': ivgenAlg, 'hash-alg': text(bytes, 72, 32), 'cipher-alg': `${cipherName}-${cipherBits}`, uuid: text(bytes, 168, 40) };
  if (ivgenHash !== undefined) info['ivgen-hash-alg'] = ivgenHash;
  return { ...info, format: 'luks', 'cipher-mode': mode, slots, 'payload-offset': u32(bytes, 104) * 512, 'master-key-iters': u32(bytes, 164) };
}

/** A NUL-padded ASCII field. */
function text(bytes: Uint8Array, at: number, length: number): string {
  const field = bytes.subarray(at, at + length);
  const end = field.indexOf(0);
  return String.fromCharCode(...field.subarray(0, end < 0 ? length : end));
}

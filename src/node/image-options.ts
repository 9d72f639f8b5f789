/**
 * qemu-img's command-line vocabulary shared by create, convert -O qcow2, measure and amend: sizes with binary
 * suffixes and the `-o key=value,...` creation options, turned into the engine's CreateOptions.
 */
import type { CreateOptions } from '../qcow2/create.js';
import { FormatError } from '../qcow2/errors.js';
import { isHashAlgorithm, type CipherSpec, type HashAlgorithm } from '../qcow2/crypto.js';
import { essivKeyBytes, LuksHeaderError } from '../qcow2/luks-header.js';
import { KEY_REQUIRED } from '../qcow2/encryption.js';
import { unportableCipher } from '../qcow2/luks.js';

const SUFFIX: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/** A size as qemu-img reads it: decimal (fractions allowed with a suffix), optional k/M/G/T/P/E suffix. */
export function parseImageSize(text: string): number | undefined {
  const match = /^(\d+(?:\.\d+)?)([bkmgtpe]?)$/i.exec(text.trim());
  if (!match) return undefined;
  const value = Math.floor(Number(match[1]) * SUFFIX[match[2]!.toLowerCase()]!);
  return Number.isSafeInteger(value) ? value : undefined;
}

export const SIZE_ERROR =
  'Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.';

/** The -o options in the order they were given (later ones win, as in qemu-img). */
export function parseOptionList(lists: readonly string[]): Map<string, string> {
  const out = new Map<string, string>();
  for (const list of lists) {
    // qemu's option syntax doubles a comma to put one inside a value.
    for (const item of list.replace(/,,/g, '\0').split(',')) {
      if (item === '') continue;
      const eq = item.indexOf('=');
      const key = (eq < 0 ? item : item.slice(0, eq)).replace(/\0/g, ',');
      const value = eq < 0 ? 'on' : item.slice(eq + 1).replace(/\0/g, ',');
      out.set(key, value);
    }
  }
  return out;
}

/** The encrypt.* creation options in the order qemu-img lists them. */
export const ENCRYPT_KEYS = [
  'encrypt.format', 'encrypt.key-secret', 'encrypt.cipher-alg', 'encrypt.cipher-mode', 'encrypt.ivgen-alg',
  'encrypt.ivgen-hash-alg', 'encrypt.hash-alg', 'encrypt.iter-time',
];

/** LUKS creation options as given, before the secret is looked up. */
export interface EncryptionRequest {
  keySecret: string;
  cipher: CipherSpec;
  hash: HashAlgorithm;
  iterTimeMs: number;
  nameIvgenHash: boolean;
}

const QEMU_CIPHERS = ['aes-128', 'aes-192', 'aes-256', 'des', '3des', 'cast5-128', 'serpent-128', 'serpent-192', 'serpent-256', 'twofish-128', 'twofish-192', 'twofish-256', 'sm4'];

/**
 * The encrypt.* options (and the legacy encryption=on), checked as qemu-img checks them: undefined when the
 * image is not to be encrypted. qcow86 creates LUKS images with AES in XTS or CBC mode; the legacy AES method is
 * readable but not created (it cannot be written either).
 */
export function encryptionRequest(options: Map<string, string>): EncryptionRequest | undefined {
  const format = options.get('encrypt.format') ?? (options.has('encryption') && bool('encryption', options.get('encryption')!) ? 'aes' : undefined);
  const any = [...options.keys()].some((key) => key.startsWith('encrypt.'));
  if (format === undefined) {
    if (any) throw new FormatError('', "Parameter 'encrypt.format' is required to create an encrypted image (encrypt.format=luks)");
    return undefined;
  }
  if (format === 'aes') throw new FormatError('', 'qcow86 does not create images with the legacy AES encryption (encrypt.format=aes), which it cannot write: use encrypt.format=luks');
  if (format !== 'luks') throw new FormatError('', `Parameter 'format' does not accept value '${format}'`);
  const alg = options.get('encrypt.cipher-alg') ?? 'aes-256';
  if (!QEMU_CIPHERS.includes(alg)) throw new FormatError('', `Parameter 'cipher-alg' does not accept value '${alg}'`);
  if (!alg.startsWith('aes-')) throw new FormatError('', `cipher '${alg}' is not supported by qcow86 (it supports aes-128, aes-192 and aes-256)`);
  const mode = options.get('encrypt.cipher-mode') ?? 'xts';
  if (!['ecb', 'cbc', 'xts', 'ctr'].includes(mode)) throw new FormatError('', `Parameter 'cipher-mode' does not accept value '${mode}'`);
  if (mode !== 'xts' && mode !== 'cbc') throw new FormatError('', `cipher mode '${mode}' is not supported by qcow86 (it supports xts and cbc)`);
  const ivgen = options.get('encrypt.ivgen-alg') ?? 'plain64';
  if (ivgen !== 'plain' && ivgen !== 'plain64' && ivgen !== 'essiv') throw new FormatError('', `Parameter 'ivgen-alg' does not accept value '${ivgen}'`);
  const hashOption = (key: string, fallback: HashAlgorithm | undefined): HashAlgorithm | undefined => {
    const value = options.get(key);
    if (value === undefined) return fallback;
    if (!isHashAlgorithm(value)) throw new FormatError('', `Parameter '${key.slice('encrypt.'.length)}' does not accept value '${value}'`);
    return value;
  };
  const hash = hashOption('encrypt.hash-alg', 'sha256')!;
  const givenIvgenHash = hashOption('encrypt.ivgen-hash-alg', undefined);
  const ivgenHash = givenIvgenHash ?? (ivgen === 'essiv' ? 'sha256' : undefined);
  if (ivgen === 'essiv') {
    try {
      essivKeyBytes('aes', ivgenHash!, 'ivgen-hash-alg', 0);
    } catch (error) {
      if (error instanceof LuksHeaderError) throw new FormatError('', error.message);
      throw error;
    }
  }
  const cipher: CipherSpec = { aesKeyBytes: (Number(alg.slice(4)) / 8) as 16 | 24 | 32, mode, ivgen, ivgenHash };
  const unportable = unportableCipher(cipher);
  if (unportable) throw new FormatError('', unportable);
  const iterText = options.get('encrypt.iter-time') ?? '2000';
  if (!/^\d+$/.test(iterText)) throw new FormatError('', "Parameter 'iter-time' expects uint64");
  const keySecret = options.get('encrypt.key-secret');
  if (keySecret === undefined) throw new FormatError('', KEY_REQUIRED);
  return {
    keySecret,
    cipher,
    hash,
    iterTimeMs: Number(iterText),
    nameIvgenHash: givenIvgenHash !== undefined,
  };
}

const KNOWN = new Set([
  'compat', 'cluster_size', 'refcount_bits', 'extended_l2', 'lazy_refcounts', 'compression_type', 'preallocation',
  'data_file', 'data_file_raw', 'backing_file', 'backing_fmt', 'size', 'encryption', ...ENCRYPT_KEYS,
]);

function bool(key: string, value: string): boolean {
  if (value === 'on' || value === 'true' || value === 'yes') return true;
  if (value === 'off' || value === 'false' || value === 'no') return false;
  throw new FormatError('', `Parameter '${key}' expects 'on' or 'off'`);
}

/** qcow2 creation options from -o; `size` is filled in by the caller. */
export function qcow2Options(options: Map<string, string>): Omit<CreateOptions, 'size'> {
  const out: Omit<CreateOptions, 'size'> = {};
  for (const [key, value] of options) {
    if (!KNOWN.has(key)) throw new FormatError('', `Invalid parameter '${key}'`);
    switch (key) {
      case 'compat':
        if (value === '0.10' || value === 'v2') out.compat = '0.10';
        else if (value === '1.1' || value === 'v3') out.compat = '1.1';
        else throw new FormatError('', `Parameter 'version' does not accept value '${value}'`);
        break;
      case 'cluster_size': {
        const size = parseImageSize(value);
        if (size === undefined) throw new FormatError('', `Parameter 'cluster_size' expects a non-negative number below 2^64`);
        out.clusterSize = size;
        break;
      }
      case 'refcount_bits':
        out.refcountBits = Number(value);
        break;
      case 'extended_l2':
        out.extendedL2 = bool(key, value);
        break;
      case 'lazy_refcounts':
        out.lazyRefcounts = bool(key, value);
        break;
      case 'compression_type':
        if (value !== 'zlib' && value !== 'zstd') throw new FormatError('', `Parameter 'compression-type' does not accept value '${value}'`);
        out.compressionType = value;
        break;
      case 'preallocation':
        if (value !== 'off' && value !== 'metadata') throw new FormatError('', `Unsupported preallocation mode '${value}' (off and metadata are supported)`);
        out.preallocation = value;
        break;
      case 'data_file':
        out.dataFile = value;
        break;
      case 'data_file_raw':
        out.dataFileRaw = bool(key, value);
        break;
      case 'backing_file':
        out.backingFile = value;
        break;
      case 'backing_fmt':
        out.backingFormat = value;
        break;
      default:
        // encryption and encrypt.*: see encryptionRequest.
        break;
    }
  }
  return out;
}

/**
 * The option summary qemu-img create prints after "fmt=qcow2": the format's defaults plus what was given, in
 * the order of qcow2's option list.
 */
export function describeQcow2(options: Map<string, string>, size: number): string {
  const given = (key: string): string | undefined => options.get(key);
  const parts: string[] = [];
  const push = (key: string, value: string | undefined) => value !== undefined && parts.push(`${key}=${value}`);
  push('encryption', given('encryption'));
  for (const key of ENCRYPT_KEYS) push(key, given(key));
  push('cluster_size', String(parseImageSize(given('cluster_size') ?? '65536')));
  push('extended_l2', given('extended_l2') ?? 'off');
  push('preallocation', given('preallocation'));
  push('compression_type', given('compression_type') ?? 'zlib');
  push('size', String(size));
  push('compat', given('compat'));
  push('backing_file', given('backing_file'));
  push('backing_fmt', given('backing_fmt'));
  push('data_file', given('data_file'));
  push('data_file_raw', given('data_file_raw'));
  push('lazy_refcounts', given('lazy_refcounts') ?? 'off');
  push('refcount_bits', given('refcount_bits') ?? '16');
  return parts.join(' ');
}

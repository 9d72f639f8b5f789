/**
 * qemu-img's command-line vocabulary shared by create, convert -O qcow2, measure and amend: sizes with binary
 * suffixes and the `-o key=value,...` creation options, turned into the engine's CreateOptions.
 */
import type { CreateOptions } from '../qcow2/create.js';
import { FormatError } from '../qcow2/errors.js';

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

const KNOWN = new Set([
  'compat', 'cluster_size', 'refcount_bits', 'extended_l2', 'lazy_refcounts', 'compression_type', 'preallocation',
  'data_file', 'data_file_raw', 'backing_file', 'backing_fmt', 'size', 'encryption', 'encrypt.format',
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
      case 'encryption':
      case 'encrypt.format':
        throw new FormatError('', 'encrypted images cannot be created');
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

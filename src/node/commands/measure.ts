/**
 * `qcow86 measure [--output=human|json] [-O qcow2|raw] [-o OPTIONS] [--size N | [-f FMT] [-l SNAPSHOT] FILE]`:
 * qemu-img measure. The figures come from src/qcow2/measure.ts; this file reads the command line the way
 * qemu-img 7.2 does (its checks, their order and messages) and prints its two output formats.
 */
import { parseArgs } from 'node:util';
import type { BlockDevice } from '../../qcow2/device.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { FormatError } from '../../qcow2/errors.js';
import { measureQcow2, type Measurement } from '../../qcow2/measure.js';
import { allocatedSize, openPath } from '../open-image.js';
import { ENCRYPT_KEYS, encryptionRequest, parseImageSize, parseOptionList, SIZE_ERROR } from '../image-options.js';
import { SECRET_OPTIONS, SECRET_USAGE, imageArgumentOf } from '../image-spec.js';
import { newLuksAreaBytes } from '../../qcow2/luks.js';
import { usageError } from '../usage.js';

export const USAGE =
  `usage: qcow86 measure [--output=human|json] [-O qcow2|raw] [-o OPTIONS] ${SECRET_USAGE} [--size N | [-f FMT] [-l SNAPSHOT] [-U] FILE]`;

/** Creation options each target format accepts (its own and the file protocol's), as qemu-img parses them. */
const QCOW2_KEYS = new Set([
  'size', 'compat', 'backing_file', 'backing_fmt', 'data_file', 'data_file_raw', 'encryption', ...ENCRYPT_KEYS,
  'cluster_size', 'extended_l2', 'preallocation', 'lazy_refcounts', 'refcount_bits', 'compression_type',
  'nocow', 'extent_size_hint',
]);
const RAW_KEYS = new Set(['size', 'preallocation', 'nocow', 'extent_size_hint']);
const BOOL_KEYS = new Set(['extended_l2', 'lazy_refcounts', 'data_file_raw', 'encryption', 'nocow']);
const SIZE_KEYS = new Set(['size', 'cluster_size', 'extent_size_hint']);

class MeasureError extends Error {}

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      format: { type: 'string', short: 'f' },
      'output-format': { type: 'string', short: 'O', default: 'raw' },
      options: { type: 'string', short: 'o', multiple: true, default: [] },
      snapshot: { type: 'string', short: 'l' },
      size: { type: 'string' },
      output: { type: 'string', default: 'human' },
      'force-share': { type: 'boolean', short: 'U', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      ...SECRET_OPTIONS,
    },
  });
  if (values.help) return console.log(USAGE), 0;
  const fail = (message: string): number => (console.error(`qcow86 measure: ${message}`), 1);
  const json = values.output === 'json';
  if (!json && values.output !== 'human') return usageError('measure', '--output must be used with human or json as argument', USAGE);
  let size: number | undefined;
  if (values.size !== undefined) {
    size = parseImageSize(values.size);
    if (size === undefined) return fail(SIZE_ERROR);
  }
  if (positionals.length > 1) return usageError('measure', 'expecting at most one image file name', USAGE);
  const file = positionals[0];
  if (file !== undefined && size !== undefined) return fail('--size N cannot be used together with a filename.');
  if (file === undefined && size === undefined) return fail('Either --size N or one filename must be specified.');

  let image: BlockDevice | undefined;
  try {
    let source: BlockDevice | undefined;
    if (file !== undefined) {
      const input = await imageArgumentOf(file, values);
      image = await openPath(input.path, { ...input.open, openDataFile: false });
      source = image;
      if (values.snapshot !== undefined) {
        if (!(image instanceof Qcow2Image)) return fail(`Failed to load snapshot: ${file}: only qcow2 images have internal snapshots`);
        try {
          source = await image.loadSnapshotTemporarily(values.snapshot);
        } catch (error) {
          // A snapshot that exists but cannot be used (its L1 table damaged) is named with the reason.
          if (error instanceof FormatError && error.field !== 'snapshot') return fail(error.message);
          return fail("Failed to load snapshot: Can't find snapshot");
        }
      }
    }
    const outputFormat = values['output-format'];
    if (outputFormat !== 'qcow2' && outputFormat !== 'raw') {
      if (outputFormat === 'qcow' || outputFormat === 'vmdk' || outputFormat === 'vdi' || outputFormat === 'vpc' || outputFormat === 'qed') {
        return fail(`Block driver '${outputFormat}' does not support size measurement`);
      }
      return fail(`Unknown file format '${outputFormat}'`);
    }
    const options = parseOptionList(values.options);
    const keys = outputFormat === 'qcow2' ? QCOW2_KEYS : RAW_KEYS;
    for (const [key, value] of options) {
      let problem: string | undefined;
      if (!keys.has(key)) problem = `Invalid parameter '${key}'`;
      else if (BOOL_KEYS.has(key) && !parseBool(value)) problem = `Parameter '${key}' expects 'on' or 'off'`;
      else if (SIZE_KEYS.has(key) && parseImageSize(value) === undefined) {
        problem = `Parameter '${key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.`;
      } else if (key === 'refcount_bits' && !/^\d+$/.test(value)) problem = `Parameter '${key}' expects a number`;
      if (problem) return fail(`${problem}\nqcow86 measure: Invalid options for file format '${outputFormat}'`);
    }
    if (size !== undefined) options.set('size', String(size));
    const optionSize = options.has('size') ? parseImageSize(options.get('size')!)! : 0;

    const result = outputFormat === 'raw' ? measureRaw(optionSize, source) : await measureQcow2Target(options, optionSize, source);
    if (json) {
      const out: Record<string, number> = {};
      if (result.bitmaps !== undefined) out.bitmaps = result.bitmaps;
      out.required = result.required;
      out['fully-allocated'] = result.fullyAllocated;
      console.log(JSON.stringify(out, null, 4));
    } else {
      let text = `required size: ${result.required}\nfully allocated size: ${result.fullyAllocated}\n`;
      if (result.bitmaps !== undefined) text += `bitmaps size: ${result.bitmaps}\n`;
      process.stdout.write(text);
    }
    return 0;
  } catch (error) {
    if (error instanceof MeasureError) return fail(error.message);
    throw error;
  } finally {
    await image?.close();
  }
}

function parseBool(value: string): boolean {
  return ['on', 'yes', 'true', 'y', 'off', 'no', 'false', 'n'].includes(value);
}

/** Raw output is as large as the disk, whatever it holds: unallocated sectors still take space in a raw file. */
function measureRaw(optionSize: number, source: BlockDevice | undefined): Measurement {
  const required = source ? source.virtualSize : Math.ceil(optionSize / 512) * 512;
  return { required, fullyAllocated: required };
}

/** qcow2_measure's option checks, in its order, then the figures. */
async function measureQcow2Target(options: Map<string, string>, optionSize: number, source: BlockDevice | undefined): Promise<Measurement> {
  const extendedL2 = ['on', 'yes', 'true', 'y'].includes(options.get('extended_l2') ?? 'off');
  const clusterSize = parseImageSize(options.get('cluster_size') ?? '64k')!;
  const compat = options.get('compat') ?? '1.1';
  let version: 2 | 3;
  if (compat === '0.10') version = 2;
  else if (compat === '1.1') version = 3;
  else throw new MeasureError(`Invalid compatibility level: '${compat}'`);
  const refcountBits = Number(options.get('refcount_bits') ?? '16');
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountBits > 64) throw new MeasureError('Refcount width must be a power of two and may not exceed 64 bits');
  if (version === 2 && refcountBits !== 16) {
    throw new MeasureError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  }
  const preallocation = options.get('preallocation') ?? 'off';
  if (preallocation !== 'off' && preallocation !== 'metadata' && preallocation !== 'falloc' && preallocation !== 'full') {
    throw new MeasureError(`invalid parameter value: ${preallocation}`);
  }
  // A LUKS target also holds its LUKS header and key material, in whole clusters.
  let luksBytes = 0;
  if (options.get('encrypt.format') === 'luks') {
    try {
      luksBytes = newLuksAreaBytes(encryptionRequest(options)!.cipher);
    } catch (error) {
      if (error instanceof FormatError) throw new MeasureError(error.message);
      throw error;
    }
  }
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) throw new MeasureError('Cluster size must be a power of two between 512 and 2048k');
  if (extendedL2 && clusterBits < 14) throw new MeasureError('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  // The limit is checked against -o size / --size only, as qemu-img does.
  const aligned = Math.ceil(optionSize / clusterSize) * clusterSize;
  const l2Tables = Math.ceil(aligned / clusterSize / (clusterSize / (extendedL2 ? 16 : 8)));
  if (l2Tables * 8 > 32 * 1024 * 1024) throw new MeasureError('The image size is too large (try using a larger cluster size)');
  const result = await measureQcow2(
    { size: optionSize, clusterSize, refcountOrder, extendedL2, preallocation, hasBackingFile: options.has('backing_file') },
    source,
    version,
    { allocatedSize },
  );
  const luksClusters = Math.ceil(luksBytes / clusterSize) * clusterSize;
  return { ...result, required: result.required + luksClusters, fullyAllocated: result.fullyAllocated + luksClusters };
}


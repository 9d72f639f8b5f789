/**
 * `qcow86 amend [-f qcow2] [-p] [-q] -o OPTIONS FILE`: qemu-img amend for qcow2: compat=0.10|1.1,
 * refcount_bits, data_file (the recorded name), data_file_raw=off, lazy_refcounts=on|off, and size (a resize). The image is opened for writing under the write lock (a dirty
 * lazy-refcounts image has its refcounts rebuilt by that open, before anything else). Options qemu-img only
 * accepts at creation, and the ones qcow86 does not amend, are refused with qemu-img's wording.
 */
import { parseArgs } from 'node:util';
import { openForWriting } from '../../io/lock.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { UnsupportedError } from '../../qcow2/errors.js';
import { amendQcow2, type AmendOptions } from '../../qcow2/amend.js';
import { resizeQcow2 } from '../../qcow2/resize.js';
import { parseImageSize, parseOptionList, SIZE_ERROR } from '../image-options.js';
import { usageError } from '../usage.js';
import { SECRET_OPTIONS, SECRET_USAGE, imageArgumentOf } from '../image-spec.js';

export const USAGE = `usage: qcow86 amend [-f qcow2] ${SECRET_USAGE} [-p] [-q] -o OPTIONS FILE`;

const CREATION_ONLY = new Set(['cluster_size', 'extended_l2', 'preallocation', 'compression_type', 'encryption', 'nocow', 'extent_size_hint']);

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      format: { type: 'string', short: 'f' },
      options: { type: 'string', short: 'o', multiple: true, default: [] },
      progress: { type: 'boolean', short: 'p', default: false },
      quiet: { type: 'boolean', short: 'q', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      ...SECRET_OPTIONS,
    },
  });
  if (values.help) return console.log(USAGE), 0;
  const fail = (message: string): number => (console.error(`qcow86 amend: ${message}`), 1);
  if (values.options.length === 0) return fail("Must specify options (-o)\nTry 'qcow86 amend --help' for more information");
  if (positionals.length !== 1) return usageError('amend', 'Expecting one image file name', USAGE);
  const image = await imageArgumentOf(positionals[0]!, values);
  const file = image.path;
  const format = image.format;
  if (format !== undefined && format !== 'qcow2') return fail(`Format driver '${format}' does not support option amendment`);

  const options = parseOptionList(values.options);
  const amend: AmendOptions = {};
  let size: number | undefined;
  for (const [key, value] of options) {
    switch (key) {
      case 'compat':
        if (value === '0.10' || value === 'v2') amend.compat = '0.10';
        else if (value === '1.1' || value === 'v3') amend.compat = '1.1';
        else return fail(`Unknown compatibility level ${value}`);
        break;
      case 'lazy_refcounts':
        if (['on', 'yes', 'true', 'y'].includes(value)) amend.lazyRefcounts = true;
        else if (['off', 'no', 'false', 'n'].includes(value)) amend.lazyRefcounts = false;
        else return fail(`Parameter 'lazy_refcounts' expects 'on' or 'off'`);
        break;
      case 'size':
        size = parseImageSize(value);
        if (size === undefined) return fail(SIZE_ERROR);
        break;
      case 'refcount_bits': {
        if (!/^\s*[+-]?\d+\s*$/.test(value)) return fail("Parameter 'refcount_bits' expects a number");
        const bits = Number(value);
        if (!(bits >= 1 && bits <= 64 && Number.isInteger(Math.log2(bits)))) return fail('Refcount width must be a power of two and may not exceed 64 bits');
        amend.refcountBits = bits;
        break;
      }
      case 'backing_file':
      case 'backing_fmt':
        return fail("Cannot amend the backing file\nYou can use 'qcow86 rebase' instead.");
      case 'data_file':
        amend.dataFile = value;
        break;
      case 'data_file_raw':
        if (['on', 'yes', 'true', 'y'].includes(value)) amend.dataFileRaw = true;
        else if (['off', 'no', 'false', 'n'].includes(value)) amend.dataFileRaw = false;
        else return fail(`Parameter 'data_file_raw' expects 'on' or 'off'`);
        break;
      case 'encrypt.format':
        return fail(`Changing '${key}' with amend is not supported by qcow86`);
      default:
        if (CREATION_ONLY.has(key)) return fail(`Invalid parameter '${key}'\nThis option is only supported for image creation`);
        return fail(`Invalid parameter '${key}'`);
    }
  }

  const device = await openForWriting(file, { ...image.open, format: 'qcow2' });
  try {
    if (!(device instanceof Qcow2Image)) return fail(`Format driver '${device.format}' does not support option amendment`);
    // QEMU resizes before changing the version, so a downgrade sees the final size.
    if (size !== undefined && size !== device.virtualSize) await resizeQcow2(device, size);
    try {
      await amendQcow2(device, amend);
    } catch (error) {
      // qemu-img words these without the file name.
      if (error instanceof UnsupportedError) return fail(error.message.slice(error.file ? error.file.length + 2 : 0));
      throw error;
    }
    await device.flush();
    if (values.progress && !values.quiet) process.stdout.write('    (100.00/100%)\n');
  } finally {
    await device.close();
  }
  return 0;
}

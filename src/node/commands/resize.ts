/**
 * `qcow86 resize [--shrink] [-f FMT] [-q] FILE [+|-]SIZE`: qemu-img resize for qcow2 and raw. Shrinking needs
 * --shrink (qemu-img refuses it otherwise, whatever lies past the new end).
 */
import { parseArgs } from 'node:util';
import { open } from 'node:fs/promises';
import { openForWriting } from '../../io/lock.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { resizeQcow2 } from '../../qcow2/resize.js';
import { openPath } from '../open-image.js';
import { parseImageSize, SIZE_ERROR } from '../image-options.js';
import { usageError } from '../usage.js';
import { SECRET_OPTIONS, SECRET_USAGE, imageArgumentOf } from '../image-spec.js';

export const USAGE = `usage: qcow86 resize [--shrink] [-f FMT] ${SECRET_USAGE} [-q] FILE [+|-]SIZE`;

export async function run(args: string[]): Promise<number> {
  // "-1G" is a size here, not an option: qemu-img reads the last argument as the size whatever it looks like.
  const sizeText = args.at(-1);
  const { values, positionals } = parseArgs({
    args: args.slice(0, -1),
    allowPositionals: true,
    options: {
      format: { type: 'string', short: 'f' },
      shrink: { type: 'boolean', default: false },
      quiet: { type: 'boolean', short: 'q', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      ...SECRET_OPTIONS,
    },
  });
  if (values.help || sizeText === '--help' || sizeText === '-h') return console.log(USAGE), 0;
  if (positionals.length !== 1 || sizeText === undefined) return usageError('resize', 'expecting a file name and a size', USAGE);
  const image = await imageArgumentOf(positionals[0]!, values);
  const file = image.path;
  const relative = sizeText.startsWith('+') ? 1 : sizeText.startsWith('-') ? -1 : 0;
  const amount = parseImageSize(relative ? sizeText.slice(1) : sizeText);
  if (amount === undefined) return console.error(`qcow86 resize: ${SIZE_ERROR}`), 1;

  const probe = await openPath(file, { ...image.open, openBacking: false });
  const current = probe.virtualSize;
  const isQcow2 = probe instanceof Qcow2Image;
  const isRaw = probe.format === 'raw';
  await probe.close();
  const size = relative ? current + relative * amount : amount;
  if (size < 0) return console.error('qcow86 resize: New image size must be positive'), 1;
  if (size < current && !values.shrink) {
    console.error('qcow86 resize: Use the --shrink option to perform a shrink operation.');
    return 1;
  }
  if (isRaw) {
    const handle = await open(file, 'r+');
    await handle.truncate(size);
    await handle.close();
  } else if (isQcow2) {
    const device = await openForWriting(file, { ...image.open, format: 'qcow2', openBacking: false });
    try {
      await resizeQcow2(device as Qcow2Image, size);
      await device.flush();
    } finally {
      await device.close();
    }
  } else {
    console.error(`qcow86 resize: ${file}: Image format '${probe.format}' does not support resizing`);
    return 1;
  }
  if (!values.quiet) console.log('Image resized.');
  return 0;
}

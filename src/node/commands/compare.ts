/**
 * `qcow86 compare [-f FMT] [-F FMT] [-p] A B`: qemu-img compare. Exit 0 when the guest-visible contents are
 * equal, 1 when they differ ("Content mismatch at offset N!", N at 512-byte granularity like qemu-img), 2 on
 * an error. When the sizes differ, the larger image's extra bytes must read as zeros (qemu-img warns first).
 */
import { parseArgs } from 'node:util';
import type { BlockDevice } from '../../qcow2/device.js';
import { Qcow86Error } from '../../qcow2/errors.js';
import { blockStatus } from '../../qcow2/block-status.js';
import { openPath, parseFormat } from '../open-image.js';
import { noHoles } from './convert.js';
import { usageError } from '../usage.js';
import { SECRET_OPTIONS, SECRET_USAGE, Secrets, imageArgument } from '../image-spec.js';

export const USAGE = `usage: qcow86 compare [-f FMT] [-F FMT] ${SECRET_USAGE} [-U] A B`;
const CHUNK = 4 * 1024 * 1024;
const SECTOR = 512;

export async function run(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: {
        'a-format': { type: 'string', short: 'f' },
        'b-format': { type: 'string', short: 'F' },
        'force-share': { type: 'boolean', short: 'U', default: false },
        progress: { type: 'boolean', short: 'p', default: false },
        help: { type: 'boolean', short: 'h', default: false },
        ...SECRET_OPTIONS,
      },
    });
  } catch (error) {
    console.error(`qcow86 compare: ${(error as Error).message}`);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.help) return console.log(USAGE), 0;
  if (positionals.length !== 2) return usageError('compare', 'expecting two image file names', USAGE), 2;
  const devices: BlockDevice[] = [];
  try {
    // -F defaults to -f, as in qemu-img.
    const formatA = parseFormat(values['a-format']);
    const formatB = parseFormat(values['b-format'] ?? values['a-format'], '-F');
    const secrets = await Secrets.parse(values.object);
    const a = imageArgument(positionals[0]!, values['image-opts'], secrets, formatA);
    const b = imageArgument(positionals[1]!, values['image-opts'], secrets, values['image-opts'] ? undefined : formatB);
    devices.push(await openPath(a.path, a.open));
    devices.push(await openPath(b.path, b.open));
    const mismatch = await firstDifference(devices[0]!, devices[1]!, () => console.log('Warning: Image size mismatch!'));
    if (mismatch === undefined) {
      console.log('Images are identical.');
      return 0;
    }
    console.log(`Content mismatch at offset ${mismatch}!`);
    return 1;
  } catch (error) {
    if (!(error instanceof Qcow86Error)) throw error;
    console.error(`qcow86 compare: ${error.message}`);
    return 2;
  } finally {
    for (const device of devices) await device.close().catch(() => {});
  }
}

/**
 * The offset of the first differing 512-byte sector, or undefined when the disks read the same. Past the
 * smaller disk's end, the larger must read as zeros; `onSizeMismatch` is called before that part is checked.
 */
export async function firstDifference(a: BlockDevice, b: BlockDevice, onSizeMismatch: () => void = () => {}): Promise<number | undefined> {
  const common = Math.min(a.virtualSize, b.virtualSize);
  for (let at = 0; at < common; ) {
    const length = await skippable(a, b, at, Math.min(CHUNK, common - at));
    if (length.zeroBoth) {
      at += length.length;
      continue;
    }
    const [x, y] = await Promise.all([a.read(at, length.length), b.read(at, length.length)]);
    const index = firstMismatch(x, y);
    if (index !== undefined) return Math.floor((at + index) / SECTOR) * SECTOR;
    at += length.length;
  }
  if (a.virtualSize === b.virtualSize) return undefined;
  onSizeMismatch();
  const larger = a.virtualSize > b.virtualSize ? a : b;
  for (let at = common; at < larger.virtualSize; ) {
    const status = await blockStatus(larger, at, Math.min(2 ** 30, larger.virtualSize - at), { holeProbe: noHoles });
    if (!status.zero) {
      for (let chunk = at; chunk < at + status.length; chunk += CHUNK) {
        const bytes = await larger.read(chunk, Math.min(CHUNK, at + status.length - chunk));
        const index = bytes.findIndex((value) => value !== 0);
        if (index >= 0) return Math.floor((chunk + index) / SECTOR) * SECTOR;
      }
    }
    at += status.length;
  }
  return undefined;
}

/** How far from `at` both disks are known to read as zeros (then nothing needs reading), or else how much to read. */
async function skippable(a: BlockDevice, b: BlockDevice, at: number, limit: number): Promise<{ length: number; zeroBoth: boolean }> {
  const [sa, sb] = await Promise.all([blockStatus(a, at, limit, { holeProbe: noHoles }), blockStatus(b, at, limit, { holeProbe: noHoles })]);
  const length = Math.min(sa.length, sb.length, limit);
  if (sa.zero && sb.zero) return { length, zeroBoth: true };
  return { length: limit, zeroBoth: false };
}

function firstMismatch(x: Uint8Array, y: Uint8Array): number | undefined {
  const a = Buffer.from(x.buffer, x.byteOffset, x.length);
  const b = Buffer.from(y.buffer, y.byteOffset, y.length);
  if (a.equals(b)) return undefined;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return undefined;
}

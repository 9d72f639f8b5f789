/**
 * `qcow86 snapshot -l|-c NAME|-a NAME|-d NAME FILE`: qemu-img snapshot over the engine's internal snapshot
 * operations. -l prints qemu-img's table (nothing at all when there are no snapshots, as qemu-img).
 */
import { parseArgs } from 'node:util';
import { openForWriting } from '../../io/lock.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { openPath } from '../open-image.js';
import { imageInfo, type Info } from '../image-info.js';
import { snapshotLine } from './info.js';
import { usageError } from '../usage.js';
import { SECRET_OPTIONS, SECRET_USAGE, imageArgumentOf } from '../image-spec.js';

export const USAGE = `usage: qcow86 snapshot [-f qcow2] ${SECRET_USAGE} [-U] [-q] (-l | -c NAME | -a NAME | -d NAME) FILE`;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      format: { type: 'string', short: 'f' },
      list: { type: 'boolean', short: 'l', default: false },
      create: { type: 'string', short: 'c' },
      apply: { type: 'string', short: 'a' },
      delete: { type: 'string', short: 'd' },
      quiet: { type: 'boolean', short: 'q', default: false },
      'force-share': { type: 'boolean', short: 'U', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      ...SECRET_OPTIONS,
    },
  });
  if (values.help) return console.log(USAGE), 0;
  if (positionals.length !== 1) return usageError('snapshot', 'expecting one image file name', USAGE);
  const actions = [values.list, values.create, values.apply, values.delete].filter((a) => a !== undefined && a !== false);
  if (actions.length > 1) return usageError('snapshot', "Cannot mix '-l', '-a', '-c', '-d'", USAGE);
  const image = await imageArgumentOf(positionals[0]!, values);
  const file = image.path;

  if (actions.length === 0 || values.list) {
    const device = await openPath(file, { ...image.open, openBacking: false, openDataFile: false });
    try {
      const info = await imageInfo(device, file);
      const snapshots = (info.snapshots as Info[] | undefined) ?? [];
      if (snapshots.length === 0) return 0;
      const header = `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`;
      console.log(['Snapshot list:', header, ...snapshots.map(snapshotLine)].join('\n'));
      return 0;
    } finally {
      await device.close();
    }
  }

  const device = await openForWriting(file, { ...image.open, openBacking: false });
  try {
    if (!(device instanceof Qcow2Image)) {
      console.error(`qcow86 snapshot: ${file}: only qcow2 images have internal snapshots`);
      return 1;
    }
    const fail = (what: string, name: string, error: unknown): number => {
      console.error(`qcow86 snapshot: Could not ${what} snapshot '${name}': ${(error as Error).message}`);
      return 1;
    };
    if (values.create !== undefined) await device.createSnapshot(values.create, { allowSameName: true, icount: 0 }).catch((e) => { throw fail('create', values.create!, e); });
    if (values.apply !== undefined) await device.applySnapshot(values.apply).catch((e) => { throw fail('apply', values.apply!, e); });
    if (values.delete !== undefined) await device.deleteSnapshot(values.delete).catch((e) => { throw fail('delete', values.delete!, e); });
    await device.flush();
    return 0;
  } catch (code) {
    if (typeof code === 'number') return code;
    throw code;
  } finally {
    await device.close();
  }
}

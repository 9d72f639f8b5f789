/**
 * `qcow86 commit [-f FMT] [-b BASE] [-d] [-p] [-q] FILE`: qemu-img commit. What FILE's chain defines above the
 * base (its backing file, or BASE deeper in the chain) is written into the base, which grows to FILE's size when
 * smaller; then FILE is emptied, unless -d is given. -b implies -d, as in qemu-img: the images between FILE and
 * BASE no longer match what lies under them, but FILE still reads the same through them.
 */
import { parseArgs } from 'node:util';
import { realpath } from 'node:fs/promises';
import { resolve } from 'node:path';
import { openForWriting } from '../../io/lock.js';
import { combinePath, isHttpUrl } from '../../io/node.js';
import type { BlockDevice } from '../../qcow2/device.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { QcowV1Image } from '../../qcow2/qcow1.js';
import { fullNameOf } from '../../qcow2/open.js';
import { chainLayers, checkCommittable, copyAbove, growBase, makeEmpty } from '../../qcow2/commit.js';
import { openPath } from '../open-image.js';
import { usageError } from '../usage.js';
import { SECRET_OPTIONS, SECRET_USAGE, imageArgumentOf } from '../image-spec.js';
import { progressPrinter } from './convert.js';

export const USAGE = `usage: qcow86 commit [-f FMT] ${SECRET_USAGE} [-b BASE] [-d] [-p] [-q] FILE`;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      format: { type: 'string', short: 'f' },
      base: { type: 'string', short: 'b' },
      drop: { type: 'boolean', short: 'd', default: false },
      progress: { type: 'boolean', short: 'p', default: false },
      quiet: { type: 'boolean', short: 'q', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      ...SECRET_OPTIONS,
    },
  });
  if (values.help) return console.log(USAGE), 0;
  if (positionals.length !== 1) return usageError('commit', 'expecting one image file name', USAGE);
  const image = await imageArgumentOf(positionals[0]!, values);
  const { path: file, passwords } = image;
  // -b implies -d: emptying the top would make it read the (now stale) intermediate images.
  const emptying = !values.drop && values.base === undefined;

  const top = emptying ? await openForWriting(file, image.open) : await openPath(file, image.open);
  try {
    checkCommittable(top, emptying);
    const layers = chainLayers(top);
    const depth = values.base === undefined ? 1 : await findBase(layers, values.base);
    if (depth === undefined) {
      console.error(`qcow86 commit: Did not find '${values.base}' in the backing chain of '${file}'`);
      return 1;
    }
    const baseLayer = layers[depth]!;
    const basePath = fullNameOf(baseLayer);
    if (isHttpUrl(basePath)) {
      console.error(`qcow86 commit: ${basePath}: cannot commit into a backing file reached over HTTP (it is read-only)`);
      return 1;
    }
    const progress = values.progress && !values.quiet && process.stderr.isTTY ? progressPrinter() : undefined;
    // The base is the layer `depth` down the chain: its password is that layer's (backing.encrypt.key-secret...).
    let base: BlockDevice = await openForWriting(basePath, { format: baseLayer.format, passwords: (d) => passwords(depth + d) });
    try {
      base = await growBase(base, top.virtualSize);
      await copyAbove(top, depth, base, { progress: progress ? (f) => progress(f) : undefined });
    } finally {
      await base.close();
    }
    if (emptying) await makeEmpty(top as Qcow2Image);
    progress?.(1, true);
  } finally {
    await top.close();
  }
  if (!values.quiet) console.log('Image committed.');
  return 0;
}

/**
 * The depth of the chain layer `name` designates, below the top, as QEMU's bdrv_find_backing_image finds it: the
 * name as recorded in the layer above, or the same file once both are made absolute (a relative `name` relative
 * to the directory of the layer above) and canonical.
 */
async function findBase(layers: BlockDevice[], name: string): Promise<number | undefined> {
  for (let depth = 1; depth < layers.length; depth++) {
    const above = layers[depth - 1]!;
    const layer = layers[depth]!;
    if (recordedBacking(above) === name) return depth;
    const full = fullNameOf(layer);
    if (isHttpUrl(full) || isHttpUrl(name)) {
      if (full === name) return depth;
      continue;
    }
    const wanted = await canonical(combinePath(above.name, name));
    if (wanted !== undefined && wanted === (await canonical(full))) return depth;
  }
  return undefined;
}

function recordedBacking(device: BlockDevice): string | undefined {
  if (device instanceof Qcow2Image) return device.header.backingFile;
  if (device instanceof QcowV1Image) return device.backingName;
  return undefined;
}

async function canonical(path: string): Promise<string | undefined> {
  return realpath(resolve(path)).catch(() => undefined);
}

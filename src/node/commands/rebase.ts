/**
 * `qcow86 rebase [-f FMT] [-F BACKING_FMT] [-u] [-p] [-q] -b BACKING FILE`: qemu-img rebase. Safe mode keeps the
 * guest-visible disk: what the old and the new backing chains read differently is copied into FILE first (see
 * src/qcow2/rebase.ts). `-b ""` removes the backing file; -u rewrites only the header. A relative BACKING is
 * opened relative to FILE's directory and recorded as given. The qcow86 backing validator ('q86v') follows the
 * new backing store: its ETag (HTTP) when it has one, otherwise the extension is removed.
 */
import { parseArgs } from 'node:util';
import { openForWriting } from '../../io/lock.js';
import { nodeResolver } from '../../io/node.js';
import { nodeCodecs } from '../../io/node-codecs.js';
import { nodeCrypto } from '../../io/node-crypto.js';
import type { BlockDevice } from '../../qcow2/device.js';
import type { ByteStore } from '../../qcow2/store.js';
import { Qcow2Image } from '../../qcow2/image.js';
import { openImage } from '../../qcow2/open.js';
import { checkBackingFits, copyDifferences, setBacking } from '../../qcow2/rebase.js';
import { parseFormat } from '../open-image.js';
import { usageError } from '../usage.js';
import { SECRET_OPTIONS, SECRET_USAGE, imageArgumentOf } from '../image-spec.js';
import { progressPrinter } from './convert.js';

export const USAGE = `usage: qcow86 rebase [-f FMT] [-F BACKING_FMT] ${SECRET_USAGE} [-u] [-p] [-q] -b BACKING FILE`;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      format: { type: 'string', short: 'f' },
      backing: { type: 'string', short: 'b' },
      'backing-format': { type: 'string', short: 'F' },
      unsafe: { type: 'boolean', short: 'u', default: false },
      progress: { type: 'boolean', short: 'p', default: false },
      quiet: { type: 'boolean', short: 'q', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      ...SECRET_OPTIONS,
    },
  });
  if (values.help) return console.log(USAGE), 0;
  if (positionals.length !== 1) return usageError('rebase', 'expecting one image file name', USAGE);
  if (values.backing === undefined && !values.unsafe) return usageError('rebase', 'Must specify backing file (-b) or use unsafe mode (-u)', USAGE);
  const image = await imageArgumentOf(positionals[0]!, values);
  const { path: file, passwords } = image;
  const name = values.backing ?? '';
  const backingFormat = parseFormat(values['backing-format'], '-F');
  const fail = (message: string): number => (console.error(`qcow86 rebase: ${message}`), 1);
  // qemu-img 7.2 refuses to record a backing file without its format (it would have to be probed on every open).
  if (name !== '' && backingFormat === undefined) return fail(`Could not change the backing file to '${name}': backing format must be specified`);

  const overlay = await openForWriting(file, { ...image.open, openBacking: !values.unsafe });
  let newBacking: BlockDevice | undefined;
  try {
    if (!(overlay instanceof Qcow2Image)) return fail(`Could not change the backing file to '${name}': Operation not supported (${overlay.format} images have no backing file to change)`);
    const target = { file: name, format: backingFormat, validator: undefined as string | undefined };
    if (values.unsafe) {
      // The new backing file need not exist; when it does, its validator is recorded like any other's.
      if (name !== '') target.validator = await validatorOf(name, overlay.store);
    } else if (name !== '') {
      try {
        // An encrypted new backing file takes the passwords given for the backing chain (backing.encrypt...).
        newBacking = await openBackingChain(name, backingFormat, overlay.store, (d) => passwords(d + 1));
      } catch (error) {
        return fail(`Could not open new backing file '${name}': ${(error as Error).message}`);
      }
      target.validator = (newBacking as { store?: ByteStore }).store?.validator;
    }
    checkBackingFits(overlay, target);
    if (!values.unsafe) {
      const progress = values.progress && !values.quiet && process.stderr.isTTY ? progressPrinter() : undefined;
      await copyDifferences(overlay, newBacking, { progress: progress ? (f) => progress(f) : undefined });
      progress?.(1, true);
    }
    await setBacking(overlay, target);
    return 0;
  } finally {
    await newBacking?.close();
    await overlay.close();
  }
}

/** Opens the new backing file and its own chain read-only, `name` relative to the overlay as QEMU resolves it. */
async function openBackingChain(name: string, format: ReturnType<typeof parseFormat>, overlay: ByteStore, passwords: (depth: number) => Uint8Array | undefined): Promise<BlockDevice> {
  const resolver = nodeResolver();
  const opened = await resolver.open(name, overlay, { readOnly: true });
  return openImage(opened.store, { format, readOnly: true, resolver, codecs: nodeCodecs(), crypto: nodeCrypto(), passwords, identity: opened.identity });
}

async function validatorOf(name: string, overlay: ByteStore): Promise<string | undefined> {
  try {
    const { store } = await nodeResolver().open(name, overlay, { readOnly: true });
    const validator = store.validator;
    await store.close();
    return validator;
  } catch {
    return undefined;
  }
}

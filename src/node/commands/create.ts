/**
 * `qcow86 create [-f qcow2|raw] [-o OPTIONS] [-b BACKING [-F FMT]] [-u] FILE [SIZE]`: qemu-img create. Without a
 * SIZE the backing file's size is used (so the backing must open, unless that is impossible with -u).
 */
import { parseArgs } from 'node:util';
import { open } from 'node:fs/promises';
import { FileStore, combinePath } from '../../io/node.js';
import { withOutputLocks } from '../../io/lock.js';
import { withNewQcow2 } from '../create-image.js';
import { probeFormat } from '../../qcow2/open.js';
import { openPath, parseFormat } from '../open-image.js';
import { describeQcow2, encryptionRequest, parseImageSize, parseOptionList, qcow2Options, SIZE_ERROR } from '../image-options.js';
import { SECRET_USAGE, Secrets } from '../image-spec.js';
import { nodeCrypto } from '../../io/node-crypto.js';
import { usageError } from '../usage.js';

export const USAGE = `usage: qcow86 create [-f qcow2|raw] ${SECRET_USAGE.replace(' [--image-opts]', '')} [-o OPTIONS] [-b BACKING [-F FMT]] [-u] [-q] FILE [SIZE]`;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      format: { type: 'string', short: 'f', default: 'raw' },
      options: { type: 'string', short: 'o', multiple: true, default: [] },
      backing: { type: 'string', short: 'b' },
      'backing-format': { type: 'string', short: 'F' },
      unsafe: { type: 'boolean', short: 'u', default: false },
      quiet: { type: 'boolean', short: 'q', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      object: { type: 'string', multiple: true, default: [] },
    },
  });
  if (values.help) return console.log(USAGE), 0;
  if (positionals.length < 1 || positionals.length > 2) return usageError('create', 'expecting a file name and an optional size', USAGE);
  const [file, sizeText] = positionals as [string, string | undefined];
  const format = values.format;
  if (format !== 'qcow2' && format !== 'raw') return usageError('create', `Unknown file format '${format}' (create supports qcow2 and raw)`, USAGE);
  const options = parseOptionList(values.options);
  if (values.backing !== undefined) options.set('backing_file', values.backing);
  if (values['backing-format'] !== undefined) options.set('backing_fmt', values['backing-format']);
  let size: number | undefined;
  if (sizeText !== undefined) {
    size = parseImageSize(sizeText);
    if (size === undefined) return console.error(`qcow86 create: ${SIZE_ERROR}`), 1;
  } else if (options.has('size')) {
    size = parseImageSize(options.get('size')!);
    if (size === undefined) return console.error(`qcow86 create: ${SIZE_ERROR}`), 1;
  }
  options.delete('size');

  const backingFile = options.get('backing_file');
  if (format === 'raw') {
    if (backingFile !== undefined || options.size > 0) return usageError('create', `raw images take no options (${[...options.keys()].join(', ')})`, USAGE);
    if (size === undefined) return usageError('create', 'Image creation needs a size parameter', USAGE);
    if (!values.quiet) console.log(`Formatting '${file}', fmt=raw size=${size}`);
    await withOutputLocks([file], async () => {
      const handle = await open(file, 'w');
      await handle.truncate(size);
      await handle.close();
    });
    return 0;
  }

  const createOptions = qcow2Options(options);
  if (backingFile !== undefined && createOptions.backingFormat === undefined) {
    // qemu-img 7.2 refuses this: a probed backing format lets whoever writes the backing file choose how the
    // overlay reads it. Like qemu-img, say what the probe would have found when the file opens.
    const detected = values.unsafe ? undefined : await probePath(combinePath(file, backingFile));
    console.error(`qcow86 create: ${file}: Backing file specified without backing format${detected ? `\nDetected format of ${detected}.` : ''}`);
    return 1;
  }
  const secrets = await Secrets.parse(values.object);
  const encrypt = encryptionRequest(options);
  if (backingFile !== undefined && (!values.unsafe || size === undefined)) {
    // Like qemu-img: the backing file must open (this also gives the size when none was given).
    let backing;
    try {
      // For its size only: an encrypted backing file needs no key here (qemu-img opens it without I/O).
      backing = await openPath(combinePath(file, backingFile), { format: parseFormat(createOptions.backingFormat, '-F'), metadataOnly: true });
    } catch (error) {
      console.error(`qcow86 create: ${file}: Could not open '${backingFile}': ${(error as Error).message}\nCould not open backing image.`);
      return 1;
    }
    size ??= backing.virtualSize;
    await backing.close();
  }
  if (size === undefined) return usageError('create', 'Image creation needs a size parameter', USAGE);
  if (!values.quiet) console.log(`Formatting '${file}', fmt=qcow2 ${describeQcow2(options, size)}`);
  if (encrypt) {
    const { keySecret, cipher, hash, iterTimeMs, nameIvgenHash } = encrypt;
    createOptions.encryption = { password: secrets.password(keySecret), crypto: nodeCrypto(), cipher, hash, iterTimeMs, nameIvgenHash };
  }
  await withNewQcow2(file, { ...createOptions, size }, async () => {});
  return 0;
}

/** The format QEMU's probe would give the file at `path`, or undefined when it cannot be read. */
async function probePath(path: string): Promise<string | undefined> {
  let store: FileStore | undefined;
  try {
    store = await FileStore.open(path, { readOnly: true, regularFile: 'backing file' });
    return await probeFormat(store);
  } catch {
    return undefined;
  } finally {
    await store?.close();
  }
}

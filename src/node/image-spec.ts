/**
 * qemu-img's spelling for secrets and image options, shared by every command that opens an image:
 * - `--object secret,id=ID,data=TEXT` or `--object secret,id=ID,file=PATH`, optionally `format=base64`: the
 *   secret's bytes (a file is taken as it is, trailing newline included, as QEMU takes it);
 * - `--image-opts`: the image argument is an option list instead of a file name,
 *   `driver=qcow2,file.filename=FILE,encrypt.key-secret=ID`, with `backing.encrypt.key-secret=ID` (and
 *   `backing.backing.` ...) for encrypted images further down the chain.
 * Messages are qemu-img's where it has one.
 */
import { readFile } from 'node:fs/promises';
import { FormatError } from '../qcow2/errors.js';
import type { ImageFormat } from '../qcow2/open.js';
import { parseOptionList } from './image-options.js';
import { parseFormat } from './open-image.js';

/** parseArgs options every image-reading command accepts. */
export const SECRET_OPTIONS = {
  object: { type: 'string', multiple: true, default: [] as string[] },
  'image-opts': { type: 'boolean', default: false },
} as const;

/** Usage text for those options. */
export const SECRET_USAGE = '[--object secret,id=ID,data=TEXT|file=PATH[,format=base64]] [--image-opts]';

export class Secrets {
  private constructor(private readonly values: Map<string, Uint8Array>) {}

  static readonly none = new Secrets(new Map());

  /** Parses --object arguments, reading secret files now (as QEMU does when it creates the object). */
  static async parse(objects: readonly string[] = []): Promise<Secrets> {
    const values = new Map<string, Uint8Array>();
    for (const text of objects) {
      // The first item may be the bare type ("secret,id=..."), as qemu-img allows.
      const bare = /^[^,=]+(,|$)/.exec(text);
      const options = parseOptionList([bare ? text.slice(bare[0].length) : text]);
      const qomType = bare ? bare[0].replace(',', '') : options.get('qom-type');
      if (qomType !== 'secret') throw new FormatError('', `Parameter 'qom-type' does not accept value '${qomType ?? ''}' (qcow86 knows 'secret' objects only)`);
      const id = options.get('id');
      if (id === undefined) throw new FormatError('', "Parameter 'id' is missing");
      for (const key of options.keys()) {
        if (!['id', 'data', 'file', 'format', 'qom-type'].includes(key)) throw new FormatError('', `Property 'secret.${key}' not found${key === 'keyid' || key === 'iv' ? ' (encrypted secrets are not supported by qcow86)' : ''}`);
      }
      const data = options.get('data');
      const file = options.get('file');
      if (data !== undefined && file !== undefined) throw new FormatError('', "'file' and 'data' are mutually exclusive");
      if (data === undefined && file === undefined) throw new FormatError('', "Either 'file' or 'data' must be provided");
      const format = options.get('format') ?? 'raw';
      if (format !== 'raw' && format !== 'base64') throw new FormatError('', `Parameter 'format' does not accept value '${format}'`);
      let bytes: Uint8Array;
      if (file !== undefined) {
        try {
          bytes = new Uint8Array(await readFile(file));
        } catch (error) {
          throw new FormatError('', `Unable to read ${file}: ${(error as Error).message}`);
        }
      } else {
        bytes = new TextEncoder().encode(data);
      }
      if (format === 'base64') bytes = decodeBase64(bytes);
      if (values.has(id)) throw new FormatError('', `attempt to add duplicate property '${id}' to object (type 'container')`);
      values.set(id, bytes);
    }
    return new Secrets(values);
  }

  /** A secret as a password: QEMU requires valid UTF-8 without NUL bytes. */
  password(id: string): Uint8Array {
    const bytes = this.values.get(id);
    if (bytes === undefined) throw new FormatError('', `No secret with id '${id}'`);
    try {
      new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    } catch {
      throw new FormatError('', `Data from secret ${id} is not valid UTF-8`);
    }
    if (bytes.includes(0)) throw new FormatError('', `Data from secret ${id} is not valid UTF-8`);
    return bytes;
  }
}

function decodeBase64(bytes: Uint8Array): Uint8Array {
  const text = new TextDecoder().decode(bytes);
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 === 1) throw new FormatError('', 'Base64 data contains invalid characters');
  return new Uint8Array(Buffer.from(text, 'base64'));
}

/** An image named on a command line, resolved: its file, its format if given, and the passwords of its chain. */
export interface ImageArgument {
  path: string;
  format: ImageFormat | undefined;
  /** The password of the encrypted layer at `depth` (0 the image itself). */
  passwords: (depth: number) => Uint8Array | undefined;
  /** The encryption format given for the layer at `depth` (encrypt.format), checked against the image. */
  encryptFormats: (depth: number) => 'luks' | 'aes' | undefined;
  /** What the user typed, for messages. */
  text: string;
  /** format, passwords and encryptFormats together, as openPath and openForWriting take them. */
  open: { format: ImageFormat | undefined; passwords: (depth: number) => Uint8Array | undefined; encryptFormats: (depth: number) => 'luks' | 'aes' | undefined };
}

/** The image argument `text` of a command whose options are SECRET_OPTIONS and -f (`values` as parseArgs gives them). */
export async function imageArgumentOf(text: string, values: { object?: string[] | undefined; 'image-opts'?: boolean | undefined; format?: string | undefined }): Promise<ImageArgument> {
  const secrets = await Secrets.parse(values.object);
  return imageArgument(text, values['image-opts'] === true, secrets, parseFormat(values.format));
}

const FORMATS: readonly string[] = ['qcow2', 'qcow', 'raw'];

/**
 * The image argument `text`: a file name, or with --image-opts an option list. `format` is -f's value; with
 * --image-opts the format is the list's `driver` (qemu-img refuses -f there).
 */
export function imageArgument(text: string, imageOpts: boolean, secrets: Secrets, format?: ImageFormat): ImageArgument {
  if (!imageOpts) return argument(text, text, format, () => undefined, () => undefined);
  if (format !== undefined) throw new FormatError('', '--image-opts and --format/-f are mutually exclusive');
  const options = parseOptionList([text]);
  let driver: string | undefined;
  let path: string | undefined;
  const secretIds = new Map<number, string>();
  const formats = new Map<number, 'luks' | 'aes'>();
  for (const [key, value] of options) {
    if (key === 'driver') driver = value;
    else if (key === 'file.filename') path = value;
    else if (key === 'file.driver') {
      if (value !== 'file') throw new FormatError('', `qcow86 opens local files only (file.driver=${value})`);
    } else {
      const nested = /^((?:backing\.)*)encrypt\.(key-secret|format)$/.exec(key);
      if (!nested) throw new FormatError('', `Could not open '${text}': Block format '${driver ?? 'qcow2'}' does not support the option '${key}'`);
      const depth = nested[1]!.length / 'backing.'.length;
      if (nested[2] === 'key-secret') secretIds.set(depth, value);
      else if (value === 'luks' || value === 'aes') formats.set(depth, value);
      else throw new FormatError('', `Parameter 'encrypt.format' does not accept value '${value}'`);
    }
  }
  if (path === undefined) throw new FormatError('', `Could not open '${text}': A block device must be specified for "file"`);
  if (driver !== undefined && !FORMATS.includes(driver)) throw new FormatError('', `Could not open '${text}': qcow86 reads the drivers qcow2, qcow and raw, not '${driver}'`);
  // Looked up now: a secret that is missing or not text is an error whether or not the image turns out encrypted.
  const passwords = new Map<number, Uint8Array>();
  for (const [depth, id] of secretIds) passwords.set(depth, secrets.password(id));
  return argument(text, path, driver as ImageFormat | undefined, (depth) => passwords.get(depth), (depth) => formats.get(depth));
}

function argument(text: string, path: string, format: ImageFormat | undefined, passwords: ImageArgument['passwords'], encryptFormats: ImageArgument['encryptFormats']): ImageArgument {
  return { path, format, passwords, encryptFormats, text, open: { format, passwords, encryptFormats } };
}

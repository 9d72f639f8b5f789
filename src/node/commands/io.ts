/**
 * `qcow86 io [-f FMT] [-r] -c CMD [-c CMD...] FILE`: a qemu-io work-alike for tests and debugging. Commands:
 * read [-P pattern] [-v] [-q] OFF LEN, write [-P pattern | -z [-u]] [-q] OFF LEN, discard [-q] OFF LEN, flush.
 * Exit code 1 when any command failed or a `read -P` check did not match, like qemu-io.
 */
import { FileStore, nodeResolver } from '../../io/node.js';
import { nodeCodecs } from '../../io/node-codecs.js';
import { openImage, type ImageFormat } from '../../qcow2/open.js';
import { openForWriting } from '../../io/lock.js';
import { nodeCrypto } from '../../io/node-crypto.js';
import { SECRET_USAGE, Secrets, imageArgument } from '../image-spec.js';
import { executeIoCommand, parseIoCommand, writesImage, type IoCommand, type IoDevice, type IoOutput } from '../io-commands.js';

export const USAGE = `usage: qcow86 io [-f raw|qcow2|qcow] [-r] ${SECRET_USAGE} -c COMMAND [-c COMMAND...] FILE
commands: read [-P pattern] [-v] [-q] OFFSET LENGTH
          write [-P pattern | -z [-u]] [-q] OFFSET LENGTH
          discard [-q] OFFSET LENGTH
          flush
sizes take k, M, G, T suffixes (1024-based), as in qemu-io`;

export interface IoArgs {
  format: ImageFormat | undefined;
  readOnly: boolean;
  commands: string[];
  file: string;
  /** --object arguments. */
  objects: string[];
  imageOpts: boolean;
}

/** Parses the command line (qemu-io's spelling: -f/--format, -c/--cmd, -r/--read-only). */
export function parseIoArgs(args: string[]): IoArgs | { error: string } | { help: true } {
  let format: string | undefined;
  let readOnly = false;
  const commands: string[] = [];
  const files: string[] = [];
  const objects: string[] = [];
  let imageOpts = false;
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    // "-fraw", "--format=raw" and "-f raw" all work, as with getopt.
    const takeValue = (): string | undefined => {
      const eq = arg.indexOf('=');
      if (arg.startsWith('--') && eq > 0) return arg.slice(eq + 1);
      if (!arg.startsWith('--') && arg.length > 2) return arg.slice(2);
      return args[++i];
    };
    if (arg === '-h' || arg === '--help') return { help: true };
    else if (arg === '-r' || arg === '--read-only') readOnly = true;
    else if (arg === '--image-opts') imageOpts = true;
    else if (arg === '--object' || arg.startsWith('--object=')) {
      const object = takeValue();
      if (object === undefined) return { error: 'option --object needs a value' };
      objects.push(object);
    }
    else if (arg.startsWith('-f') || arg.startsWith('--format')) format = takeValue();
    else if (arg.startsWith('-c') || arg.startsWith('--cmd')) {
      const command = takeValue();
      if (command === undefined) return { error: `option ${arg} needs a command` };
      commands.push(command);
    } else if (arg.startsWith('-') && arg !== '-') return { error: `unknown option '${arg}'` };
    else files.push(arg);
  }
  if (format !== undefined && format !== 'raw' && format !== 'qcow2' && format !== 'qcow') return { error: `unknown format '${format}' (raw, qcow2, qcow)` };
  if (files.length !== 1) return { error: files.length ? `expected one FILE, got ${files.length}` : 'no FILE given' };
  if (commands.length === 0) return { error: 'no commands given (use -c; there is no interactive mode)' };
  return { format, readOnly, commands, file: files[0]!, objects, imageOpts };
}

/** Runs `qcow86 io` with the given output sink; returns the exit code. */
export async function runIo(args: string[], output: IoOutput): Promise<number> {
  const parsed = parseIoArgs(args);
  if ('help' in parsed) {
    output.out(USAGE);
    return 0;
  }
  if ('error' in parsed) {
    output.err(`qcow86 io: ${parsed.error}\n${USAGE}`);
    return 1;
  }
  // Parse everything first: a typo in the last command should not leave the first ones half-applied.
  const commands: IoCommand[] = [];
  for (const text of parsed.commands) {
    const command = parseIoCommand(text);
    if ('error' in command) {
      output.err(`qcow86 io: ${command.error}`);
      return 1;
    }
    commands.push(command);
  }
  const readOnly = parsed.readOnly || !commands.some(writesImage);
  const image = imageArgument(parsed.file, parsed.imageOpts, await Secrets.parse(parsed.objects), parsed.format);
  const open = image.open;
  const device: IoDevice = readOnly
    ? await openImage(await FileStore.open(image.path, { readOnly }), { ...open, readOnly, resolver: nodeResolver(), codecs: nodeCodecs(), crypto: nodeCrypto() })
    : await openForWriting(image.path, open);
  let ok = true;
  try {
    for (const command of commands) ok = (await executeIoCommand(device, command, output)) && ok;
  } finally {
    await device.close();
  }
  return ok ? 0 : 1;
}

export function run(args: string[]): Promise<number> {
  return runIo(args, { out: (line) => console.log(line), err: (line) => console.error(line) });
}

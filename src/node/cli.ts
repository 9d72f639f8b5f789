/**
 * `qcow86 <command>`: a qemu-img-compatible tool. Each command lives in src/node/commands/<name>.ts and exports
 * `run(args: string[]): Promise<number>` returning qemu-img's exit code for that command.
 */
import { Qcow86Error } from '../qcow2/errors.js';

type Command = { run(args: string[]): Promise<number> };

const COMMANDS: Record<string, () => Promise<Command>> = {
  io: () => import('./commands/io.js'),
  info: () => import('./commands/info.js'),
  map: () => import('./commands/map.js'),
  convert: () => import('./commands/convert.js'),
  compare: () => import('./commands/compare.js'),
  check: () => import('./commands/check.js'),
  create: () => import('./commands/create.js'),
  snapshot: () => import('./commands/snapshot.js'),
  resize: () => import('./commands/resize.js'),
  commit: () => import('./commands/commit.js'),
  rebase: () => import('./commands/rebase.js'),
  measure: () => import('./commands/measure.js'),
  amend: () => import('./commands/amend.js'),
  boot: () => import('./commands/boot.js'),
};

const USAGE = `usage: qcow86 <command> [options]
commands: ${Object.keys(COMMANDS).sort().join(', ')}
Run 'qcow86 <command> --help' for a command's options.`;

/**
 * For the command-line process only (bin/qcow86.js): whatever fails where no caller waits (a timer, a stream)
 * ends the command with one line naming the command, not a stack trace.
 */
export function exitOnStrayErrors(command: string | undefined): void {
  const stray = (error: unknown) => {
    console.error(`qcow86 ${command ?? ''}: ${error instanceof Error ? error.message : String(error)}`.replace('  ', ' '));
    process.exit(1);
  };
  process.on('unhandledRejection', stray);
  process.on('uncaughtException', stray);
}

export async function main(argv: string[]): Promise<number> {
  const [name, ...args] = argv;
  if (!name || name === '--help' || name === '-h') {
    console.log(USAGE);
    return name ? 0 : 1;
  }
  const load = COMMANDS[name];
  if (!load) {
    console.error(`qcow86: unknown command '${name}'\n${USAGE}`);
    return 1;
  }
  try {
    return await (await load()).run(args);
  } catch (error) {
    if (error instanceof Qcow86Error) {
      console.error(`qcow86 ${name}: ${error.message}`);
      return 1;
    }
    // util.parseArgs reports unknown or malformed options with these codes.
    if (typeof (error as { code?: unknown }).code === 'string' && (error as { code: string }).code.startsWith('ERR_PARSE_ARGS')) {
      console.error(`qcow86 ${name}: ${(error as Error).message}`);
      return 1;
    }
    // A system call's failure (ENOSPC writing an output, EIO...): one line with the system's words and path.
    if (typeof (error as NodeJS.ErrnoException).errno === 'number' && typeof (error as NodeJS.ErrnoException).syscall === 'string') {
      console.error(`qcow86 ${name}: ${(error as Error).message}`);
      return 1;
    }
    throw error;
  }
}

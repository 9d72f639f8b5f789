/**
 * `qcow86 boot`: boots the PC headless on a qcow2 overlay, streams the serial console to stdout and runs an
 * expect/send script. Exit 0 when the last step completed and the disk was flushed; 1 on a timeout or error
 * (with the step and the console's last lines on stderr); 2 for bad usage.
 */
import { createWriteStream, type WriteStream } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { bootMachine, POWERED_OFF, StepError, type Machine } from '../../v86/machine.js';
import { loadMachineAssets, readFileBuffer, DEFAULT_IMAGES_DIR } from '../machine-assets.js';
import { openBootDisk } from '../boot-disk.js';
import { prepareBootSession } from '../boot-session.js';

export const USAGE = `usage: qcow86 boot [--base FILE|URL] [--overlay FILE] [--memory 128M] [--cmdline TEXT [--kernel FILE] [--initrd FILE]]
                   [--expect TEXT | --send TEXT]... [--script FILE] [--timeout S] [--serial-log FILE] [--quiet]
                   [--force-base-change]
  --base      base image (default public/images/base.qcow2); an http(s) URL is read with Range requests, and a
              new overlay records the base's version (ETag, or Last-Modified + size)
  --force-base-change  open an existing overlay even though its base changed since the overlay was made (its
              blocks may then no longer fit the base)
  --overlay   qcow2 overlay for the guest's writes: opened on its own backing file when it exists, created on
              the base when it does not; without it the writes go to a throw-away overlay in memory
  --cmdline   boot the kernel directly (default guest's vmlinuz/initrd.gz) with this command line
  --expect    wait for TEXT on the serial console (terminal escape sequences are ignored)
  --send      type TEXT exactly as given (the caller supplies the newline, e.g. $'ls\\n')
  --script    more steps from FILE, one per line: 'expect TEXT' or 'send TEXT' (\\n \\t \\\\ \\e escapes; # comments)
  --timeout   seconds each expect step may wait (default 300)
  --resume NAME        restore session NAME from --overlay first and run the steps from there (the disk goes
                       back to that session: later disk changes are discarded)
  --save-on-exit NAME  after the last step, save the running guest into the overlay as session NAME (replaces one
                       of that name) and exit
Steps run in the order given. Without steps the guest runs until it powers off or Ctrl+C.`;

type Step = { kind: 'expect' | 'send'; text: string; origin: string };

interface BootArgs {
  base?: string;
  overlay?: string;
  memoryBytes: number;
  cmdline?: string;
  kernel?: string;
  initrd?: string;
  steps: Step[];
  timeoutMs: number;
  serialLog?: string;
  quiet: boolean;
  forceBaseChange: boolean;
  resume?: string;
  saveOnExit?: string;
}

class UsageError extends Error {}

export function parseSize(text: string): number {
  const match = /^(\d+)([KMG]?)i?B?$/i.exec(text.trim());
  if (!match) throw new UsageError(`bad size '${text}' (e.g. 128M)`);
  const unit = { '': 1024 * 1024, K: 1024, M: 1024 * 1024, G: 1024 * 1024 * 1024 }[match[2]!.toUpperCase() as '' | 'K' | 'M' | 'G'];
  return Number(match[1]) * unit;
}

/** Script-file escapes, so a step can end with a newline or carry an escape character. */
function unescapeScript(text: string): string {
  return text.replace(/\\(n|t|r|e|\\)/g, (_, c: string) => ({ n: '\n', t: '\t', r: '\r', e: '\x1b', '\\': '\\' })[c]!);
}

async function parseScript(path: string): Promise<Step[]> {
  const steps: Step[] = [];
  const lines = (await readFile(path, 'utf8')).split('\n');
  lines.forEach((line, index) => {
    if (/^\s*(#|$)/.test(line)) return;
    const match = /^\s*(expect|send)(?: (.*))?$/.exec(line);
    if (!match) throw new UsageError(`${path}:${index + 1}: expected 'expect TEXT' or 'send TEXT', got '${line}'`);
    steps.push({ kind: match[1] as 'expect' | 'send', text: unescapeScript(match[2] ?? ''), origin: `${path}:${index + 1}` });
  });
  return steps;
}

async function parseArgs(args: string[]): Promise<BootArgs | 'help'> {
  const out: BootArgs = { memoryBytes: 128 * 1024 * 1024, steps: [], timeoutMs: 300_000, quiet: false, forceBaseChange: false };
  for (let i = 0; i < args.length; i++) {
    const flag = args[i]!;
    if (flag === '--help' || flag === '-h') return 'help';
    if (flag === '--quiet') {
      out.quiet = true;
      continue;
    }
    if (flag === '--force-base-change') {
      out.forceBaseChange = true;
      continue;
    }
    const value = args[++i];
    if (value === undefined) throw new UsageError(`${flag} needs a value`);
    switch (flag) {
      case '--base': out.base = value; break;
      case '--overlay': out.overlay = value; break;
      case '--memory': out.memoryBytes = parseSize(value); break;
      case '--cmdline': out.cmdline = value; break;
      case '--kernel': out.kernel = value; break;
      case '--initrd': out.initrd = value; break;
      case '--expect': out.steps.push({ kind: 'expect', text: value, origin: `argument ${i}` }); break;
      case '--send': out.steps.push({ kind: 'send', text: value, origin: `argument ${i}` }); break;
      case '--script': out.steps.push(...await parseScript(value)); break;
      case '--timeout': {
        const seconds = Number(value);
        if (!(seconds > 0)) throw new UsageError(`bad --timeout '${value}'`);
        out.timeoutMs = seconds * 1000;
        break;
      }
      case '--serial-log': out.serialLog = value; break;
      case '--resume': out.resume = value; break;
      case '--save-on-exit': out.saveOnExit = value; break;
      default: throw new UsageError(`unknown option '${flag}'`);
    }
  }
  return out;
}

/** Serial output arrives a byte at a time: batch it into one write per event-loop turn. */
function batchedWriter(sinks: Array<(text: string) => void>): (text: string) => void {
  let pending = '';
  return (text) => {
    if (pending === '') setImmediate(() => {
      const chunk = pending;
      pending = '';
      for (const sink of sinks) sink(chunk);
    });
    pending += text;
  };
}

export async function run(args: string[]): Promise<number> {
  let parsed: BootArgs | 'help';
  try {
    parsed = await parseArgs(args);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`qcow86 boot: ${error.message}\n${USAGE}`);
    return 2;
  }
  if (parsed === 'help') {
    console.log(USAGE);
    return 0;
  }
  const options = parsed;
  const log: WriteStream | undefined = options.serialLog ? createWriteStream(options.serialLog) : undefined;
  const sinks: Array<(text: string) => void> = [];
  if (!options.quiet) sinks.push((text) => process.stdout.write(text));
  if (log) sinks.push((text) => log.write(text));

  const disk = await openBootDisk({ base: options.base, overlay: options.overlay, forceBaseChange: options.forceBaseChange });
  console.error(`qcow86 boot: ${disk.description}`);
  const session = await prepareBootSession(options, disk.device, options.overlay);
  const assets = await loadMachineAssets();
  const direct = options.cmdline !== undefined
    ? {
      bzimage: await readFileBuffer(options.kernel ?? join(DEFAULT_IMAGES_DIR, 'vmlinuz')),
      initrd: await readFileBuffer(options.initrd ?? join(DEFAULT_IMAGES_DIR, 'initrd.gz')),
      cmdline: options.cmdline,
      // v86 places the initrd at 64 MiB: make sure it fits above that.
    }
    : {};
  const started = Date.now();
  const machine: Machine = bootMachine({ disk: disk.device, ...assets, memoryBytes: session.memoryBytes ?? options.memoryBytes, timeoutMs: options.timeoutMs, onSerial: batchedWriter(sinks), ...direct });

  let interrupted = false;
  const onSignal = () => {
    interrupted = true;
    console.error('\nqcow86 boot: interrupted, flushing the disk');
    void machine.close().finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  let code = 0;
  try {
    await session.started(machine);
    if (options.steps.length === 0) {
      await machine.expect(POWERED_OFF, { timeoutMs: 2 ** 31 - 1 });
    }
    for (const step of options.steps) {
      if (step.kind === 'expect') await machine.expect(step.text);
      else await machine.send(step.text);
    }
    await session.finished(machine);
  } catch (error) {
    if (!(error instanceof StepError)) throw error;
    const step = options.steps[Number(/step (\d+)/.exec(error.step)?.[1] ?? 0) - 1];
    console.error(`\nqcow86 boot: ${error.step}${step ? ` from ${step.origin}` : ''} ${error.message.slice(error.step.length + 2)}`);
    code = 1;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    if (!interrupted) await machine.close();
    await new Promise<void>((done) => (log ? log.end(done) : done()));
  }
  const s = machine.disk.stats;
  if (disk.http) {
    const h = disk.http.stats();
    console.error(`qcow86 boot: base over HTTP: ${h.requests} requests, ${(h.bytesFetched / 1048576).toFixed(2)} MiB fetched, ${h.retries} retries, ${(h.hitRate * 100).toFixed(0)}% of reads from the cache`);
  }
  console.error(`\nqcow86 boot: ${code === 0 ? 'done' : 'failed'} after ${((Date.now() - started) / 1000).toFixed(1)} s; disk: ${s.reads} reads (${(s.readBytes / 1048576).toFixed(1)} MiB), ${s.writes} writes (${(s.writeBytes / 1048576).toFixed(1)} MiB), ${s.cacheHits} cache hits, ${s.deviceFlushes} flushes, ${(s.storeWaitMs / 1000).toFixed(2)} s waiting on the store`);
  return code;
}

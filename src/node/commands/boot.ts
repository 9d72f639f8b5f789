/**
 * `qcow86 boot`: boots the PC headless on a qcow2 overlay (through `bootMachine`, the `qcow86/machine` library),
 * streams the serial console to stdout and runs a script of serial and screen steps. Exit 0 when the last step
 * completed and the disk was flushed; 1 on a timeout or error (with the step and the console's and screen's last
 * lines on stderr); 2 for bad usage.
 */
import { createWriteStream, type WriteStream } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { KeysError, parseKeys } from '../../v86/keyboard.js';
import { POWERED_OFF, StepError } from '../../v86/machine.js';
import { bootMachine, guestMemoryBytes, type BootedMachine } from '../machine.js';
import { isDiskBus, type DiskBus } from '../../v86/disk-bus.js';
import { Secrets } from '../image-spec.js';

export const USAGE = `usage: qcow86 boot [--base FILE|URL] [--overlay FILE] [--memory 128M] [--cmdline TEXT [--kernel FILE] [--initrd FILE]]
                   [--expect TEXT | --send TEXT | --expect-screen TEXT | --send-keys TEXT]... [--script FILE]
                   [--screenshot FILE] [--timeout S] [--serial-log FILE] [--quiet] [--force-base-change] [--trust-image]
                   [--disk-bus ide|virtio] [--object secret,id=ID,... --key-secret ID]
  --base      base image (default public/images/base.qcow2); an http(s) URL is read with Range requests, and a
              new overlay records the base's version (ETag, or Last-Modified + size)
  --force-base-change  open an existing overlay even though its base changed since the overlay was made (its
              blocks may then no longer fit the base)
  --trust-image  open every file the images name (backing files, data files) wherever it is; by default only
              backing files inside the overlay's directory, the --base given, the default guest's base and http(s)
              URLs that are not link-local, and data files inside the overlay's directory, are opened
  --overlay   qcow2 overlay for the guest's writes: opened on its own backing file when it exists, created on
              the base when it does not; without it the writes go to a throw-away overlay in memory
  --disk-bus  how the disk is attached: virtio (virtio-blk, the default: faster, knows discard) or ide; a
              resumed session uses the bus it was saved on (sessions from before buses were recorded: ide)
  --cmdline   boot the kernel directly (default guest's vmlinuz/initrd.gz) with this command line
  --expect    wait for TEXT on the serial console (terminal escape sequences are ignored)
  --send      type TEXT on the serial console exactly as given (the caller supplies the newline, e.g. $'ls\\n')
  --expect-screen  wait until TEXT is on the VGA text screen (anywhere on it, rows joined by newlines; text
              drawn before the step counts)
  --send-keys type TEXT on the PS/2 keyboard: \\n is Enter; <Enter> <Esc> <Tab> <Backspace> <Up> <Down> <Left>
              <Right> <Home> <End> <PgUp> <PgDn> <Insert> <Delete> <F1>..<F12>; <Ctrl-X>, <Alt-F2>, <Shift-Tab>
              hold modifiers; << is a literal <
  --screenshot  when the run ends (success, failure or timeout) write the screen to FILE as a PNG
  --script    more steps from FILE, one per line: 'expect TEXT', 'send TEXT', 'expect-screen TEXT',
              'send-keys TEXT' or 'screenshot FILE' (\\n \\t \\\\ \\e escapes; # comments)
  --timeout   seconds each expect step may wait (default 300)
  --resume NAME        restore session NAME from --overlay first and run the steps from there (the disk goes
                       back to that session: later disk changes are discarded)
  --save-on-exit NAME  after the last step, save the running guest into the overlay as session NAME (replaces one
                       of that name) and exit
  --object secret,id=ID,data=TEXT|file=PATH[,format=base64]  a secret, as qemu-img takes it
  --key-secret ID      unlock the encrypted images of the chain with secret ID; a new --overlay is created
                       encrypted with it (LUKS, QEMU's defaults)
Steps run in the order given. Without steps the guest runs until it powers off or Ctrl+C.`;

type StepKind = 'expect' | 'send' | 'expect-screen' | 'send-keys' | 'screenshot';
type Step = { kind: StepKind; text: string; origin: string };

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
  screenshot?: string;
  quiet: boolean;
  forceBaseChange: boolean;
  trustImage: boolean;
  resume?: string;
  saveOnExit?: string;
  diskBus?: DiskBus;
  objects: string[];
  keySecret?: string;
}

class UsageError extends Error {}

export function parseMemory(text: string): number {
  try {
    return guestMemoryBytes(text);
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

/** Script-file escapes, so a step can end with a newline or carry an escape character. */
function unescapeScript(text: string): string {
  return text.replace(/\\(n|t|r|e|\\)/g, (_, c: string) => ({ n: '\n', t: '\t', r: '\r', e: '\x1b', '\\': '\\' })[c]!);
}

/** Keys are checked while parsing, so a typo is a usage error before anything boots. */
function checkKeys(text: string, origin: string): void {
  try {
    parseKeys(text);
  } catch (error) {
    if (error instanceof KeysError) throw new UsageError(`${origin}: send-keys: ${error.message}`);
    throw error;
  }
}

async function parseScript(path: string): Promise<Step[]> {
  const steps: Step[] = [];
  const lines = (await readFile(path, 'utf8')).split('\n');
  lines.forEach((line, index) => {
    if (/^\s*(#|$)/.test(line)) return;
    const origin = `${path}:${index + 1}`;
    const match = /^\s*(expect-screen|send-keys|screenshot|expect|send)(?: (.*))?$/.exec(line);
    if (!match) throw new UsageError(`${origin}: expected 'expect TEXT', 'send TEXT', 'expect-screen TEXT', 'send-keys TEXT' or 'screenshot FILE', got '${line}'`);
    const kind = match[1] as StepKind;
    const raw = match[2] ?? '';
    if (kind === 'screenshot' && raw.trim() === '') throw new UsageError(`${origin}: screenshot needs a file name`);
    // send-keys reads its own escapes (\n is Enter, \\ a backslash): unescaping here too would read them twice.
    const text = kind === 'send-keys' ? raw : kind === 'screenshot' ? raw.trim() : unescapeScript(raw);
    if (kind === 'send-keys') checkKeys(text, origin);
    steps.push({ kind, text, origin });
  });
  return steps;
}

async function parseArgs(args: string[]): Promise<BootArgs | 'help'> {
  const out: BootArgs = { memoryBytes: 128 * 1024 * 1024, steps: [], timeoutMs: 300_000, quiet: false, forceBaseChange: false, trustImage: false, objects: [] };
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
    if (flag === '--trust-image') {
      out.trustImage = true;
      continue;
    }
    const value = args[++i];
    if (value === undefined) throw new UsageError(`${flag} needs a value`);
    const origin = `argument ${i}`;
    switch (flag) {
      case '--base': out.base = value; break;
      case '--overlay': out.overlay = value; break;
      case '--memory': out.memoryBytes = parseMemory(value); break;
      case '--cmdline': out.cmdline = value; break;
      case '--kernel': out.kernel = value; break;
      case '--initrd': out.initrd = value; break;
      case '--expect': out.steps.push({ kind: 'expect', text: value, origin }); break;
      case '--send': out.steps.push({ kind: 'send', text: value, origin }); break;
      case '--expect-screen': out.steps.push({ kind: 'expect-screen', text: value, origin }); break;
      case '--send-keys':
        checkKeys(value, origin);
        out.steps.push({ kind: 'send-keys', text: value, origin });
        break;
      case '--screenshot': out.screenshot = value; break;
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
      case '--disk-bus':
        if (!isDiskBus(value)) throw new UsageError(`bad --disk-bus '${value}' (ide or virtio)`);
        out.diskBus = value;
        break;
      case '--object': out.objects.push(value); break;
      case '--key-secret': out.keySecret = value; break;
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

async function runStep(machine: BootedMachine, step: Step): Promise<void> {
  switch (step.kind) {
    case 'expect': await machine.expect(step.text); return;
    case 'send': await machine.send(step.text); return;
    case 'expect-screen': await machine.expect(step.text, { on: 'screen' }); return;
    case 'send-keys': await machine.sendKeys(step.text); return;
    case 'screenshot': await writeScreenshot(machine, step.text); return;
  }
}

async function writeScreenshot(machine: BootedMachine, file: string): Promise<void> {
  const png = machine.screenshot();
  await writeFile(file, png);
  console.error(`qcow86 boot: screenshot ${file} (${describeScreen(machine)}, ${png.length} bytes)`);
}

function describeScreen(machine: BootedMachine): string {
  const mode = machine.screen.mode;
  return mode.graphical ? `${mode.width}x${mode.height} graphics` : `${mode.cols}x${mode.rows} text`;
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
  if (options.saveOnExit !== undefined && options.overlay === undefined) {
    console.error('qcow86 boot: note: --save-on-exit without --overlay saves into a throw-away overlay in memory');
  }

  const started = Date.now();
  const machine = await bootMachine({
    base: options.base,
    overlay: options.overlay,
    memory: options.memoryBytes,
    resume: options.resume,
    timeout: options.timeoutMs,
    ...(options.diskBus ? { diskBus: options.diskBus } : {}),
    onSerial: batchedWriter(sinks),
    forceBaseChange: options.forceBaseChange,
    trustImage: options.trustImage,
    ...(options.keySecret !== undefined ? { password: (await Secrets.parse(options.objects)).password(options.keySecret) } : {}),
    ...(options.cmdline !== undefined ? { cmdline: options.cmdline, kernel: options.kernel, initrd: options.initrd } : {}),
  });
  console.error(`qcow86 boot: ${machine.description}`);
  if (machine.resumed) {
    const info = machine.resumed;
    const image = machine.disk.device as { snapshots?: Array<{ name: string; dateSec: number }> };
    const newer = (image.snapshots ?? []).filter((s) => s.dateSec > info.date.getTime() / 1000).map((s) => s.name);
    console.error(`qcow86 boot: resumed session '${info.name}' (disk on ${machine.diskBus}) of ${info.date.toISOString()} (disk changes made after it were discarded${newer.length ? `; newer sessions kept: ${newer.join(', ')}` : ''})`);
  }

  let interrupted = false;
  const onSignal = () => {
    interrupted = true;
    console.error('\nqcow86 boot: interrupted, flushing the disk');
    void (async () => {
      if (options.screenshot) await writeScreenshot(machine, options.screenshot).catch(() => {});
      await machine.close().catch((error: unknown) => console.error(`qcow86 boot: ${describeFailure(error)}`));
    })().finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  let code = 0;
  let current: Step | undefined;
  try {
    if (options.steps.length === 0) {
      await machine.expect(POWERED_OFF, { timeout: 2 ** 31 - 1 });
    }
    for (const step of options.steps) {
      current = step;
      await runStep(machine, step);
    }
    current = undefined;
    if (options.saveOnExit !== undefined) {
      const result = await machine.saveSession(options.saveOnExit);
      const mib = (bytes: number): string => `${(bytes / 1048576).toFixed(1)} MiB`;
      console.error(`\nqcow86 boot: saved session '${result.name}': VM state ${mib(result.rawBytes)} raw, ${mib(result.vmStateSize)} stored (${result.format}), guest paused ${(result.pausedMs / 1000).toFixed(1)} s`);
    }
  } catch (error) {
    if (machine.diskFailure) {
      // One line: what failed, not the console (the guest was stopped in the middle of an I/O).
      console.error(`\nqcow86 boot: ${describeFailure(machine.diskFailure.failure)}`);
      code = 1;
    } else {
      if (!(error instanceof StepError)) throw error;
      console.error(`\nqcow86 boot: ${error.step}${current ? ` from ${current.origin}` : ''} ${error.message.slice(error.step.length + 2)}`);
      code = 1;
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    if (!interrupted) {
      if (options.screenshot) await writeScreenshot(machine, options.screenshot).catch((error: unknown) => console.error(`qcow86 boot: cannot write screenshot ${options.screenshot}: ${(error as Error).message}`));
      // The final flush can fail too (a disk that filled up after the last step): said once, in one line.
      await machine.close().catch((error: unknown) => {
        if (code === 0 || !machine.diskFailure) console.error(`qcow86 boot: ${describeFailure(error)}`);
        code = 1;
      });
    }
    await new Promise<void>((done) => (log ? log.end(done) : done()));
  }
  const s = machine.disk.stats;
  if (machine.http) {
    const h = machine.http.stats();
    console.error(`qcow86 boot: base over HTTP: ${h.requests} requests, ${(h.bytesFetched / 1048576).toFixed(2)} MiB fetched, ${h.retries} retries, ${(h.hitRate * 100).toFixed(0)}% of reads from the cache`);
  }
  console.error(`\nqcow86 boot: ${code === 0 ? 'done' : 'failed'} after ${((Date.now() - started) / 1000).toFixed(1)} s; disk: ${s.reads} reads (${(s.readBytes / 1048576).toFixed(1)} MiB), ${s.writes} writes (${(s.writeBytes / 1048576).toFixed(1)} MiB), ${s.cacheHits} cache hits, ${s.deviceFlushes} flushes, ${(s.storeWaitMs / 1000).toFixed(2)} s waiting on the store`);
  return code;
}

/** A device error in a line a person reads: the disk, what failed and why ("no space left on device"). */
function describeFailure(error: unknown): string {
  return `the disk failed: ${(error instanceof Error ? error.message : String(error)).split('\n')[0]}`;
}

/**
 * A small qemu-io work-alike: parsing of qemu-io's command strings (pure) and their execution against a
 * BlockDevice. Output lines follow qemu-io 7.2 so scripts and tests can compare the two tools line by line.
 */
import type { BlockDevice } from '../qcow2/device.js';

/** What the qcow2 engine offers beyond BlockDevice; without these, zero writes and discards write zeros. */
export interface IoDevice extends BlockDevice {
  writeZeroes?(offset: number, length: number, options: { unmap: boolean }): Promise<void>;
  discard?(offset: number, length: number): Promise<void>;
}

export type IoCommand =
  | { op: 'read'; offset: number; length: number; pattern: number | undefined; verbose: boolean; quiet: boolean }
  | { op: 'write'; offset: number; length: number; pattern: number; zero: boolean; unmap: boolean; quiet: boolean }
  | { op: 'discard'; offset: number; length: number; quiet: boolean }
  | { op: 'flush' };

/** qemu-io's default write pattern. */
export const DEFAULT_WRITE_PATTERN = 0xcd;

const SUFFIXES: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

/**
 * A size or offset as qemu-io reads it: decimal (fractions allowed with a suffix, "1.5k"), or hexadecimal
 * "0x..", with an optional binary suffix k/M/G/T/P/E (either case). Returns undefined when it is not one.
 */
export function parseSize(text: string): number | undefined {
  const match = /^(0x[0-9a-f]+|\d+(?:\.\d+)?)([bkmgtpe]?)$/i.exec(text);
  if (!match) return undefined;
  const [, number, suffix] = match;
  const base = number!.toLowerCase().startsWith('0x') ? parseInt(number!, 16) : Number(number);
  const value = Math.floor(base * SUFFIXES[suffix!.toLowerCase()]!);
  return Number.isSafeInteger(value) ? value : undefined;
}

/** A pattern byte as qemu-io reads it (C strtol with base 0: decimal, 0x hex, leading-0 octal), 0..255. */
export function parsePattern(text: string): number | undefined {
  let value: number;
  if (/^0x[0-9a-f]+$/i.test(text)) value = parseInt(text, 16);
  else if (/^0[0-7]*$/.test(text)) value = parseInt(text, 8);
  else if (/^[1-9]\d*$/.test(text)) value = parseInt(text, 10);
  else return undefined;
  return value <= 255 ? value : undefined;
}

const ALIASES: Record<string, string> = { r: 'read', w: 'write', d: 'discard', f: 'flush' };

/** Parses one -c string. Errors come back as the message qemu-io would print. */
export function parseIoCommand(text: string): IoCommand | { error: string } {
  const words = text.trim().split(/\s+/).filter(Boolean);
  const name = ALIASES[words[0] ?? ''] ?? words[0] ?? '';
  const flags = new Map<string, string | true>();
  const positional: string[] = [];
  const withValue = new Set(name === 'read' || name === 'write' ? ['P'] : []);
  const allowed = name === 'read' ? 'Pvq' : name === 'write' ? 'Pzuq' : name === 'discard' ? 'q' : '';
  if (!['read', 'write', 'discard', 'flush'].includes(name)) return { error: `command "${words[0] ?? ''}" not found` };
  for (let i = 1; i < words.length; i++) {
    const word = words[i]!;
    if (word.startsWith('-') && word.length > 1 && positional.length === 0) {
      for (let j = 1; j < word.length; j++) {
        const flag = word[j]!;
        if (!allowed.includes(flag)) return { error: `${name}: invalid option -- '${flag}'` };
        if (withValue.has(flag)) {
          const value = word.slice(j + 1) || words[++i];
          if (value === undefined) return { error: `${name}: option requires an argument -- '${flag}'` };
          flags.set(flag, value);
          break;
        }
        flags.set(flag, true);
      }
    } else {
      positional.push(word);
    }
  }
  if (name === 'flush') return positional.length ? { error: 'bad argument count 1 to flush, expected 0 arguments' } : { op: 'flush' };
  if (positional.length !== 2) return { error: `bad argument count ${positional.length} to ${name}, expected 2 arguments` };
  const offset = parseSize(positional[0]!);
  if (offset === undefined) return { error: `non-numeric offset argument -- ${positional[0]}` };
  const length = parseSize(positional[1]!);
  if (length === undefined) return { error: `non-numeric length argument -- ${positional[1]}` };
  const quiet = flags.has('q');
  let pattern: number | undefined;
  if (flags.has('P')) {
    const text = flags.get('P') as string;
    pattern = parsePattern(text);
    if (pattern === undefined) return { error: `${text} is not a valid pattern byte` };
  }
  if (name === 'read') return { op: 'read', offset, length, pattern, verbose: flags.has('v'), quiet };
  if (name === 'discard') return { op: 'discard', offset, length, quiet };
  const zero = flags.has('z');
  if (zero && pattern !== undefined) return { error: '-z and -P cannot be specified at the same time' };
  if (flags.has('u') && !zero) return { error: '-u requires -z to be specified' };
  return { op: 'write', offset, length, pattern: pattern ?? DEFAULT_WRITE_PATTERN, zero, unmap: flags.has('u'), quiet };
}

/** True when running the command can change the image (the CLI opens read-only otherwise). */
export function writesImage(command: IoCommand): boolean {
  return command.op === 'write' || command.op === 'discard';
}

// ---- output in qemu-io's format --------------------------------------------------------------------------------

/** qemu-io's cvtstr: binary units, three decimals, ".000" dropped; plain bytes keep %f's six decimals. */
export function formatSize(value: number): string {
  const units: Array<[number, string]> = [
    [2 ** 60, 'EiB'],
    [2 ** 50, 'PiB'],
    [2 ** 40, 'TiB'],
    [2 ** 30, 'GiB'],
    [2 ** 20, 'MiB'],
    [2 ** 10, 'KiB'],
  ];
  for (const [unit, name] of units) {
    if (value >= unit) return `${(value / unit).toFixed(3).replace(/\.000$/, '')} ${name}`;
  }
  return `${value.toFixed(6).replace(/\.000000$/, '')} bytes`;
}

/** The statistics line qemu-io prints after each operation. */
export function formatStats(bytes: number, seconds: number): string {
  const t = Math.max(seconds, 1e-6);
  const whole = Math.floor(seconds);
  const hundredths = Math.floor((seconds - whole) * 100);
  const time = `${String(whole).padStart(2, '0')}.${String(hundredths).padStart(2, '0')} sec`;
  return `${formatSize(bytes)}, 1 ops; ${time} (${formatSize(bytes / t)}/sec and ${(1 / t).toFixed(4)} ops/sec)`;
}

/** qemu-io's `read -v` dump: 16 bytes a line, letters and digits shown, everything else a dot. */
export function hexDump(data: Uint8Array, offset: number): string[] {
  const lines: string[] = [];
  for (let i = 0; i < data.length; i += 16) {
    const row = data.subarray(i, i + 16);
    const hex = Array.from(row, (b) => `${b.toString(16).padStart(2, '0')} `).join('');
    const text = Array.from(row, (b) => (/[0-9A-Za-z]/.test(String.fromCharCode(b)) ? String.fromCharCode(b) : '.')).join('');
    lines.push(`${(offset + i).toString(16).padStart(8, '0')}:  ${hex} ${text}`);
  }
  return lines;
}

// ---- execution -------------------------------------------------------------------------------------------------

/** Large requests go through in pieces so `write -P x 0 10G` does not allocate 10 GiB. */
const CHUNK = 1024 * 1024;

export interface IoOutput {
  out(line: string): void;
  err(line: string): void;
}

/**
 * Runs one command. Returns false when it failed (an error, or a `read -P` mismatch): qemu-io goes on with the
 * next command and exits 1 at the end, and so does the CLI.
 */
export async function executeIoCommand(device: IoDevice, command: IoCommand, output: IoOutput, now: () => number = () => performance.now()): Promise<boolean> {
  const started = now();
  try {
    switch (command.op) {
      case 'flush':
        await device.flush();
        return true;
      case 'read':
        return await executeRead(device, command, output, started, now);
      case 'write':
        checkRequest(device, command.offset, command.length);
        if (command.zero && device.writeZeroes) await device.writeZeroes(command.offset, command.length, { unmap: command.unmap });
        else await writePattern(device, command.offset, command.length, command.zero ? 0 : command.pattern);
        summary(output, command, 'wrote', started, now);
        return true;
      case 'discard':
        checkRequest(device, command.offset, command.length);
        if (device.discard) await device.discard(command.offset, command.length);
        else await writePattern(device, command.offset, command.length, 0);
        summary(output, command, 'discard', started, now);
        return true;
    }
  } catch (error) {
    output.out(`${command.op} failed: ${(error as Error).message}`);
    return false;
  }
}

function summary(output: IoOutput, command: { offset: number; length: number; quiet: boolean }, verb: string, started: number, now: () => number): void {
  if (command.quiet) return;
  output.out(`${verb} ${command.length}/${command.length} bytes at offset ${command.offset}`);
  output.out(formatStats(command.length, (now() - started) / 1000));
}

/** A request past the end fails before any of it is done (qemu-io reports EIO the same way). */
function checkRequest(device: IoDevice, offset: number, length: number): void {
  if (offset + length > device.virtualSize) {
    throw new Error(`Input/output error (${offset}+${length} is past the end of the ${device.virtualSize}-byte disk)`);
  }
}

async function writePattern(device: IoDevice, offset: number, length: number, pattern: number): Promise<void> {
  checkRequest(device, offset, length);
  const buffer = new Uint8Array(Math.min(length, CHUNK)).fill(pattern);
  for (let done = 0; done < length; done += CHUNK) {
    const n = Math.min(CHUNK, length - done);
    await device.write(offset + done, n === buffer.length ? buffer : buffer.subarray(0, n));
  }
}

async function executeRead(
  device: IoDevice,
  command: Extract<IoCommand, { op: 'read' }>,
  output: IoOutput,
  started: number,
  now: () => number,
): Promise<boolean> {
  checkRequest(device, command.offset, command.length);
  let mismatch: number | undefined;
  let found = 0;
  const dump: string[] = [];
  for (let done = 0; done < command.length || (done === 0 && command.length === 0); done += CHUNK) {
    const n = Math.min(CHUNK, command.length - done);
    const data = await device.read(command.offset + done, n);
    if (command.pattern !== undefined && mismatch === undefined) {
      const i = data.findIndex((b) => b !== command.pattern);
      if (i >= 0) {
        mismatch = command.offset + done + i;
        found = data[i]!;
      }
    }
    if (command.verbose) dump.push(...hexDump(data, command.offset + done));
    if (n === 0) break;
  }
  if (mismatch !== undefined) {
    // qemu-io names the request, not the byte; the first differing byte goes to stderr for people.
    output.out(`Pattern verification failed at offset ${command.offset}, ${command.length} bytes`);
    output.err(`first mismatch at offset ${mismatch}: expected 0x${command.pattern!.toString(16)}, found 0x${found.toString(16)}`);
  }
  for (const line of dump) output.out(line);
  summary(output, command, 'read', started, now);
  return mismatch === undefined;
}

/**
 * The QEMU oracle for tests: make images with qemu-img/qemu-io, ask qemu-img what it sees, and compare.
 * Everything runs the real tools; fixtures are generated per test run in temporary directories.
 */
import { execFile, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, rmSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { tempDir } from './temp.js';

// qemu-utils is the oracle for every image test: install it (as root, on CI) before anything runs.
const root = resolve(import.meta.dirname, '../..');
execFileSync(process.execPath, [join(root, 'scripts/system-deps.mjs'), 'qemu-utils'], { stdio: 'inherit' });

export { cleanupTempDirs, tempDir } from './temp.js';

export interface RunResult {
  stdout: string;
  stderr: string;
  exitCode: number;
}

/** Runs a program, never throwing for a non-zero exit: the caller decides what an exit code means. */
export function run(program: string, args: string[], options: { cwd?: string } = {}): Promise<RunResult> {
  return new Promise((resolvePromise, reject) => {
    execFile(program, args, { cwd: options.cwd, maxBuffer: 256 * 1024 * 1024, encoding: 'utf8' }, (error, stdout, stderr) => {
      if (error && typeof error.code !== 'number') return reject(error);
      resolvePromise({ stdout, stderr, exitCode: error ? (error.code as number) : 0 });
    });
  });
}

async function runOrThrow(program: string, args: string[], options: { cwd?: string } = {}): Promise<string> {
  const result = await run(program, args, options);
  if (result.exitCode !== 0) {
    throw new Error(`${program} ${args.join(' ')} exited with ${result.exitCode}:\n${result.stderr}${result.stdout}`);
  }
  return result.stdout;
}

/**
 * QEMU calibrates LUKS key-slot iterations by timing PBKDF2 in CPU time; on a busy machine its first batch can
 * measure 0 ms and `qemu-img create`/`convert`/`amend` then exits 1 with exactly this message. It says nothing
 * about the image, so the oracle tries again.
 */
const LUKS_CALIBRATION_FAILURE = 'Unable to get accurate CPU usage';
// A failed calibration costs milliseconds (it stops at its first batch). With a fast hash (sha1) the first batch
// can take under a clock tick: 8 of 20 creations failed on a busy machine, and 8 tries in a row once did too.
const LUKS_CALIBRATION_TRIES = 32;

/** Runs qemu-img, retrying only where QEMU's LUKS key-slot calibration failed (see above). */
export async function runQemuImg(args: string[], options: { cwd?: string } = {}): Promise<RunResult> {
  for (let attempt = 1; ; attempt++) {
    const result = await run('qemu-img', args, options);
    if (result.exitCode === 0 || !result.stderr.includes(LUKS_CALIBRATION_FAILURE) || attempt === LUKS_CALIBRATION_TRIES) return result;
  }
}

/** qemu-img with these arguments; returns stdout, throws with stderr on a non-zero exit. */
export async function qemuImg(args: string[], options: { cwd?: string } = {}): Promise<string> {
  const result = await runQemuImg(args, options);
  if (result.exitCode !== 0) {
    throw new Error(`qemu-img ${args.join(' ')} exited with ${result.exitCode}:\n${result.stderr}${result.stdout}`);
  }
  return result.stdout;
}

/** qemu-io with these arguments; returns stdout, throws with stderr on a non-zero exit. */
export function qemuIo(args: string[], options: { cwd?: string } = {}): Promise<string> {
  return runOrThrow('qemu-io', args, options);
}

export type ImageWrite =
  /** `write -P pattern offset length` (with `compressed`, `write -c`: whole clusters only). */
  | { offset: number; length: number; pattern: number; compressed?: boolean }
  /** `write -z` (with `unmap`, `write -z -u`). */
  | { offset: number; length: number; zero: true; unmap?: boolean }
  | { offset: number; length: number; discard: true };

export interface ImageOptions {
  /**
   * Where to create the image; default: a new temporary directory, file `image.<format>`. Relative `backing`
   * and `dataFile` names are relative to the image's directory, as QEMU resolves them.
   */
  path?: string;
  format?: 'qcow2' | 'qcow' | 'raw';
  /** Bytes, or a qemu-img size string such as '64M'. */
  size: number | string;
  clusterSize?: number;
  refcountBits?: number;
  compat?: '0.10' | '1.1';
  extendedL2?: boolean;
  lazyRefcounts?: boolean;
  compressionType?: 'zlib' | 'zstd';
  backing?: string;
  backingFormat?: string;
  dataFile?: string;
  dataFileRaw?: boolean;
  preallocation?: 'off' | 'metadata' | 'falloc' | 'full';
  /** Extra `-o` options, passed as written. */
  options?: string[];
}

/** The qemu-io command for one write, as a -c argument. */
export function ioCommand(write: ImageWrite): string {
  if ('pattern' in write) return `write ${write.compressed ? '-c ' : ''}-P ${write.pattern} ${write.offset} ${write.length}`;
  if ('zero' in write) return `write -z ${write.unmap ? '-u ' : ''}${write.offset} ${write.length}`;
  return `discard ${write.offset} ${write.length}`;
}

/** Creates an image with qemu-img, then applies `writes` with one qemu-io run. Returns the image's path. */
export async function makeImage(options: ImageOptions, writes: ImageWrite[] = []): Promise<string> {
  const format = options.format ?? 'qcow2';
  const path = resolve(options.path ?? join(tempDir(), `image.${format}`));
  const o: string[] = [];
  if (options.clusterSize !== undefined) o.push(`cluster_size=${options.clusterSize}`);
  if (options.refcountBits !== undefined) o.push(`refcount_bits=${options.refcountBits}`);
  if (options.compat !== undefined) o.push(`compat=${options.compat}`);
  if (options.extendedL2 !== undefined) o.push(`extended_l2=${options.extendedL2 ? 'on' : 'off'}`);
  if (options.lazyRefcounts !== undefined) o.push(`lazy_refcounts=${options.lazyRefcounts ? 'on' : 'off'}`);
  if (options.compressionType !== undefined) o.push(`compression_type=${options.compressionType}`);
  if (options.dataFile !== undefined) o.push(`data_file=${options.dataFile}`);
  if (options.dataFileRaw !== undefined) o.push(`data_file_raw=${options.dataFileRaw ? 'on' : 'off'}`);
  if (options.preallocation !== undefined) o.push(`preallocation=${options.preallocation}`);
  o.push(...(options.options ?? []));
  const args = ['create', '-q', '-f', format];
  if (o.length) args.push('-o', o.join(','));
  if (options.backing !== undefined) args.push('-b', options.backing, ...(options.backingFormat ? ['-F', options.backingFormat] : []));
  args.push(path, String(options.size));
  // From the image's directory: qemu-img creates a relative data_file relative to the working directory but
  // records the name for resolution relative to the image, so the two must coincide.
  const cwd = dirname(path);
  await qemuImg(args, { cwd });
  if (writes.length) await qemuIo(['-f', format, ...writes.flatMap((w) => ['-c', ioCommand(w)]), path], { cwd });
  return path;
}

/** `qemu-img info --output=json` parsed (an array with backingChain). */
export async function qemuInfo(path: string, options: { backingChain?: boolean; format?: string } = {}): Promise<any> {
  const args = ['info', '--output=json', ...(options.backingChain ? ['--backing-chain'] : []), ...(options.format ? ['-f', options.format] : []), path];
  return JSON.parse(await qemuImg(args));
}

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** `qemu-img map --output=json` parsed. */
export async function qemuMap(path: string, options: { format?: string } = {}): Promise<MapEntry[]> {
  return JSON.parse(await qemuImg(['map', '--output=json', ...(options.format ? ['-f', options.format] : []), path]));
}

/**
 * `qemu-img check --output=json`. Exit codes 0 (clean), 2 (corruptions) and 3 (leaks) still carry a JSON
 * report, so they are returned rather than thrown; 1 (could not check) and other failures throw.
 */
export async function qemuCheck(path: string, options: { format?: string } = {}): Promise<{ exitCode: number; result: any }> {
  const r = await run('qemu-img', ['check', '--output=json', ...(options.format ? ['-f', options.format] : []), path]);
  if (r.exitCode !== 0 && r.exitCode !== 2 && r.exitCode !== 3) {
    throw new Error(`qemu-img check ${path} exited with ${r.exitCode}:\n${r.stderr}${r.stdout}`);
  }
  return { exitCode: r.exitCode, result: JSON.parse(r.stdout) };
}

/** `qemu-img convert -O raw`: the guest-visible bytes. With `out`, writes there and returns the path. */
export async function qemuConvertToRaw(path: string, options?: { format?: string; snapshot?: string }): Promise<Uint8Array>;
export async function qemuConvertToRaw(path: string, options: { format?: string; snapshot?: string; out: string }): Promise<string>;
export async function qemuConvertToRaw(path: string, options: { format?: string; snapshot?: string; out?: string } = {}): Promise<Uint8Array | string> {
  const out = options.out ?? join(tempDir(), 'converted.raw');
  const args = ['convert', ...(options.format ? ['-f', options.format] : []), ...(options.snapshot ? ['-l', options.snapshot] : []), '-O', 'raw', path, out];
  await qemuImg(args);
  if (options.out !== undefined) return out;
  const bytes = new Uint8Array(await readFile(out));
  rmSync(out);
  return bytes;
}

/** sha256 of a file (streamed), hex. */
export function sha256(file: string): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    const hash = createHash('sha256');
    createReadStream(file)
      .on('data', (chunk) => hash.update(chunk))
      .on('error', reject)
      .on('end', () => resolvePromise(hash.digest('hex')));
  });
}

/** sha256 of bytes in memory, hex (to compare with sha256(file)). */
export function sha256Bytes(bytes: Uint8Array): string {
  return createHash('sha256').update(bytes).digest('hex');
}

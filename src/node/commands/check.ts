/**
 * `qcow86 check [-f FMT] [--output=json|human] [-r leaks|all] FILE`: qemu-img check. Without -r the image is
 * opened read-only and never modified; with -r it is opened under the write lock and its refcounts are repaired.
 * Exit codes as qemu-img (after a repair they describe the repaired image): 0 clean, 2 corruptions, 3 leaks only,
 * 1 when the check itself failed, 63 for formats that have no consistency check (raw, qcow). The engine side is
 * src/qcow2/check.ts.
 */
import { parseArgs } from 'node:util';
import { Qcow2Image } from '../../qcow2/image.js';
import { Qcow86Error } from '../../qcow2/errors.js';
import { checkImage, checkResultJson, type CheckResult } from '../../qcow2/check.js';
import type { BlockDevice } from '../../qcow2/device.js';
import { openPath } from '../open-image.js';
import { qemuJson, type JsonValue } from '../qemu-json.js';
import { usageError } from '../usage.js';
import { SECRET_OPTIONS, SECRET_USAGE, imageArgumentOf } from '../image-spec.js';
import { WriteLock } from '../../io/lock.js';

export const USAGE = `usage: qcow86 check [-f raw|qcow2|qcow] ${SECRET_USAGE} [--output=human|json] [-r leaks|all] [-U] FILE`;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      format: { type: 'string', short: 'f' },
      output: { type: 'string', default: 'human' },
      repair: { type: 'string', short: 'r' },
      'force-share': { type: 'boolean', short: 'U', default: false },
      quiet: { type: 'boolean', short: 'q', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      ...SECRET_OPTIONS,
    },
  });
  if (values.help) return console.log(USAGE), 0;
  if (positionals.length !== 1) return usageError('check', 'expecting one image file name', USAGE);
  const json = values.output === 'json';
  if (!json && values.output !== 'human') return usageError('check', '--output must be used with human or json as argument', USAGE);
  const repair = values.repair;
  if (repair !== undefined && repair !== 'leaks' && repair !== 'all') {
    return usageError('check', "Unknown option for -r (expecting 'leaks' or 'all'): " + repair, USAGE);
  }
  let image;
  try {
    image = await imageArgumentOf(positionals[0]!, values);
  } catch (error) {
    if (!(error instanceof Qcow86Error)) throw error;
    console.error(`qcow86 check: ${error.message}`);
    return 1;
  }
  const path = image.path;
  const pending: string[] = [];
  const flushFindings = () => {
    if (pending.length) console.error(pending.join('\n'));
    pending.length = 0;
  };
  let device: BlockDevice | undefined;
  let lock: WriteLock | undefined;
  try {
    if (repair) lock = await WriteLock.acquire(path);
    // The check looks at this file's metadata only: the backing chain is not needed (and may be missing).
    device = await openPath(path, { ...image.open, openBacking: false, openDataFile: false, forCheck: true, ...(repair ? { readOnly: false, repair: true } : {}) });
    if (!(device instanceof Qcow2Image)) {
      console.error('qcow86 check: This image format does not support checks');
      return 63;
    }
    // Findings go to stderr as they are made, all of them, as qemu-img prints them; in batches, because a
    // damaged image can yield hundreds of thousands (one write each took seconds).
    const onMessage = (line: string) => {
      pending.push(line);
      if (pending.length >= 4096) flushFindings();
    };
    const result = await checkImage(device, { ...(repair ? { repair } : {}), onMessage });
    flushFindings();
    if (repair && !json && (result.leaksFixed || result.corruptionsFixed)) {
      process.stdout.write(
        `The following inconsistencies were found and repaired:\n\n    ${result.leaksFixed} leaked clusters\n    ${result.corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`,
      );
    }
    if (result.checkErrors) {
      // qemu-img reports internal errors and still prints what it found.
      if (json) process.stdout.write(`${qemuJson(checkResultJson(result, image.text) as JsonValue)}\n`);
      else if (!values.quiet) process.stdout.write(humanCheck(result));
      console.error('qcow86 check: Check failed');
      return 1;
    }
    if (json) process.stdout.write(`${qemuJson(checkResultJson(result, image.text) as JsonValue)}\n`);
    else if (!values.quiet) process.stdout.write(humanCheck(result));
    return result.corruptions ? 2 : result.leaks ? 3 : 0;
  } catch (error) {
    flushFindings();
    if (!(error instanceof Qcow86Error)) throw error;
    console.error(`qcow86 check: ${error.message}`);
    return 1;
  } finally {
    await device?.close();
    await lock?.release();
  }
}

/** qemu-img's dump_human_image_check. */
export function humanCheck(check: CheckResult): string {
  const out: string[] = [];
  if (!(check.corruptions || check.leaks || check.checkErrors)) {
    out.push('No errors were found on the image.\n');
  } else {
    if (check.corruptions) {
      out.push(`\n${check.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`);
    }
    if (check.leaks) out.push(`\n${check.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`);
    if (check.checkErrors) out.push(`\n${check.checkErrors} internal errors have occurred during the check.\n`);
  }
  if (check.totalClusters !== 0 && check.allocatedClusters !== 0) {
    const pct = (n: number, d: number) => printf2((n * 100) / d);
    out.push(
      `${check.allocatedClusters}/${check.totalClusters} = ${pct(check.allocatedClusters, check.totalClusters)}% allocated, ` +
        `${pct(check.fragmentedClusters, check.allocatedClusters)}% fragmented, ${pct(check.compressedClusters, check.allocatedClusters)}% compressed clusters\n`,
    );
  }
  if (check.imageEndOffset) out.push(`Image end offset: ${check.imageEndOffset}\n`);
  return out.join('');
}

/** printf's %0.2f: exact ties round to even (3.125 prints as 3.12), where toFixed would round up. */
function printf2(value: number): string {
  const scaled = value * 100;
  const floor = Math.floor(scaled);
  const rounded = scaled - floor === 0.5 ? (floor % 2 === 0 ? floor : floor + 1) : Math.round(scaled);
  return (rounded / 100).toFixed(2);
}

/**
 * `qcow86 map [-f FMT] [--output=json|human] FILE`: qemu-img map. The engine's block status (block-status.ts)
 * does the work; this prints each merged entry as soon as it is final, in qemu-img's two formats.
 */
import { parseArgs } from 'node:util';
import { mapDevice, type MapEntry } from '../../qcow2/block-status.js';
import { allocatedSize, openPath } from '../open-image.js';
import { usageError } from '../usage.js';
import { SECRET_OPTIONS, SECRET_USAGE, imageArgumentOf } from '../image-spec.js';

export const USAGE = `usage: qcow86 map [-f raw|qcow2|qcow] ${SECRET_USAGE} [--output=human|json] [-U] FILE`;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      format: { type: 'string', short: 'f' },
      output: { type: 'string', default: 'human' },
      'force-share': { type: 'boolean', short: 'U', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      ...SECRET_OPTIONS,
    },
  });
  if (values.help) return console.log(USAGE), 0;
  if (positionals.length !== 1) return usageError('map', 'expecting one image file name', USAGE);
  const json = values.output === 'json';
  if (!json && values.output !== 'human') return usageError('map', '--output must be used with human or json as argument', USAGE);
  const image = await imageArgumentOf(positionals[0]!, values);
  const device = await openPath(image.path, image.open);
  const out: string[] = [];
  // Output is buffered and written in large pieces: a fragmented image has millions of entries.
  const emit = (text: string) => {
    out.push(text);
    if (out.length >= 4096) process.stdout.write(out.splice(0).join(''));
  };
  try {
    let first = true;
    let failure: string | undefined;
    if (json) emit('[');
    else emit(`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`);
    await mapDevice(device, { allocatedSize }, (entry) => {
      if (failure) return;
      if (json) {
        emit(`${first ? '' : ',\n'}${jsonEntry(entry)}`);
        first = false;
      } else if (entry.data && entry.offset === undefined) {
        failure = 'File contains external, encrypted or compressed clusters.';
      } else if (entry.data && !entry.zero) {
        emit(`${hex(entry.start).padEnd(16)}${hex(entry.length).padEnd(16)}${hex(entry.offset!).padEnd(16)}${entry.file}\n`);
      }
    });
    if (json) emit(']\n');
    process.stdout.write(out.join(''));
    if (failure) {
      console.error(`qcow86 map: ${failure}`);
      return 1;
    }
    return 0;
  } finally {
    await device.close();
  }
}

function jsonEntry(e: MapEntry): string {
  const offset = e.offset !== undefined ? `, "offset": ${e.offset}` : '';
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${offset}}`;
}

/** printf's %#x: "0" for zero, 0x-prefixed otherwise. */
function hex(value: number): string {
  return value === 0 ? '0' : `0x${value.toString(16)}`;
}

/**
 * `qcow86 info [-f FMT] [--output=json|human] [--backing-chain] [-U] FILE`: qemu-img info. Opens read-only;
 * without --backing-chain the backing file is not opened (qemu-img does not need it either).
 */
import { parseArgs } from 'node:util';
import type { BlockDevice } from '../../qcow2/device.js';
import { backingOf, fullNameOf } from '../../qcow2/open.js';
import { imageInfo, type Info } from '../image-info.js';
import { humanSize, openPath } from '../open-image.js';
import { dumpDict, qemuJson, type JsonValue } from '../qemu-json.js';
import { usageError } from '../usage.js';
import { SECRET_OPTIONS, SECRET_USAGE, imageArgumentOf } from '../image-spec.js';

export const USAGE = `usage: qcow86 info [-f raw|qcow2|qcow] ${SECRET_USAGE} [--output=human|json] [--backing-chain] [-U] FILE`;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      format: { type: 'string', short: 'f' },
      output: { type: 'string', default: 'human' },
      'backing-chain': { type: 'boolean', default: false },
      'force-share': { type: 'boolean', short: 'U', default: false },
      help: { type: 'boolean', short: 'h', default: false },
      ...SECRET_OPTIONS,
    },
  });
  if (values.help) return console.log(USAGE), 0;
  if (positionals.length !== 1) return usageError('info', 'expecting one image file name', USAGE);
  if (values.output !== 'json' && values.output !== 'human') return usageError('info', `--output must be used with human or json as argument`, USAGE);
  const image = await imageArgumentOf(positionals[0]!, values);
  const path = image.path;
  const chain = values['backing-chain'];
  // Encrypted images show their metadata without the key, as in qemu-img.
  const device = await openPath(path, { format: image.format, openBacking: chain, openDataFile: false, metadataOnly: true });
  try {
    const infos: Info[] = [];
    let layer: BlockDevice | undefined = device;
    let name = path;
    while (layer) {
      infos.push(await imageInfo(layer, name));
      if (!chain) break;
      layer = backingOf(layer);
      if (layer) name = fullNameOf(layer);
    }
    if (values.output === 'json') process.stdout.write(`${qemuJson(chain ? infos : infos[0]!)}\n`);
    else process.stdout.write(infos.map(humanInfo).join('\n'));
    return 0;
  } finally {
    await device.close();
  }
}

/** qemu-img's bdrv_image_info_dump. */
export function humanInfo(info: Info): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${humanSize(info['virtual-size'] as number)} (${info['virtual-size']} bytes)`,
    `disk size: ${info['actual-size'] === undefined ? 'unavailable' : humanSize(info['actual-size'] as number)}`,
  ];
  if (info.encrypted) lines.push('encrypted: yes');
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${info['cluster-size']}`);
  if (info['dirty-flag']) lines.push('cleanly shut down: no');
  if (info['backing-filename'] !== undefined) {
    const full = info['full-backing-filename'];
    lines.push(`backing file: ${info['backing-filename']}${full !== info['backing-filename'] ? ` (actual path: ${full})` : ''}`);
  }
  if (info['backing-filename-format'] !== undefined) lines.push(`backing file format: ${info['backing-filename-format']}`);
  const snapshots = info.snapshots as Info[] | undefined;
  if (snapshots) {
    lines.push('Snapshot list:', `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`);
    for (const s of snapshots) lines.push(snapshotLine(s));
  }
  const specific = info['format-specific'] as { data: { [key: string]: JsonValue } } | undefined;
  if (specific) {
    lines.push('Format specific information:');
    dumpDict(specific.data, 1, lines);
  }
  return `${lines.join('\n')}\n`;
}

export function snapshotLine(s: Info): string {
  const date = new Date((s['date-sec'] as number) * 1000);
  const two = (n: number) => String(n).padStart(2, '0');
  // qemu-img prints local time; TZ decides, as for qemu-img.
  const dateText = `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())} ${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}`;
  const secs = s['vm-clock-sec'] as number;
  const millis = Math.floor((s['vm-clock-nsec'] as number) / 1e6);
  const clock = `${two(Math.floor(secs / 3600))}:${two(Math.floor(secs / 60) % 60)}:${two(secs % 60)}.${String(millis).padStart(3, '0')}`;
  const icount = s.icount === undefined ? '' : String(s.icount);
  return `${String(s.id).padEnd(9)} ${String(s.name).padEnd(16)} ${humanSize(s['vm-state-size'] as number).padStart(8)}${dateText.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`;
}

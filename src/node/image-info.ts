/**
 * What `qemu-img info` reports about one image, as qemu-img 7.2 names and orders it. The key order follows
 * qemu-img's own output so that text diffs line up; tests compare the parsed objects.
 */
import type { BlockDevice } from '../qcow2/device.js';
import { Qcow2Image } from '../qcow2/image.js';
import { BITMAP_AUTO, BITMAP_IN_USE } from '../qcow2/bitmaps.js';
import { QcowV1Image } from '../qcow2/qcow1.js';
import { RawImage } from '../qcow2/raw.js';
import { INCOMPAT_DATA_FILE } from '../qcow2/header.js';
import { encryptionInfo } from '../qcow2/encryption.js';
import { combinePath } from '../io/node-resolver.js';
import type { Snapshot } from '../qcow2/snapshots.js';
import type { JsonValue } from './qemu-json.js';
import { allocatedSize } from './open-image.js';

export type Info = { [key: string]: JsonValue };

/** The info object for `device`, whose file was opened as `filename`. */
export async function imageInfo(device: BlockDevice, filename: string): Promise<Info> {
  const info: Info = {};
  let backingName: string | undefined;
  if (device instanceof Qcow2Image) {
    const { header } = device;
    backingName = header.backingFile;
    if (header.backingFormat !== undefined && backingName !== undefined) info['backing-filename-format'] = header.backingFormat;
    if (device.snapshots.length) info.snapshots = device.snapshots.map(snapshotInfo);
  } else if (device instanceof QcowV1Image) {
    backingName = device.backingName;
  }
  info['virtual-size'] = device.virtualSize;
  info.filename = filename;
  if (device instanceof Qcow2Image || device instanceof QcowV1Image) info['cluster-size'] = device.clusterSize;
  info.format = device.format;
  const actual = await actualSize(device);
  if (actual !== undefined) info['actual-size'] = actual;
  if (device instanceof Qcow2Image) info['format-specific'] = { type: 'qcow2', data: await qcow2Specific(device) };
  if (backingName !== undefined) {
    info['full-backing-filename'] = combinePath(device.name, backingName);
    info['backing-filename'] = backingName;
  }
  if (device instanceof Qcow2Image && device.header.cryptMethod !== 0) info.encrypted = true;
  info['dirty-flag'] = device instanceof Qcow2Image ? device.isDirty : false;
  return info;
}

async function actualSize(device: BlockDevice): Promise<number | undefined> {
  // qemu-img 7.2 counts the image file only: not its external data file, not backing files.
  const stores = device instanceof Qcow2Image || device instanceof QcowV1Image || device instanceof RawImage ? [device.store] : [];
  let total: number | undefined;
  for (const store of stores) {
    if (!store) continue;
    const size = await allocatedSize(store);
    if (size === undefined) return undefined;
    total = (total ?? 0) + size;
  }
  return total;
}

function snapshotInfo(snapshot: Snapshot): Info {
  const out: Info = {};
  if (snapshot.icount !== undefined) out.icount = snapshot.icount;
  out['vm-clock-nsec'] = snapshot.vmClockNsec % 1e9;
  out.name = snapshot.name;
  out['date-sec'] = snapshot.dateSec;
  out['date-nsec'] = snapshot.dateNsec;
  out['vm-clock-sec'] = Math.floor(snapshot.vmClockNsec / 1e9);
  out.id = snapshot.id;
  out['vm-state-size'] = snapshot.vmStateSize;
  return out;
}

async function qcow2Specific(image: Qcow2Image): Promise<Info> {
  const { header } = image;
  const compressionType = header.compressionType === 1 ? 'zstd' : 'zlib';
  if (header.version === 2) return { compat: '0.10', 'compression-type': compressionType, 'refcount-bits': 2 ** header.refcountOrder };
  const data: Info = { compat: '1.1', 'compression-type': compressionType, 'lazy-refcounts': image.lazyRefcounts };
  const bitmaps = await bitmapList(image);
  if (bitmaps) data.bitmaps = bitmaps;
  data['refcount-bits'] = 2 ** header.refcountOrder;
  const encrypt = await encryptionInfo(image.store, header);
  if (encrypt) data.encrypt = encrypt;
  if (header.dataFile !== undefined) data['data-file'] = header.dataFile;
  if (header.incompatibleFeatures & INCOMPAT_DATA_FILE) data['data-file-raw'] = image.dataFileRaw;
  data.corrupt = image.isCorrupt;
  data['extended-l2'] = image.geometry.extendedL2;
  return data;
}

/** Bitmap directory entries: name, granularity and flags, as qemu-img lists them (validated on open). */
async function bitmapList(image: Qcow2Image): Promise<Info[] | undefined> {
  if (image.bitmaps.length === 0) return undefined;
  return image.bitmaps.map((bitmap) => {
    const flags: string[] = [];
    if (bitmap.flags & BITMAP_IN_USE) flags.push('in-use');
    if (bitmap.flags & BITMAP_AUTO) flags.push('auto');
    return { flags, name: bitmap.name, granularity: 2 ** bitmap.granularityBits };
  });
}

/**
 * Persistent dirty bitmaps: the bitmaps header extension and the bitmap directory, decoded and validated as QEMU
 * 7.2 validates them on open (qcow2_read_extensions, bitmap_list_load, check_dir_entry), with QEMU's words and
 * the field named. The engine does not maintain bitmaps (a write drops them, see write-path.ts); info lists
 * them, check counts their clusters and measure sizes them, all from the one directory decoded here.
 */
import { FormatError } from './errors.js';
import { hex, u32, u64 } from './bytes.js';

/** The extension's fields (bitmaps header extension, 24 bytes). */
export interface BitmapsExtension {
  count: number;
  directorySize: number;
  directoryOffset: number;
}

/** One bitmap directory entry. */
export interface BitmapEntry {
  tableOffset: number;
  /** Entries (8 bytes each) of the bitmap table. */
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
  /** The name's length in bytes, as stored. */
  nameSize: number;
  /** Bytes the entry takes in the directory (padded to 8). */
  storedSize: number;
}

export const BITMAPS_EXTENSION_LENGTH = 24;
/** QEMU's limits (qcow2.h, qcow2-bitmap.c). */
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS;
const MAX_TABLE_SIZE = 0x8000000;
const MAX_PHYS_SIZE = 0x20000000;
const MIN_GRANULARITY_BITS = 9;
const MAX_GRANULARITY_BITS = 31;
const MAX_NAME_SIZE = 1023;
export const BITMAP_IN_USE = 1;
export const BITMAP_AUTO = 2;
const DIRTY_TRACKING = 1;
const ENTRY_FIXED = 24;

/**
 * The extension's data (`data`, starting at file offset `at`): QEMU judges the length always, and the other
 * fields only when the autoclear bit says the bitmaps are consistent (`consistent`); otherwise it ignores them.
 */
export function parseBitmapsExtension(file: string, data: Uint8Array, at: number, clusterSize: number, consistent: boolean): BitmapsExtension | undefined {
  const bad = (message: string, field: string, offset: number, value: number | bigint) => new FormatError(file, message, { field, offset, value });
  if (data.length !== BITMAPS_EXTENSION_LENGTH) throw bad(`bitmaps_ext: Invalid extension length (bitmaps extension length ${data.length} at offset ${at - 4}, must be ${BITMAPS_EXTENSION_LENGTH})`, 'bitmaps extension length', at - 4, data.length);
  if (!consistent) return undefined;
  const count = u32(data, 0);
  const reserved = u32(data, 4);
  const directorySize = u64(data, 8);
  const directoryOffset = u64(data, 16);
  if (reserved !== 0) throw bad(`bitmaps_ext: Reserved field is not zero (bitmaps reserved field ${hex(reserved)} at offset ${at + 4})`, 'bitmaps reserved', at + 4, reserved);
  if (count > MAX_BITMAPS) throw bad(`bitmaps_ext: Image has ${count} bitmaps, exceeding the QEMU supported maximum of ${MAX_BITMAPS} (nb_bitmaps at offset ${at})`, 'nb_bitmaps', at, count);
  if (count === 0) throw bad(`found bitmaps extension with zero bitmaps (nb_bitmaps at offset ${at})`, 'nb_bitmaps', at, count);
  if (directoryOffset % clusterSize !== 0) throw bad(`bitmaps_ext: invalid bitmap directory offset (bitmap_directory_offset ${hex(directoryOffset)} at offset ${at + 16} is not cluster aligned)`, 'bitmap_directory_offset', at + 16, directoryOffset);
  if (directorySize > MAX_BITMAP_DIRECTORY_SIZE) {
    throw bad(`bitmaps_ext: bitmap directory size (${directorySize}) exceeds the maximum supported size (${MAX_BITMAP_DIRECTORY_SIZE}) (bitmap_directory_size at offset ${at + 8})`, 'bitmap_directory_size', at + 8, directorySize);
  }
  return { count, directorySize, directoryOffset };
}

/**
 * Decodes and validates the bitmap directory (`directory` holds its bytes, read from `extension.directoryOffset`):
 * as many entries as the extension says, each within the directory, without extra data, meeting QEMU's
 * constraints (table size and offset, granularity, flags, name, type, and a table large enough for a disk of
 * `diskSize` bytes unless the bitmap is in use), and nothing after the last one.
 */
export function parseBitmapDirectory(file: string, directory: Uint8Array, extension: BitmapsExtension, clusterSize: number, diskSize: number): BitmapEntry[] {
  const base = extension.directoryOffset;
  const broken = (at: number, why: string) => new FormatError(file, `Broken bitmap directory: ${why} (entry at offset ${hex(base + at)})`, { field: 'bitmap directory', offset: base + at });
  if (directory.length === 0) throw new FormatError(file, 'Broken bitmap directory: bitmap_directory_size is 0', { field: 'bitmap_directory_size', value: 0 });
  const entries: BitmapEntry[] = [];
  let at = 0;
  while (at < directory.length) {
    if (at + ENTRY_FIXED > directory.length) throw broken(at, 'an entry crosses the end of the directory');
    if (entries.length === extension.count) {
      throw new FormatError(file, `More bitmaps found than specified in header extension (nb_bitmaps ${extension.count}; another entry at offset ${hex(base + at)})`, { field: 'nb_bitmaps', offset: base + at, value: extension.count });
    }
    const tableOffset = u64(directory, at);
    const tableSize = u32(directory, at + 8);
    const flags = u32(directory, at + 12);
    const type = directory[at + 16]!;
    const granularityBits = directory[at + 17]!;
    const nameSize = (directory[at + 18]! << 8) | directory[at + 19]!;
    const extraSize = u32(directory, at + 20);
    const storedSize = Math.ceil((ENTRY_FIXED + extraSize + nameSize) / 8) * 8;
    if (at + storedSize > directory.length) throw broken(at, 'an entry crosses the end of the directory');
    const nameStart = at + ENTRY_FIXED + extraSize;
    const name = new TextDecoder().decode(directory.subarray(nameStart, nameStart + nameSize));
    if (extraSize !== 0) {
      throw new FormatError(file, `Bitmap extra data is not supported (bitmap '${name}', extra_data_size ${extraSize} at offset ${hex(base + at + 20)})`, { field: 'extra_data_size', offset: base + at + 20, value: extraSize });
    }
    const why = entryProblem({ tableOffset, tableSize, flags, type, granularityBits, nameSize }, clusterSize, diskSize);
    if (why) throw new FormatError(file, `Bitmap '${name}' doesn't satisfy the constraints: ${why.text} (entry at offset ${hex(base + at)})`, { field: why.field, offset: base + at });
    entries.push({ tableOffset, tableSize, flags, type, granularityBits, name, nameSize, storedSize });
    at += storedSize;
  }
  if (entries.length !== extension.count) {
    throw new FormatError(file, `Less bitmaps found than specified in header extension (nb_bitmaps ${extension.count}, the bitmap directory holds ${entries.length})`, { field: 'nb_bitmaps', value: extension.count });
  }
  return entries;
}

/** QEMU's check_dir_entry, saying which field fails. */
function entryProblem(
  e: { tableOffset: number; tableSize: number; flags: number; type: number; granularityBits: number; nameSize: number },
  clusterSize: number,
  diskSize: number,
): { field: string; text: string } | undefined {
  if (e.tableSize === 0) return { field: 'bitmap_table_size', text: 'bitmap_table_size is 0' };
  if (e.tableOffset === 0 || e.tableOffset % clusterSize !== 0) return { field: 'bitmap_table_offset', text: `bitmap_table_offset ${hex(e.tableOffset)} is not a cluster-aligned offset` };
  if (e.tableSize > MAX_TABLE_SIZE) return { field: 'bitmap_table_size', text: `bitmap_table_size ${e.tableSize} exceeds ${MAX_TABLE_SIZE}` };
  if (e.granularityBits > MAX_GRANULARITY_BITS || e.granularityBits < MIN_GRANULARITY_BITS) {
    return { field: 'granularity_bits', text: `granularity_bits ${e.granularityBits} is outside ${MIN_GRANULARITY_BITS}..${MAX_GRANULARITY_BITS}` };
  }
  if (e.flags & ~(BITMAP_IN_USE | BITMAP_AUTO)) return { field: 'flags', text: `reserved flags set (${hex(e.flags)})` };
  if (e.nameSize > MAX_NAME_SIZE) return { field: 'name_size', text: `name_size ${e.nameSize} exceeds ${MAX_NAME_SIZE}` };
  if (e.type !== DIRTY_TRACKING) return { field: 'type', text: `type ${e.type} is not a dirty tracking bitmap (1)` };
  const physicalBytes = e.tableSize * clusterSize;
  if (physicalBytes > MAX_PHYS_SIZE) return { field: 'bitmap_table_size', text: `its table describes ${physicalBytes} bytes of bitmap, more than ${MAX_PHYS_SIZE}` };
  if (!(e.flags & BITMAP_IN_USE) && diskSize > physicalBytes * 8 * 2 ** e.granularityBits) {
    return { field: 'bitmap_table_size', text: `its table of ${e.tableSize} entries is too small for a ${diskSize}-byte disk at granularity ${2 ** e.granularityBits}` };
  }
  return undefined;
}

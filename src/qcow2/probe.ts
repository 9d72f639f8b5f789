/**
 * Format probing as QEMU's drivers do it, on a file's first bytes: which format claims a head of bytes. Pure
 * functions of the bytes, used to open images (open.ts) and to keep a probed raw disk from turning itself into
 * another format (raw.ts).
 */
import { u32 } from './bytes.js';
import { QCOW2_MAGIC } from './header.js';

export type ImageFormat = 'qcow2' | 'qcow' | 'raw';

/** How much of a file QEMU's probes see. */
export const PROBE_BYTES = 2048;

/** qcow (version 1), qcow2 (version 2 or more) or raw: the qcow magic with version 0 is claimed by neither. */
export function qcowFormatOf(head: Uint8Array): ImageFormat {
  if (head.length < 8 || u32(head, 0) !== QCOW2_MAGIC) return 'raw';
  const version = u32(head, 4);
  return version === 1 ? 'qcow' : version >= 2 ? 'qcow2' : 'raw';
}

/** The other QEMU driver (VMDK, VDI, VHDX, VHD, QED, Parallels, LUKS, Bochs) whose magic `head` carries, if any. */
export function foreignFormatOf(head: Uint8Array): string | undefined {
  const text = (at: number, magic: string) => head.length >= at + magic.length && magic.split('').every((char, i) => head[at + i] === char.charCodeAt(0));
  const le32 = (at: number) => (head.length >= at + 4 ? (head[at]! | (head[at + 1]! << 8) | (head[at + 2]! << 16) | (head[at + 3]! << 24)) >>> 0 : undefined);
  if (text(0, 'KDMV') || text(0, 'COWD') || isVmdkDescriptor(head)) return 'vmdk';
  if (head.length >= 512 && le32(0x40) === 0xbeda107f) return 'vdi';
  if (text(0, 'vhdxfile')) return 'vhdx';
  if (text(0, 'conectix')) return 'vpc';
  if (head.length >= 64 && le32(0) === 0x00444551) return 'qed';
  if (head.length >= 64 && (text(0, 'WithoutFreeSpace') || text(0, 'WithouFreSpacExt')) && le32(16) === 2) return 'parallels';
  if (text(0, 'LUKS\xba\xbe')) return 'luks';
  if (head.length >= 512 && text(0, 'Bochs Virtual HD Image\0')) return 'bochs';
  return undefined;
}

/** Any format other than raw that claims `head`: what a probed raw disk must never start to look like. */
export function nonRawFormatOf(head: Uint8Array): string | undefined {
  const qcow = qcowFormatOf(head);
  return qcow !== 'raw' ? qcow : foreignFormatOf(head);
}

/**
 * A VMDK text descriptor as QEMU's probe recognises one (checked against qemu-img 7.2): comment lines, then
 * lines of spaces only, then `version=1|2|3` ending in LF or CRLF. An empty line or any other text first: not one.
 */
function isVmdkDescriptor(head: Uint8Array): boolean {
  let at = 0;
  while (at < head.length) {
    if (head[at] === 0x23 /* # */) {
      while (at < head.length && head[at] !== 0x0a) at++;
      at++;
      continue;
    }
    if (head[at] === 0x20) {
      while (at < head.length && head[at] === 0x20) at++;
      if (head[at] === 0x0d) at++;
      if (head[at] !== 0x0a) return false;
      at++;
      continue;
    }
    return /^version=[123]\r?\n/.test(String.fromCharCode(...head.subarray(at, at + 11)));
  }
  return false;
}

/**
 * Big-endian field access. qcow2 stores 64-bit offsets; guest and host offsets are bounded below 2^53 by
 * validation, so they travel as numbers. Fields that use the top bits as flags are split into 32-bit halves.
 */
const TWO_32 = 2 ** 32;

export function u32(bytes: Uint8Array, at: number): number {
  return ((bytes[at]! << 24) | (bytes[at + 1]! << 16) | (bytes[at + 2]! << 8) | bytes[at + 3]!) >>> 0;
}

export function u16(bytes: Uint8Array, at: number): number {
  return (bytes[at]! << 8) | bytes[at + 1]!;
}

/** A u64 as a bigint: for feature masks and values that may exceed 2^53 before validation. */
export function u64big(bytes: Uint8Array, at: number): bigint {
  return (BigInt(u32(bytes, at)) << 32n) | BigInt(u32(bytes, at + 4));
}

/** A u64 as a number; callers must only use it where the value was validated or is masked below 2^53. */
export function u64(bytes: Uint8Array, at: number): number {
  return u32(bytes, at) * TWO_32 + u32(bytes, at + 4);
}

export function putU32(bytes: Uint8Array, at: number, value: number): void {
  bytes[at] = value >>> 24;
  bytes[at + 1] = (value >>> 16) & 0xff;
  bytes[at + 2] = (value >>> 8) & 0xff;
  bytes[at + 3] = value & 0xff;
}

export function putU16(bytes: Uint8Array, at: number, value: number): void {
  bytes[at] = (value >>> 8) & 0xff;
  bytes[at + 1] = value & 0xff;
}

export function putU64(bytes: Uint8Array, at: number, value: number | bigint): void {
  const big = BigInt(value);
  putU32(bytes, at, Number((big >> 32n) & 0xffffffffn));
  putU32(bytes, at + 4, Number(big & 0xffffffffn));
}

/** The high and low 32-bit halves of a u64 entry, for flag tests without bigint on hot paths. */
export function hi32(bytes: Uint8Array, at: number): number {
  return u32(bytes, at);
}

export function hex(value: number | bigint): string {
  return `0x${value.toString(16)}`;
}

export function isPowerOfTwo(value: number): boolean {
  return value > 0 && (value & (value - 1)) === 0;
}

export function alignUp(value: number, alignment: number): number {
  return Math.ceil(value / alignment) * alignment;
}

export function alignDown(value: number, alignment: number): number {
  return Math.floor(value / alignment) * alignment;
}

const textDecoder = new TextDecoder('utf-8', { fatal: false });
const textEncoder = new TextEncoder();

export function decodeText(bytes: Uint8Array): string {
  return textDecoder.decode(bytes);
}

export function encodeText(text: string): Uint8Array {
  return textEncoder.encode(text);
}

/** True when every byte is zero (used to keep zero data out of images, as qemu-img does). */
export function isZero(bytes: Uint8Array): boolean {
  // Word-at-a-time when aligned: this runs over every cluster convert writes.
  if ((bytes.byteOffset & 3) === 0 && bytes.length >= 64) {
    const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length >>> 2);
    for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
    for (let i = words.length << 2; i < bytes.length; i++) if (bytes[i] !== 0) return false;
    return true;
  }
  for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

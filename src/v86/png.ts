/**
 * Screen pictures as PNG files, encoded by fast-png (pure JavaScript, the same code in Node and the browser).
 * The alpha channel is dropped: a screen is opaque, and RGB files are a quarter smaller.
 */
import { encode } from 'fast-png';
import type { Frame } from './screen.js';

export function encodePng(frame: Frame): Uint8Array {
  const pixels = frame.width * frame.height;
  const rgb = new Uint8Array(pixels * 3);
  for (let i = 0, o = 0; i < pixels * 4; i += 4, o += 3) {
    rgb[o] = frame.rgba[i]!;
    rgb[o + 1] = frame.rgba[i + 1]!;
    rgb[o + 2] = frame.rgba[i + 2]!;
  }
  return encode({ width: frame.width, height: frame.height, data: rgb, channels: 3, depth: 8 });
}

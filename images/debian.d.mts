// Types for images/debian.mjs (plain Node ESM so `npm run images -- debian` needs no build step).
import type { ImagesManifest } from './build.mjs';
export const DEBIAN_PACKAGES: string[];
export const DEBIAN_OUTPUTS: string[];
export function buildDebian(options?: { outDir?: string; update?: boolean }): Promise<ImagesManifest>;
export function ensureDebian(options?: { outDir?: string }): Promise<ImagesManifest>;

// Types for images/build.mjs (plain Node ESM so `npm run images` needs no build step).
export interface ImagesManifest {
  packages: Record<string, string>;
  kernel: string;
  cmdline: string;
  writer: string;
  virtualSize: number;
  raw: { path: string; sha256: string; size: number };
  files: Record<string, { sha256: string; size: number }>;
}
export const KERNEL_CMDLINE: string;
/** The default guest's root file system UUID (fixed, so builds are reproducible). */
export const EXT4_UUID: string;
export const OUTPUT_FILES: string[];
export function buildImages(options?: { outDir?: string; update?: boolean }): Promise<ImagesManifest>;
export function ensureImages(options?: { outDir?: string }): Promise<ImagesManifest>;
export function debianPackage(name: string): string;
export interface GuestEntry { id: string; name: string; file: string; build: string; boot: 'linux'; memoryMiB: number }
export const GUESTS: Array<GuestEntry & { manifest: string }>;
export function writeGuestList(outDir?: string): void;

// Shared by the image builds (build.mjs: the default guest; debian.mjs: the Debian guest): running host tools with
// pinned times and locale, i386 Debian packages from a private apt state in .cache (downloaded once), and trees
// of files with pinned times for reproducible file systems and archives.
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, closeSync, existsSync, lstatSync, mkdirSync, openSync, readSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const root = join(dirname(fileURLToPath(import.meta.url)), '..');
export const CACHE = join(root, '.cache');

/** Every time stamp in the images (files, file systems, archives). 2024-01-01T00:00:00Z. */
export const EPOCH = 1704067200;
export const MiB = 1024 * 1024;

export const FIXED_ENV = {
  SOURCE_DATE_EPOCH: String(EPOCH),
  E2FSPROGS_FAKE_TIME: String(EPOCH),
  TZ: 'UTC',
  LC_ALL: 'C',
};

export function run(command, args, options = {}) {
  return execFileSync(command, args, { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, ...FIXED_ENV }, ...options });
}

export function sha256(path) {
  // In pieces: the Debian guest's raw disk is larger than one Node buffer may be.
  const hash = createHash('sha256');
  const chunk = Buffer.alloc(16 * 1024 * 1024);
  const fd = openSync(path, 'r');
  try {
    for (let n; (n = readSync(fd, chunk, 0, chunk.length, null)) > 0;) hash.update(chunk.subarray(0, n));
  } finally {
    closeSync(fd);
  }
  return hash.digest('hex');
}

// ---------------------------------------------------------------- packages

const APT_LISTS = join(CACHE, 'apt/lists');
const DEBS = join(CACHE, 'debs');
/** i386 without multiarch on the host: a private state directory with its own lists. */
export const APT_OPTIONS = ['-oAPT::Architecture=i386', '-oAPT::Architectures=i386', `-oDir::State::Lists=${APT_LISTS}`, '-oDebug::NoLocking=1'];

export function aptUpdate(force) {
  mkdirSync(join(APT_LISTS, 'partial'), { recursive: true });
  const haveIndex = readdirSync(APT_LISTS).some((name) => /_Packages(\.[a-z0-9]+)?$/.test(name));
  if (haveIndex && !force) return;
  console.log('images: updating the i386 package index');
  // The i386 security index sometimes fails to update; the main index is enough, so a non-zero exit is tolerated
  // as long as some Packages index arrived.
  spawnSync('apt-get', [...APT_OPTIONS, '-qq', 'update'], { stdio: 'inherit' });
  if (!readdirSync(APT_LISTS).some((name) => /_Packages(\.[a-z0-9]+)?$/.test(name))) throw new Error('apt-get update produced no i386 package index');
}

export function aptCache(...args) {
  return run('apt-cache', [...APT_OPTIONS, ...args]).toString();
}

/** linux-image-686 is a metapackage; its dependency names the versioned kernel (linux-image-6.1.0-NN-686). */
export function resolveKernelPackage() {
  const depends = aptCache('depends', 'linux-image-686');
  const match = depends.match(/Depends: (linux-image-[0-9][^\s]*-686)\b/);
  if (!match) throw new Error(`cannot find the kernel package behind linux-image-686:\n${depends}`);
  return match[1];
}

export function candidateVersion(name) {
  const policy = aptCache('policy', name);
  const match = policy.match(/Candidate: (\S+)/);
  if (!match || match[1] === '(none)') throw new Error(`no i386 candidate for ${name}`);
  return match[1];
}

/** Downloads (once) the .deb for name=version into .cache/debs and returns its path. */
export function fetchDeb(name, version) {
  mkdirSync(DEBS, { recursive: true });
  const fileVersion = version.replace(/:/g, '%3a');
  // i386 or all (architecture-independent packages).
  const cached = readdirSync(DEBS).find((file) => file.startsWith(`${name}_${fileVersion}_`) && file.endsWith('.deb'));
  if (cached) return join(DEBS, cached);
  console.log(`images: downloading ${name} ${version}`);
  run('apt-get', [...APT_OPTIONS, '-qq', 'download', `${name}=${version}`], { cwd: DEBS, stdio: 'inherit' });
  const found = readdirSync(DEBS).find((file) => file.startsWith(`${name}_${fileVersion}_`) && file.endsWith('.deb'));
  if (!found) throw new Error(`apt-get download ${name}=${version} left no .deb in ${DEBS}`);
  return join(DEBS, found);
}

export function hostPackageVersion(name) {
  return run('dpkg-query', ['-W', '-f=${Version}', name]).toString().trim();
}

/**
 * Debian 12's i386 package NAME as a .deb in .cache/debs (downloaded once, at the version the cached package
 * index names), for tests that boot disks other people built (boot loader and tool images from Debian packages).
 */
export function debianPackage(name) {
  aptUpdate(false);
  return fetchDeb(name, candidateVersion(name));
}

// ---------------------------------------------------------------- trees

export function unpack(deb, dir) {
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  run('dpkg-deb', ['-x', deb, dir]);
}

export function findFile(dir, predicate) {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) {
      const found = findFile(path, predicate);
      if (found) return found;
    } else if (predicate(entry.name, path)) {
      return path;
    }
  }
  return undefined;
}

/** All paths under dir (relative, sorted bytewise) so archives list them in one order on every machine. */
export function listTree(dir) {
  const out = [];
  const walk = (sub) => {
    for (const name of readdirSync(join(dir, sub)).sort()) {
      const rel = sub ? `${sub}/${name}` : name;
      out.push(rel);
      if (lstatSync(join(dir, rel)).isDirectory()) walk(rel);
    }
  };
  walk('');
  return out.sort((a, b) => (Buffer.from(a) < Buffer.from(b) ? -1 : a === b ? 0 : 1));
}

export function pinTimes(dir) {
  // touch -h sets symlinks' own times; mke2fs -d and cpio copy these into the images.
  const paths = listTree(dir).map((rel) => join(dir, rel));
  for (let i = 0; i < paths.length; i += 500) run('touch', ['-h', '-d', `@${EPOCH}`, ...paths.slice(i, i + 500)]);
  run('touch', ['-h', '-d', `@${EPOCH}`, dir]);
}

export function writeExecutable(path, text) {
  writeFileSync(path, text);
  chmodSync(path, 0o755);
}

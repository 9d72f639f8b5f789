#!/usr/bin/env node
// Installs the Debian packages the test suite and image build need, when they are absent.
// Runs as root on CI (a fresh Debian machine); elsewhere it only reports what is missing.
import { execFileSync, spawnSync } from 'node:child_process';

/** Debian package -> a file whose presence shows it is installed. */
export const SYSTEM_PACKAGES = {
  'qemu-utils': '/usr/bin/qemu-img',
  'qemu-block-extra': '/usr/lib/x86_64-linux-gnu/qemu/block-curl.so',
  'nginx-light': '/usr/sbin/nginx',
  seabios: '/usr/share/seabios/bios.bin',
  mtools: '/usr/bin/mcopy',
  syslinux: '/usr/bin/syslinux',
  'syslinux-common': '/usr/lib/syslinux/mbr/mbr.bin',
  dosfstools: '/usr/sbin/mkfs.fat',
  fdisk: '/usr/sbin/sfdisk',
  cpio: '/usr/bin/cpio',
  kmod: '/usr/bin/kmod',
  e2fsprogs: '/usr/sbin/mke2fs',
  chromium: '/usr/bin/chromium',
};

function present(path) {
  return spawnSync('test', ['-e', path]).status === 0;
}

export function missingPackages(names = Object.keys(SYSTEM_PACKAGES)) {
  return names.filter((name) => !present(SYSTEM_PACKAGES[name]));
}

export function ensurePackages(names = Object.keys(SYSTEM_PACKAGES)) {
  const missing = missingPackages(names);
  if (missing.length === 0) return;
  const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
  if (!isRoot) {
    console.error(`qcow86: missing system packages: ${missing.join(' ')} (run as root: apt-get install -y ${missing.join(' ')})`);
    process.exit(1);
  }
  console.log(`qcow86: installing system packages: ${missing.join(' ')}`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  execFileSync('apt-get', ['update', '-qq'], { stdio: 'inherit', env });
  execFileSync('apt-get', ['install', '-y', '-qq', '--no-install-recommends', ...missing], { stdio: 'inherit', env });
}

if (import.meta.url === `file://${process.argv[1]}`) {
  ensurePackages(process.argv.length > 2 ? process.argv.slice(2) : undefined);
}

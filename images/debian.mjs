// The Debian guest (`npm run images -- debian`): Debian 12 i386 packages unpacked into an ext4 root on a 2 GiB
// disk, booted by the default guest's boot partition (same kernel, initramfs and syslinux). No mounts, no
// chroot, no maintainer scripts: packages are unpacked with dpkg-deb and the few things their scripts would do
// (users, /bin/sh, awk and editor links, root's dot files, the dpkg status) are done here. busybox (Debian's
// busybox-static) is only PID 1 and poweroff; the userland is Debian's: bash, coreutils, util-linux, procps,
// less, nano, python3 (its standard library byte-compiled here, as Debian's postinst would), e2fsprogs.
//
// Outputs: public/images/debian.qcow2 (deflate-compressed qcow2, written by our engine) and debian.json (the
// manifest: package versions and hashes). Downloads live in .cache/debs; the bytes are reproducible for the same
// package versions (pinned times, ids and orders, as in build.mjs).
//
// Files the boot and `python3 -c` read are laid out first and together in the ext4 image (BOOT_FILES): a base
// fetched over HTTP then needs a few long sequential requests instead of one per scattered file.
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, linkSync, lstatSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { ensurePackages } from '../scripts/system-deps.mjs';
import { APT_OPTIONS, CACHE, MiB, aptUpdate, fetchDeb, hostPackageVersion, listTree, pinTimes, root, run, sha256, writeExecutable } from './common.mjs';
import {
  DEFAULT_OUT, HOST_PACKAGES, assembleDisk, buildBootFiles, buildExt4, buildFat, convertToCompressedQcow2, defaultBootFiles, fileSystemAt, kernelCmdline,
  syslinuxConfig, virtualSizeOf, writeGuestList,
} from './build.mjs';

const WORK = join(CACHE, 'images-debian');

/** What the user asked for; apt resolves their dependencies (no Recommends). */
export const DEBIAN_PACKAGES = [
  'base-files', 'base-passwd', 'bash', 'coreutils', 'dash', 'util-linux', 'mount', 'procps', 'less', 'nano', 'python3', 'e2fsprogs',
  'grep', 'sed', 'findutils', 'gzip', 'ncurses-base', 'ncurses-bin', 'busybox-static',
  // Satisfies init-system-helpers' "usrmerge | usr-is-merged" without usrmerge's perl: the tree is merged below.
  'usr-is-merged',
];

/**
 * Raise when a change here changes the guest (ensureDebian rebuilds images made by an older recipe). 2: the root
 * is found by its label (the shared initramfs loads IDE and virtio drivers), so it boots on either disk bus.
 */
const RECIPE = 2;

/** The root file system's label: the initramfs finds the root by it, on IDE (sda2) or virtio (vda2). */
const ROOT_LABEL = 'qcow86-debian';

const LAYOUT = (() => {
  const fatStart = 1 * MiB;
  const fatSize = 12 * MiB;
  const rootStart = fatStart + fatSize;
  const diskSize = 2048 * MiB;
  return { fatStart, fatSize, rootStart, rootSize: diskSize - rootStart, diskSize };
})();

// ---------------------------------------------------------------- packages

const STATUS = join(CACHE, 'apt/empty-status');

/** The dependency closure apt computes for DEBIAN_PACKAGES on an empty system, as name -> version. */
function resolveClosure() {
  mkdirSync(dirname(STATUS), { recursive: true });
  writeFileSync(STATUS, '');
  const out = run('apt-get', [...APT_OPTIONS, `-oDir::State::status=${STATUS}`, '-s', '-qq', 'install', '--no-install-recommends', ...DEBIAN_PACKAGES]).toString();
  const packages = {};
  for (const line of out.split('\n')) {
    const match = /^Inst (\S+) \((\S+) /.exec(line);
    if (match) packages[match[1]] = match[2];
  }
  for (const name of DEBIAN_PACKAGES) if (!packages[name]) throw new Error(`apt did not resolve ${name}:\n${out}`);
  return Object.fromEntries(Object.entries(packages).sort(([a], [b]) => (a < b ? -1 : 1)));
}

/** Downloads every missing .deb in one apt-get call (much faster than one call per package). */
function fetchAll(packages) {
  const debs = join(CACHE, 'debs');
  mkdirSync(debs, { recursive: true });
  const have = readdirSync(debs);
  const missing = Object.entries(packages).filter(([name, version]) => !have.some((file) => file.startsWith(`${name}_${version.replace(/:/g, '%3a')}_`)));
  if (missing.length) {
    console.log(`images: downloading ${missing.length} Debian packages`);
    run('apt-get', [...APT_OPTIONS, '-qq', 'download', ...missing.map(([name, version]) => `${name}=${version}`)], { cwd: debs, stdio: 'inherit' });
  }
  return Object.fromEntries(Object.entries(packages).map(([name, version]) => [name, fetchDeb(name, version)]));
}

// ---------------------------------------------------------------- the root tree

/** Documentation and translations are left out, as Debian's slim images do; copyright files stay. */
const DROPPED = ['usr/share/man', 'usr/share/info', 'usr/share/locale', 'usr/share/lintian', 'usr/share/bug', 'usr/share/doc-base', 'usr/share/linda'];

function unpackInto(tree, debs) {
  rmSync(tree, { recursive: true, force: true });
  // Merged /usr, as debootstrap makes bookworm systems: /bin, /sbin and /lib are links into /usr.
  for (const dir of ['usr/bin', 'usr/sbin', 'usr/lib']) mkdirSync(join(tree, dir), { recursive: true });
  for (const dir of ['bin', 'sbin', 'lib']) symlinkSync(`usr/${dir}`, join(tree, dir));
  for (const [name, deb] of Object.entries(debs)) {
    const archive = execFileSync('dpkg-deb', ['--fsys-tarfile', deb], { maxBuffer: 512 * MiB });
    execFileSync('tar', ['-x', '--keep-directory-symlink', '--no-same-owner', '-C', tree], { input: archive, maxBuffer: 64 * MiB, stdio: ['pipe', 'ignore', 'inherit'] });
    if (!existsSync(tree)) throw new Error(`unpacking ${name} failed`);
  }
  for (const dir of DROPPED) rmSync(join(tree, dir), { recursive: true, force: true });
  const docs = join(tree, 'usr/share/doc');
  for (const pkg of existsSync(docs) ? readdirSync(docs) : []) {
    const dir = join(docs, pkg);
    if (!lstatSync(dir).isDirectory()) continue;
    for (const file of readdirSync(dir)) if (file !== 'copyright') rmSync(join(dir, file), { recursive: true, force: true });
  }
}

const INITTAB = `# busybox init (PID 1 only): a root bash on the serial console and on tty1.
::sysinit:/etc/qcow86/rcS
ttyS0::respawn:/etc/qcow86/root-shell
tty1::respawn:/etc/qcow86/root-shell
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
`;

const RCS = `#!/bin/sh
# Early boot: the kernel file systems, a tmpfs for /tmp and /run, the host name.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
read -r name < /etc/hostname && echo "$name" > /proc/sys/kernel/hostname
`;

/** A login shell for root, as login(1) would start it (busybox init leaves HOME=/). */
const ROOT_SHELL = `#!/bin/bash
export HOME=/root USER=root LOGNAME=root SHELL=/bin/bash
cd /root
exec -l /bin/bash
`;

function configure(tree, packages, debs) {
  const etc = join(tree, 'etc');
  // Users and groups as base-passwd's postinst installs them.
  copyFileSync(join(tree, 'usr/share/base-passwd/passwd.master'), join(etc, 'passwd'));
  copyFileSync(join(tree, 'usr/share/base-passwd/group.master'), join(etc, 'group'));
  writeFileSync(join(etc, 'hostname'), 'qcow86\n');
  writeFileSync(join(etc, 'hosts'), '127.0.0.1\tlocalhost\n127.0.1.1\tqcow86\n::1\tlocalhost ip6-localhost ip6-loopback\n');
  writeFileSync(join(etc, 'fstab'), `LABEL=${ROOT_LABEL} / ext4 rw,errors=remount-ro 0 1\n`);
  writeFileSync(join(etc, 'inittab'), INITTAB);
  mkdirSync(join(etc, 'qcow86'), { recursive: true });
  writeExecutable(join(etc, 'qcow86/rcS'), RCS);
  writeExecutable(join(etc, 'qcow86/root-shell'), ROOT_SHELL);
  // busybox is PID 1 and the power switch; everything else is Debian's own.
  for (const name of ['init', 'poweroff', 'reboot', 'halt']) symlinkSync('../bin/busybox', join(tree, 'usr/sbin', name));
  // What maintainer scripts would have linked: /bin/sh (dash), awk (mawk), editor (nano), pager (less).
  const links = { 'usr/bin/sh': 'dash', 'usr/bin/awk': 'mawk', 'usr/bin/nawk': 'mawk', 'usr/bin/editor': 'nano', 'usr/bin/pager': 'less' };
  for (const [path, target] of Object.entries(links)) {
    rmSync(join(tree, path), { force: true });
    symlinkSync(target, join(tree, path));
  }
  // root's home as base-files' postinst sets it up (a prompt ending in '# ' from bash.bashrc's PS1).
  mkdirSync(join(tree, 'root'), { recursive: true });
  chmodSync(join(tree, 'root'), 0o700);
  copyFileSync(join(tree, 'usr/share/base-files/profile'), join(etc, 'profile'));
  copyFileSync(join(tree, 'usr/share/base-files/motd'), join(etc, 'motd'));
  copyFileSync(join(tree, 'usr/share/readline/inputrc'), join(etc, 'inputrc'));
  copyFileSync(join(tree, 'usr/share/base-files/dot.profile'), join(tree, 'root/.profile'));
  copyFileSync(join(tree, 'usr/share/base-files/dot.bashrc'), join(tree, 'root/.bashrc'));
  for (const dir of ['proc', 'sys', 'dev', 'run', 'tmp', 'mnt', 'var/tmp', 'var/log', 'var/lib/dpkg']) mkdirSync(join(tree, dir), { recursive: true });
  chmodSync(join(tree, 'tmp'), 0o1777);
  chmodSync(join(tree, 'var/tmp'), 0o1777);
  writeDpkgStatus(tree, packages, debs);
}

/** dpkg's database says what is installed (`dpkg -l` works), from each package's control file. */
function writeDpkgStatus(tree, packages, debs) {
  const entries = Object.keys(packages).map((name) => {
    const control = execFileSync('dpkg-deb', ['-f', debs[name]]).toString().trimEnd().split('\n');
    const out = [];
    for (const line of control) {
      out.push(line);
      if (line.startsWith('Package:')) out.push('Status: install ok installed');
    }
    return out.join('\n');
  });
  writeFileSync(join(tree, 'var/lib/dpkg/status'), entries.join('\n\n') + '\n');
  for (const file of ['available', 'diversions', 'statoverride']) writeFileSync(join(tree, 'var/lib/dpkg', file), '');
}

/**
 * Byte-compiles the standard library as python3's postinst (py3compile) would, so the first `python3` neither
 * compiles ~40 modules on a slow CPU nor writes caches into the user's overlay. Unchecked-hash .pyc files do not
 * depend on file times. Needs the host's python3 to be the same minor version (Debian 12: 3.11).
 */
function compilePython(tree) {
  const lib = readdirSync(join(tree, 'usr/lib')).find((name) => /^python3\.\d+$/.test(name));
  if (!lib) throw new Error('no /usr/lib/python3.N in the tree');
  const host = run('python3', ['-c', 'import sys; print("python%d.%d" % sys.version_info[:2])']).toString().trim();
  if (host !== lib) {
    console.warn(`images: host ${host} cannot byte-compile the guest's ${lib}; its first python3 run compiles what it imports`);
    return;
  }
  run('python3', ['-m', 'compileall', '-q', '-j', '0', '--invalidation-mode', 'unchecked-hash', '-s', tree, '-p', '/', '-x', '/(test|tests|idlelib|lib2to3|tkinter|turtledemo)/', join(tree, 'usr/lib', lib)], { stdio: ['ignore', 'ignore', 'inherit'] });
}

// ---------------------------------------------------------------- layout: boot files first

/**
 * What the boot and `python3 -c 'print(1)'` read (measured by tracing a boot's disk reads): placed first, in
 * this order, so they sit together at the start of the file system. Globs match under the tree; a line that
 * matches nothing is an error (a package changed its files).
 */
const BOOT_FILES = [
  'usr/bin/busybox', 'etc/inittab', 'etc/qcow86/rcS', 'etc/qcow86/root-shell', 'usr/bin/dash', 'usr/bin/bash', 'usr/bin/mount',
  'usr/lib/i386-linux-gnu/ld-linux.so.2', 'usr/lib/ld-linux.so.2', 'usr/lib/i386-linux-gnu/libc.so.6', 'usr/lib/i386-linux-gnu/libtinfo.so.6*',
  'usr/lib/i386-linux-gnu/libmount.so.1*', 'usr/lib/i386-linux-gnu/libblkid.so.1*', 'usr/lib/i386-linux-gnu/libselinux.so.1', 'usr/lib/i386-linux-gnu/libpcre2-8.so.0*',
  'etc/hostname', 'etc/passwd', 'etc/group', 'etc/profile', 'etc/bash.bashrc', 'root/.profile', 'root/.bashrc', 'usr/lib/terminfo/l/linux', 'usr/lib/terminfo/v/vt102',
  'etc/inputrc', 'usr/bin/python3.11', 'usr/lib/i386-linux-gnu/libm.so.6', 'usr/lib/i386-linux-gnu/libz.so.1*', 'usr/lib/i386-linux-gnu/libexpat.so.1*',
  'usr/lib/python3.11/os.py', 'usr/lib/python3.11/site.py', 'usr/lib/python3.11/__pycache__/*.pyc', 'usr/lib/python3.11/encodings/__init__.py',
  'usr/lib/python3.11/encodings/__pycache__/*.pyc', 'usr/lib/python3.11/collections/__pycache__/*.pyc', 'usr/lib/python3.11/importlib/__pycache__/*.pyc',
];

/** The tree's paths matched by BOOT_FILES, in order (each once). */
function bootFiles(tree) {
  const all = listTree(tree);
  const seen = new Set();
  const out = [];
  for (const pattern of BOOT_FILES) {
    const re = new RegExp(`^${pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '[^/]*')}$`);
    const matches = all.filter((path) => re.test(path) && !lstatSync(join(tree, path)).isSymbolicLink() && lstatSync(join(tree, path)).isFile());
    if (matches.length === 0 && !pattern.includes('ld-linux.so.2')) throw new Error(`images: boot file pattern '${pattern}' matches nothing in the Debian tree`);
    for (const path of matches) {
      if (seen.has(path)) continue;
      seen.add(path);
      out.push(path);
    }
  }
  return out;
}

/**
 * mke2fs -d copies a tree in name order, allocating blocks as it goes. Hard links to the boot files under a
 * directory that sorts first put their data first; the extra names are removed afterwards, leaving the files
 * where they are needed and the data where it is read fastest.
 */
const STAGING = '.0-boot-order';

function stageBootFiles(tree) {
  const files = bootFiles(tree);
  const dir = join(tree, STAGING);
  mkdirSync(dir);
  files.forEach((path, index) => linkSync(join(tree, path), join(dir, String(index).padStart(4, '0'))));
  // Each file's link count without the staging name, to restore once that name is gone.
  return files.map((path) => ({ path, links: lstatSync(join(tree, path)).nlink - 1 }));
}

function unstageBootFiles(ext4, staged, script) {
  // debugfs' unlink removes a name and leaves the inode alone: its link count is set back by hand.
  const commands = staged.flatMap(({ path, links }, index) => [`unlink /${STAGING}/${String(index).padStart(4, '0')}`, `sif "/${path}" links_count ${links}`]);
  commands.push(`rmdir /${STAGING}`);
  writeFileSync(script, commands.join('\n') + '\n');
  run('debugfs', ['-w', '-f', script, ext4], { stdio: ['ignore', 'ignore', 'pipe'] });
  // The file system must be exactly consistent afterwards.
  run('e2fsck', ['-fn', ext4], { stdio: ['ignore', 'ignore', 'pipe'] });
}

// ---------------------------------------------------------------- entry points

export const DEBIAN_OUTPUTS = ['debian.qcow2', 'debian.json'];

export async function buildDebian({ outDir = DEFAULT_OUT, update = false } = {}) {
  const started = Date.now();
  let last = started;
  /** Logs how long each step took (QCOW86_IMAGES_TIMES=1): where a build's minutes go. */
  const timed = (label) => {
    if (process.env.QCOW86_IMAGES_TIMES) console.log(`images: ${label} ${((Date.now() - last) / 1000).toFixed(1)} s`);
    last = Date.now();
  };
  ensurePackages([...HOST_PACKAGES]);
  mkdirSync(WORK, { recursive: true });
  mkdirSync(outDir, { recursive: true });
  aptUpdate(update);
  const { packages: bootPackages, kver, boot } = defaultBootFiles(outDir) ?? buildBootFiles(WORK);
  timed('boot files');
  const packages = resolveClosure();
  const debs = fetchAll(packages);
  timed('packages resolved and fetched');

  const tree = join(WORK, 'rootfs');
  unpackInto(tree, debs);
  timed('unpacked');
  configure(tree, packages, debs);
  timed('configured');
  compilePython(tree);
  timed('python byte-compiled');
  const staged = stageBootFiles(tree);
  pinTimes(tree);
  rmSync(join(WORK, 'root.ext4'), { force: true });
  const fat = join(WORK, 'boot.fat');
  // The default guest's kernel and initramfs; its own syslinux.cfg, naming this root's label.
  const ownBoot = join(WORK, 'boot');
  rmSync(ownBoot, { recursive: true, force: true });
  mkdirSync(ownBoot, { recursive: true });
  for (const name of ['vmlinuz', 'initrd.gz']) copyFileSync(join(boot, name), join(ownBoot, name));
  writeFileSync(join(ownBoot, 'syslinux.cfg'), syslinuxConfig(kernelCmdline(ROOT_LABEL)));
  pinTimes(ownBoot);
  buildFat(['vmlinuz', 'initrd.gz', 'syslinux.cfg'].map((name) => join(ownBoot, name)), fat, LAYOUT.fatSize);
  const raw = join(WORK, 'disk.raw');
  // The partition table, boot code and boot partition first; the root file system is then made in place.
  assembleDisk(fat, undefined, raw, LAYOUT);
  timed('boot partition');
  // mke2fs's default inode count for the size; a 16 MiB journal.
  buildExt4(tree, raw, { sizeBytes: LAYOUT.rootSize, inodes: 0, journalMiB: 16, label: ROOT_LABEL, offset: LAYOUT.rootStart });
  timed('ext4 made');
  unstageBootFiles(fileSystemAt(raw, LAYOUT.rootStart), staged, join(WORK, 'unstage-commands'));
  timed('boot files unstaged and checked');

  const image = join(outDir, 'debian.qcow2');
  const writer = convertToCompressedQcow2(raw, image);
  timed('converted to compressed qcow2');
  const manifest = {
    recipe: RECIPE,
    description: 'qcow86 Debian guest: Debian 12 i386 userland (bash, coreutils, util-linux, procps, less, nano, python3, e2fsprogs) on a 2 GiB disk',
    packages: { ...bootPackages, ...packages, seabios: hostPackageVersion('seabios'), syslinux: hostPackageVersion('syslinux') },
    kernel: kver,
    writer,
    virtualSize: virtualSizeOf(image),
    raw: { path: relative(root, raw), sha256: sha256(raw), size: statSync(raw).size },
    files: { 'debian.qcow2': { sha256: sha256(image), size: statSync(image).size } },
  };
  writeFileSync(join(outDir, 'debian.json'), JSON.stringify(manifest, null, 2) + '\n');
  writeGuestList(outDir);
  console.log(`images: built ${relative(root, image)} (${manifest.files['debian.qcow2'].size} bytes, raw sha256 ${manifest.raw.sha256.slice(0, 16)}…) in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return manifest;
}

/** Builds the Debian guest only when it is missing or was made by an older recipe (tests, benchmarks). */
export async function ensureDebian({ outDir = DEFAULT_OUT } = {}) {
  const manifestPath = join(outDir, 'debian.json');
  if (DEBIAN_OUTPUTS.every((name) => existsSync(join(outDir, name)))) {
    const manifest = JSON.parse(readFileSync(manifestPath, 'utf8'));
    if (manifest.recipe === RECIPE) return manifest;
    console.log(`images: rebuilding the Debian guest (built by recipe ${manifest.recipe}, this checkout has ${RECIPE})`);
  } else {
    console.log('images: building the Debian guest (a few minutes the first time: ~40 MB of packages are downloaded)');
  }
  return buildDebian({ outDir });
}


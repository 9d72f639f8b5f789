#!/usr/bin/env node
// Builds the default guest: a small 32-bit Linux disk from Debian packages, without root-only steps (no mounts,
// no loop devices). Layout: MBR (syslinux mbr.bin) + FAT16 partition (syslinux, kernel, initramfs) + ext4 root
// with busybox. Shell on ttyS0 and tty1; `poweroff` ends with the kernel's "reboot: Power down".
//
// Outputs (public/images/, git-ignored): base.qcow2 (deflate-compressed qcow2), bios.bin, vgabios-stdvga.bin,
// vmlinuz, initrd.gz (for direct kernel boots) and manifest.json. Intermediates and downloaded .debs live in
// .cache/ so a rebuild costs seconds. The bytes are reproducible for the same package versions: every time
// stamp, UUID, volume id and ordering is pinned (see the comments at each step).
//
// Usage: node images/build.mjs [--update] [--force] [default] [debian]
//   --update  refresh the i386 package index (else a cached index is reused, which keeps versions stable)
//   --force   rebuild even when the outputs exist
//   default, debian  which guests (default: the default guest; debian.mjs builds the Debian guest)
// Shared pieces (tools with pinned times, Debian packages, trees) are in common.mjs.
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ensurePackages } from '../scripts/system-deps.mjs';
import {
  CACHE, EPOCH, FIXED_ENV, MiB, aptUpdate, candidateVersion, fetchDeb, findFile, hostPackageVersion, listTree, pinTimes, resolveKernelPackage, root, run, sha256, unpack,
  writeExecutable,
} from './common.mjs';

// The pieces the Debian guest's build and the tests share live in common.mjs; these names stay importable here.
export { debianPackage, root, CACHE, EPOCH, MiB } from './common.mjs';

const WORK = join(CACHE, 'images');
export const DEFAULT_OUT = join(root, 'public/images');

export const EXT4_UUID = '5ec0c086-0000-4000-8000-00000000c086';
const FAT_VOLUME_ID = 'c0860086';
const MBR_LABEL_ID = '0xc0860086';

const FAT_START = 1 * MiB;
const FAT_SIZE = 12 * MiB;
const ROOT_START = FAT_START + FAT_SIZE;
const ROOT_SIZE = 16 * MiB;
const DISK_SIZE = ROOT_START + ROOT_SIZE;

export const HOST_PACKAGES = ['seabios', 'mtools', 'syslinux', 'syslinux-common', 'dosfstools', 'fdisk', 'cpio', 'kmod', 'e2fsprogs', 'qemu-utils'];

/**
 * The modules the Debian 686 kernel needs to reach an ext4 root on an IDE disk (ata_piix) or a virtio-blk disk
 * (virtio_pci, virtio_blk), in dependency order: the .deb ships no modules.dep, so the initramfs loads them with
 * insmod in exactly this order.
 */
const MODULES = ['scsi_common', 'scsi_mod', 'libata', 'ata_piix', 'crc64', 'crc64-rocksoft', 'crct10dif_common', 'crc-t10dif', 't10-pi',
  'sd_mod', 'virtio', 'virtio_ring', 'virtio_pci_legacy_dev', 'virtio_pci_modern_dev', 'virtio_pci', 'virtio_blk',
  'crc16', 'mbcache', 'jbd2', 'crc32c_generic', 'ext4'];

/** The root file system's label: the initramfs finds it by label, so the same disk boots on IDE (sda) and virtio (vda). */
export const ROOT_LABEL = 'qcow86-root';

/**
 * The kernel command line of a guest whose root file system has ext4 label `label`. `quiet cryptomgr.notests`
 * saves ~6 s of boot (crypto self-tests); the last console= is /dev/console.
 */
export function kernelCmdline(label = ROOT_LABEL) {
  return `console=tty1 console=ttyS0,115200 root=LABEL=${label} rw quiet cryptomgr.notests tsc=reliable mitigations=off random.trust_cpu=on`;
}

export const KERNEL_CMDLINE = kernelCmdline();

/**
 * Busybox's applet names, read from the binary itself: it holds them as one sorted NUL-separated table starting
 * "[\0[[\0" and ending with an empty name. (Running `busybox --list` would need IA-32 support on the host.)
 */
function busyboxApplets(busybox) {
  const bytes = readFileSync(busybox);
  const start = bytes.indexOf(Buffer.from('[\0[[\0', 'latin1'));
  if (start < 0) throw new Error(`no applet table in ${busybox}`);
  const names = [];
  for (let at = start; ;) {
    const end = bytes.indexOf(0, at);
    if (end === at) break;
    names.push(bytes.subarray(at, end).toString('latin1'));
    at = end + 1;
  }
  if (names.length < 50 || !names.includes('sh') || !names.includes('init') || !names.includes('switch_root')) {
    throw new Error(`unexpected applet table in ${busybox}: ${names.slice(0, 20).join(' ')}`);
  }
  return names;
}

/** Every applet as a symlink in /bin; /sbin and /usr/{bin,sbin} point at /bin, so init and PATH find them all. */
function installBusybox(busybox, tree) {
  mkdirSync(join(tree, 'bin'), { recursive: true });
  mkdirSync(join(tree, 'usr'), { recursive: true });
  copyFileSync(busybox, join(tree, 'bin/busybox'));
  chmodSync(join(tree, 'bin/busybox'), 0o755);
  for (const applet of busyboxApplets(busybox)) {
    if (applet !== 'busybox') symlinkSync('busybox', join(tree, 'bin', applet));
  }
  symlinkSync('bin', join(tree, 'sbin'));
  symlinkSync('../bin', join(tree, 'usr/bin'));
  symlinkSync('../bin', join(tree, 'usr/sbin'));
}

const INIT_SCRIPT = (modules) => `#!/bin/sh
# initramfs: load the disk and ext4 modules, find the root named by root= (a device, LABEL=... or UUID=..., so the
# disk boots on IDE and on virtio alike), mount it and hand over to busybox init.
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in ${modules.join(' ')}; do
  insmod /lib/modules/$m.ko || echo "initramfs: insmod $m failed"
done
root=LABEL=${ROOT_LABEL}
for arg in $(cat /proc/cmdline); do
  case "$arg" in root=*) root="\${arg#root=}" ;; esac
done
dev=
i=0
while [ $i -lt 100 ]; do
  case "$root" in
    LABEL=*|UUID=*) dev=$(findfs "$root" 2>/dev/null) ;;
    *) dev=$root ;;
  esac
  [ -n "$dev" ] && [ -b "$dev" ] && break
  sleep 0.1; i=$((i + 1))
done
if [ -z "$dev" ] || [ ! -b "$dev" ]; then
  echo "initramfs: no disk holds the root $root; dropping to a shell"
  exec sh
fi
# A read-only disk (a read-only tab on virtio) still boots, with the root read-only.
if ! mount -t ext4 -o rw "$dev" /newroot 2>/dev/null; then
  if ! mount -t ext4 -o ro "$dev" /newroot; then
    echo "initramfs: cannot mount $dev; dropping to a shell"
    exec sh
  fi
  echo "initramfs: $dev is read-only: the root file system is mounted read-only"
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/init
`;

const INITTAB = `# busybox init: a root shell on the serial console and on the VGA console, nothing else.
::sysinit:/bin/mount -t proc proc /proc
::sysinit:/bin/mount -t sysfs sysfs /sys
::sysinit:/bin/mount -t tmpfs tmpfs /tmp
::sysinit:/bin/hostname qcow86
ttyS0::respawn:-/bin/sh
tty1::respawn:-/bin/sh
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
`;

function buildInitramfs(kernelTree, kver, busybox, dir, out) {
  rmSync(dir, { recursive: true, force: true });
  for (const sub of ['dev', 'proc', 'sys', 'newroot', 'lib/modules']) mkdirSync(join(dir, sub), { recursive: true });
  installBusybox(busybox, dir);
  const moduleRoot = join(kernelTree, 'lib/modules', kver);
  for (const name of MODULES) {
    // Module file names use - or _ inconsistently (crc-t10dif.ko, scsi_mod.ko): match either spelling.
    const wanted = name.replace(/[-_]/g, '[-_]');
    const file = findFile(moduleRoot, (entry) => new RegExp(`^${wanted}\\.ko$`).test(entry));
    if (!file) throw new Error(`module ${name}.ko not found under ${moduleRoot}`);
    copyFileSync(file, join(dir, 'lib/modules', `${name}.ko`));
  }
  writeExecutable(join(dir, 'init'), INIT_SCRIPT(MODULES));
  pinTimes(dir);
  const list = listTree(dir).join('\n') + '\n';
  const cpio = execFileSync('cpio', ['--quiet', '-o', '-H', 'newc', '--reproducible', '-R', '0:0'], { cwd: dir, input: list, maxBuffer: 256 * MiB });
  writeFileSync(out, execFileSync('gzip', ['-n', '-9'], { input: cpio, maxBuffer: 256 * MiB }));
}

function buildRootTree(busybox, dir) {
  rmSync(dir, { recursive: true, force: true });
  for (const sub of ['dev', 'proc', 'sys', 'tmp', 'root', 'etc', 'mnt']) mkdirSync(join(dir, sub), { recursive: true });
  installBusybox(busybox, dir);
  writeFileSync(join(dir, 'etc/inittab'), INITTAB);
  writeFileSync(join(dir, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/sh\n');
  writeFileSync(join(dir, 'etc/group'), 'root:x:0:\n');
  writeFileSync(join(dir, 'etc/profile'), 'export PATH=/bin:/sbin:/usr/bin:/usr/sbin\nexport HOME=/root\ncd /root\nPS1=\'# \'\n');
  writeFileSync(join(dir, 'etc/fstab'), `LABEL=${ROOT_LABEL} / ext4 rw 0 1\n`);
  chmodSync(join(dir, 'tmp'), 0o1777);
  chmodSync(join(dir, 'root'), 0o700);
  pinTimes(dir);
}

// ---------------------------------------------------------------- file systems and disk

/** An ext4 image of `tree`; the options are the Debian guest's (the default guest takes the defaults). */
/**
 * An ext4 image of `tree` in `out`; with `offset`, inside the disk image `out` at that byte (its partition), which
 * saves copying a mostly empty file system of gigabytes into the disk. The options are the Debian guest's (the
 * default guest takes the defaults).
 */
export function buildExt4(tree, out, { sizeBytes = ROOT_SIZE, inodes = 1024, journalMiB = 1, label = ROOT_LABEL, offset } = {}) {
  if (offset === undefined) rmSync(out, { force: true });
  // A journal (1 MiB, the smallest), because a closed or reloaded tab is a power cut for the guest: the kernel
  // replays the journal on the next mount, where a journal-less ext4 came back with errors (seen after a reload:
  // 'ext4lazyinit: bad block bitmap checksum'). Inode tables and the journal are zeroed here, not lazily by the
  // guest's ext4lazyinit thread after every first mount: that thread wrote to the overlay behind the user's back,
  // after their sync. The zeros cost nothing in the base (qemu-img convert leaves zero clusters unallocated).
  // -N 1024 because busybox's few hundred symlinks need inodes.
  run('mke2fs', ['-q', '-F', '-t', 'ext4', '-J', `size=${journalMiB}`, ...(inodes ? ['-N', String(inodes)] : []), '-L', label, '-U', EXT4_UUID,
    '-E', `hash_seed=${EXT4_UUID},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0${offset === undefined ? '' : `,offset=${offset}`}`, '-d', tree, out, `${sizeBytes / 1024}k`]);
  // mke2fs -d copies each source file's ctime, which touch cannot set: pin it (and crtime) inode by inode.
  const commands = ['/', ...listTree(tree).map((rel) => `/${rel}`)]
    .flatMap((path) => [`sif "${path}" ctime @${EPOCH}`, `sif "${path}" crtime @${EPOCH}`, `sif "${path}" atime @${EPOCH}`, `sif "${path}" mtime @${EPOCH}`]);
  const script = `${out}.debugfs-commands`;
  writeFileSync(script, commands.join('\n') + '\n');
  run('debugfs', ['-w', '-f', script, fileSystemAt(out, offset)], { stdio: ['ignore', 'ignore', 'pipe'] });
}

/** How e2fsprogs' tools name a file system inside a disk image: FILE?offset=BYTES. */
export function fileSystemAt(file, offset) {
  return offset === undefined ? file : `${file}?offset=${offset}`;
}

export function buildFat(files, out, sizeBytes = FAT_SIZE) {
  rmSync(out, { force: true });
  run('mkfs.fat', ['-F', '16', '-n', 'QCOW86', '-i', FAT_VOLUME_ID, '--invariant', '-C', out, String(sizeBytes / 1024)], { stdio: 'ignore' });
  // mcopy -m keeps the (pinned) source mtimes instead of the current time.
  run('mcopy', ['-m', '-i', out, ...files, '::/'], { env: { ...process.env, ...FIXED_ENV, MTOOLS_SKIP_CHECK: '1' } });
  run('syslinux', ['--install', out]);
}

/** syslinux.cfg booting vmlinuz and initrd.gz with `cmdline`. */
export function syslinuxConfig(cmdline = KERNEL_CMDLINE) {
  return `SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND ${cmdline}
`;
}

/** Where the partitions go; the default guest's layout unless given (the Debian guest has a bigger disk). */
const DEFAULT_LAYOUT = { fatStart: FAT_START, fatSize: FAT_SIZE, rootStart: ROOT_START, rootSize: ROOT_SIZE, diskSize: DISK_SIZE };

export function assembleDisk(fat, ext4, out, layout = DEFAULT_LAYOUT) {
  const { fatStart, fatSize, rootStart, rootSize, diskSize } = layout;
  rmSync(out, { force: true });
  run('truncate', ['-s', String(diskSize), out]);
  const table = `label: dos\nlabel-id: ${MBR_LABEL_ID}\nunit: sectors\n\n` +
    `start=${fatStart / 512}, size=${fatSize / 512}, type=6, bootable\n` +
    `start=${rootStart / 512}, size=${rootSize / 512}, type=83\n`;
  execFileSync('sfdisk', ['--no-reread', '--no-tell-kernel', '-q', out], { input: table, stdio: ['pipe', 'ignore', 'inherit'] });
  const mbr = findFile('/usr/lib/syslinux/mbr', (name) => name === 'mbr.bin');
  // Only the boot code: bytes 440.. hold the disk signature and the partition table sfdisk just wrote.
  run('dd', [`if=${mbr}`, `of=${out}`, 'bs=440', 'count=1', 'conv=notrunc'], { stdio: 'ignore' });
  run('dd', [`if=${fat}`, `of=${out}`, 'bs=1M', `seek=${fatStart / MiB}`, 'conv=notrunc'], { stdio: 'ignore' });
  // No ext4: the caller makes the file system in place (buildExt4 with an offset).
  if (ext4) run('dd', [`if=${ext4}`, `of=${out}`, 'bs=1M', `seek=${rootStart / MiB}`, 'conv=notrunc'], { stdio: 'ignore' });
}

/**
 * The final form of the disk: a deflate-compressed qcow2 written by our own engine, the way users will make
 * theirs. This is the one place that turns the raw disk into base.qcow2.
 */
export function convertToCompressedQcow2(raw, out) {
  rmSync(out, { force: true });
  if (existsSync(join(root, 'dist/node/cli.js'))) {
    const ours = spawnSync(process.execPath, [join(root, 'bin/qcow86.js'), 'convert', '-c', '-O', 'qcow2', raw, out], { stdio: ['ignore', 'inherit', 'pipe'], encoding: 'utf8' });
    if (ours.status === 0) return 'qcow86 convert -c -O qcow2';
    console.warn(`images: qcow86 convert -c -O qcow2 failed: ${ours.stderr.trim()}`);
    rmSync(out, { force: true });
  }
  // TODO(engine): remove this fallback once `qcow86 convert -c -O qcow2` is reliable; the base must come from our engine.
  console.warn('\n!!! images: WARNING: base.qcow2 is written by qemu-img instead of our engine (temporary fallback)\n');
  run('qemu-img', ['convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zlib', raw, out], { stdio: 'inherit' });
  return 'qemu-img convert -c -O qcow2 (fallback)';
}

export function virtualSizeOf(image) {
  return JSON.parse(run('qemu-img', ['info', '--output=json', image]).toString())['virtual-size'];
}

/**
 * The boot partition's files, shared by every guest: the Debian 686 kernel, an initramfs (busybox, the disk and
 * ext4 modules, an init that mounts root= and switches to its /sbin/init) and syslinux.cfg, in `work`/boot.
 */
export function buildBootFiles(work) {
  const kernelPackage = resolveKernelPackage();
  const packages = {};
  for (const name of [kernelPackage, 'busybox-static']) packages[name] = candidateVersion(name);
  const kernelTree = join(work, 'kernel');
  const busyboxTree = join(work, 'busybox');
  unpack(fetchDeb(kernelPackage, packages[kernelPackage]), kernelTree);
  unpack(fetchDeb('busybox-static', packages['busybox-static']), busyboxTree);
  const kver = readdirSync(join(kernelTree, 'lib/modules'))[0];
  const busybox = join(busyboxTree, 'bin/busybox');

  const boot = join(work, 'boot');
  rmSync(boot, { recursive: true, force: true });
  mkdirSync(boot, { recursive: true });
  copyFileSync(join(kernelTree, 'boot', `vmlinuz-${kver}`), join(boot, 'vmlinuz'));
  buildInitramfs(kernelTree, kver, busybox, join(work, 'initramfs'), join(boot, 'initrd.gz'));
  writeFileSync(join(boot, 'syslinux.cfg'), syslinuxConfig());
  pinTimes(boot);
  return { packages, kver, boot, busybox };
}

/**
 * The guests this checkout can build, for the tab's guest list (public/images/guests.json, rewritten by every
 * images build): which are built here, and the command that builds the others. `boot: 'linux'` tells the tab
 * what to expect on the console (kernel messages, then a shell prompt); memory is what the tab gives the guest.
 */
export const GUESTS = [
  { id: 'default', name: 'Default guest (Linux, busybox)', file: 'base.qcow2', manifest: 'manifest.json', build: 'npm run images', boot: 'linux', memoryMiB: 64 },
  { id: 'debian', name: 'Debian 12 (bash, python3, 2 GiB disk)', file: 'debian.qcow2', manifest: 'debian.json', build: 'npm run images -- debian', boot: 'linux', memoryMiB: 128 },
];

export function writeGuestList(outDir = DEFAULT_OUT) {
  const guests = GUESTS.map(({ manifest, ...guest }) => ({ ...guest, built: existsSync(join(outDir, guest.file)) && existsSync(join(outDir, manifest)) }));
  writeFileSync(join(outDir, 'guests.json'), JSON.stringify({ guests }, null, 2) + '\n');
}

/**
 * The default guest's boot files when its build left them in .cache (ensureImages has run): the Debian guest
 * boots from the same kernel, initramfs and syslinux.cfg, and unpacking the kernel again is most of a build.
 */
export function defaultBootFiles(outDir = DEFAULT_OUT) {
  const boot = join(WORK, 'boot');
  const manifestPath = join(outDir, 'manifest.json');
  if (!existsSync(manifestPath) || !['vmlinuz', 'initrd.gz', 'syslinux.cfg'].every((name) => existsSync(join(boot, name)))) return undefined;
  const manifest = JSON.parse(readFileSync(manifestPath, 'utf8'));
  if (manifest.recipe !== RECIPE || sha256(join(boot, 'initrd.gz')) !== manifest.files['initrd.gz']?.sha256) return undefined;
  const packages = Object.fromEntries(Object.entries(manifest.packages).filter(([name]) => name.startsWith('linux-image-') || name === 'busybox-static'));
  return { packages, kver: manifest.kernel, boot };
}

// ---------------------------------------------------------------- entry points

/**
 * Raise when a change here changes the guest: ensureImages rebuilds outputs made by an older recipe. 2: ext4
 * journal. 3: virtio_pci/virtio_blk in the initramfs, root found by label.
 */
const RECIPE = 3;

export const OUTPUT_FILES = ['base.qcow2', 'bios.bin', 'vgabios-stdvga.bin', 'vmlinuz', 'initrd.gz', 'manifest.json'];

/** Builds everything into outDir (default public/images). Returns the manifest. */
export async function buildImages({ outDir = DEFAULT_OUT, update = false } = {}) {
  const started = Date.now();
  ensurePackages(HOST_PACKAGES);
  mkdirSync(WORK, { recursive: true });
  mkdirSync(outDir, { recursive: true });

  aptUpdate(update);
  const { packages, kver, boot, busybox } = buildBootFiles(WORK);

  buildRootTree(busybox, join(WORK, 'rootfs'));
  buildExt4(join(WORK, 'rootfs'), join(WORK, 'root.ext4'));
  buildFat(['vmlinuz', 'initrd.gz', 'syslinux.cfg'].map((name) => join(boot, name)), join(WORK, 'boot.fat'));
  const raw = join(WORK, 'disk.raw');
  assembleDisk(join(WORK, 'boot.fat'), join(WORK, 'root.ext4'), raw);

  const base = join(outDir, 'base.qcow2');
  const writer = convertToCompressedQcow2(raw, base);
  for (const name of ['bios.bin', 'vgabios-stdvga.bin']) copyFileSync(join('/usr/share/seabios', name), join(outDir, name));
  copyFileSync(join(boot, 'vmlinuz'), join(outDir, 'vmlinuz'));
  copyFileSync(join(boot, 'initrd.gz'), join(outDir, 'initrd.gz'));

  const manifest = {
    recipe: RECIPE,
    description: 'qcow86 default guest: Debian i386 kernel + busybox, MBR/syslinux/FAT16 boot + ext4 root',
    packages: { ...packages, seabios: hostPackageVersion('seabios'), syslinux: hostPackageVersion('syslinux'), 'syslinux-common': hostPackageVersion('syslinux-common') },
    kernel: kver,
    cmdline: KERNEL_CMDLINE,
    writer,
    virtualSize: virtualSizeOf(base),
    raw: { path: relative(root, raw), sha256: sha256(raw), size: statSync(raw).size },
    files: Object.fromEntries(['base.qcow2', 'bios.bin', 'vgabios-stdvga.bin', 'vmlinuz', 'initrd.gz'].map((name) => {
      const path = join(outDir, name);
      return [name, { sha256: sha256(path), size: statSync(path).size }];
    })),
  };
  writeFileSync(join(outDir, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
  writeGuestList(outDir);
  console.log(`images: built ${relative(root, base)} (${manifest.files['base.qcow2'].size} bytes, raw sha256 ${manifest.raw.sha256.slice(0, 16)}…) in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return manifest;
}

/**
 * Builds only when an output is missing or was built by an older recipe (used by `npm start`, `npm test` and the
 * boot tests): a checkout that pulls a change to the guest gets the new guest, not the one built before it.
 */
export async function ensureImages({ outDir = DEFAULT_OUT } = {}) {
  const missing = OUTPUT_FILES.filter((name) => !existsSync(join(outDir, name)));
  if (missing.length === 0) {
    const manifest = JSON.parse(readFileSync(join(outDir, 'manifest.json'), 'utf8'));
    if (manifest.recipe === RECIPE) {
      if (!existsSync(join(outDir, 'guests.json'))) writeGuestList(outDir);
      return manifest;
    }
    console.log(`images: rebuilding the default guest (built by recipe ${manifest.recipe ?? 1}, this checkout has ${RECIPE})`);
  } else {
    console.log(`images: building the default guest (missing: ${missing.join(', ')})`);
  }
  return buildImages({ outDir });
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const args = process.argv.slice(2);
  const guests = args.filter((arg) => !arg.startsWith('--'));
  const unknown = guests.filter((name) => name !== 'default' && name !== 'debian');
  if (unknown.length) {
    console.error(`images: unknown guest ${unknown.join(', ')} (known: default, debian)`);
    process.exit(2);
  }
  const force = args.includes('--force');
  const update = args.includes('--update');
  // `npm run images` builds the default guest; `npm run images -- debian` the Debian guest (after the default
  // guest's files it shares, when those are missing).
  const action = (async () => {
    if (guests.length === 0 || guests.includes('default')) await (force ? buildImages({ update }) : ensureImages());
    if (guests.includes('debian')) {
      if (!guests.includes('default')) await ensureImages();
      const { buildDebian, ensureDebian } = await import('./debian.mjs');
      await (force ? buildDebian({ update }) : ensureDebian());
    }
  })();
  action.catch((error) => {
    console.error(`images: ${error.message}`);
    process.exit(1);
  });
}

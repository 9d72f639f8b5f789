/**
 * A disk nobody here built, for boot tests: GRUB's rescue image from Debian's grub-rescue-pc package (a hybrid
 * ISO that also boots as a hard disk: a GRUB menu in VGA text mode, read through the BIOS keyboard), converted by
 * qemu-img to a compressed qcow2 and checked by it.
 */
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { debianPackage } from '../../images/build.mjs';
import { qemuCheck, qemuImg } from './qemu.js';

export async function grubRescueDisk(dir: string): Promise<string> {
  const unpacked = join(dir, 'grub-rescue-pc');
  execFileSync('dpkg-deb', ['-x', debianPackage('grub-rescue-pc'), unpacked]);
  const disk = join(dir, 'grub-rescue.qcow2');
  await qemuImg(['convert', '-c', '-O', 'qcow2', join(unpacked, 'usr/lib/grub-rescue/grub-rescue-cdrom.iso'), disk]);
  const check = await qemuCheck(disk);
  if (check.exitCode !== 0) throw new Error(`qemu-img check ${disk} failed: ${JSON.stringify(check.result)}`);
  return disk;
}

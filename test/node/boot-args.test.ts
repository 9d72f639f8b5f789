/**
 * `qcow86 boot --disk-bus`, without booting: the two buses are listed in the help, anything else is a usage
 * error (exit 2) naming the value, and a flag that contradicts a resumed session's bus is refused before anything
 * starts (the boot tests cover the resumes themselves: test/boot/flush.test.ts, session.test.ts).
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { nodeCodecs } from '../../src/io/node.js';
import { createFile, openRw } from '../helpers/engine.js';
import { tempDir } from '../helpers/qemu.js';
import { bootMachine } from '../../src/node/machine.js';
import { storeSession } from '../../src/v86/session.js';
import { qcow86InProcess } from '../cli/cli.js';

describe('qcow86 boot --disk-bus', () => {
  it('is documented, and refuses a bus that is neither ide nor virtio', async () => {
    const help = await qcow86InProcess(['boot', '--help']);
    expect(help.exitCode).toBe(0);
    expect(help.stdout).toMatch(/--disk-bus ide\|virtio/);
    expect(help.stdout).toMatch(/virtio \(virtio-blk, the default/);
    const bad = await qcow86InProcess(['boot', '--disk-bus', 'scsi']);
    expect(bad.exitCode).toBe(2);
    expect(bad.stderr).toMatch(/qcow86 boot: bad --disk-bus 'scsi' \(ide or virtio\)/);
  });

  it('a --disk-bus that contradicts the resumed session is refused before the machine starts', async () => {
    const dir = tempDir('qcow86-boot-args-');
    const path = join(dir, 'disk.qcow2');
    await createFile(path, { size: 16 * 1024 * 1024 });
    const image = await openRw(path);
    // Any blob will do: the refusal comes before anything is restored.
    await storeSession(image, 'on-ide', new Uint8Array(64).fill(1), nodeCodecs(), { machine: { diskBus: 'ide' } });
    await storeSession(image, 'old', new Uint8Array(64).fill(2), nodeCodecs());
    await image.close();
    for (const session of ['on-ide', 'old']) {
      await expect(bootMachine({ overlay: path, resume: session, diskBus: 'virtio' })).rejects.toThrow(new RegExp(`session '${session}' was saved with its disk on ide: it resumes on ide, not on --disk-bus virtio`));
    }
    const refused = await qcow86InProcess(['boot', '--overlay', path, '--resume', 'on-ide', '--disk-bus', 'virtio']);
    expect(refused.exitCode).toBe(1);
    expect(refused.stderr).toMatch(/disk\.qcow2: session 'on-ide' was saved with its disk on ide/);
  });
});

/**
 * VM state across snapshots as sessions use it (save, revert, save again): the second save must not trip the
 * overlap guard over the snapshot table it just replaced, and qemu-img must find the image clean with both VM
 * states readable.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { qemuImg, sha256Bytes, tempDir } from '../helpers/qemu.js';
import { createFile, expectClean, openRw, pattern } from '../helpers/engine.js';

describe('snapshots with VM state', () => {
  it('save, apply, save again: clean, both VM states intact, disk as of each snapshot', { timeout: 180_000 }, async () => {
    const path = join(tempDir(), 'vm.qcow2');
    await createFile(path, { size: 32 * 1024 * 1024 });
    const first = pattern(3 * 1024 * 1024 + 123, 7);
    const second = pattern(2 * 1024 * 1024 + 5, 9);
    let image = await openRw(path);
    await image.write(0, pattern(65536, 1));
    await image.createSnapshot('a', { vmState: first });
    await image.write(65536, pattern(65536, 2));
    await image.applySnapshot('a');
    // The old table is freed here and its cluster reused for the L2 copy that drops the VM state.
    await image.createSnapshot('b', { vmState: second });
    await image.write(0, pattern(65536, 3));
    await image.close();
    await expectClean(path);

    image = await openRw(path);
    // Hashes: element-wise equality of megabyte arrays is slow in the matcher.
    expect(sha256Bytes(await image.readVmState('a'))).toBe(sha256Bytes(first));
    expect(sha256Bytes(await image.readVmState('b'))).toBe(sha256Bytes(second));
    expect((await image.read(0, 65536))[0]).toBe(3);
    await image.close();
    const info = JSON.parse(await qemuImg(['info', '--output=json', path]));
    expect(info.snapshots.map((s: { name: string; 'vm-state-size': number }) => [s.name, s['vm-state-size']])).toEqual([['a', first.length], ['b', second.length]]);
  });
});

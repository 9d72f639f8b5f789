import { describe, expect, it } from 'vitest';
import { readFile, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { ioCommand, makeImage, qemuCheck, qemuConvertToRaw, qemuImg, qemuInfo, qemuMap, runQemuImg, sha256, sha256Bytes, tempDir } from './qemu.js';

// The helper is the oracle every engine test leans on: check it does what it says.
describe('test/helpers/qemu', () => {
  it('makes images with the requested options and writes', async () => {
    const path = await makeImage({ size: '4M', clusterSize: 16384, refcountBits: 8, extendedL2: true, compressionType: 'zstd', lazyRefcounts: true }, [
      { offset: 0, length: 8192, pattern: 0x5a },
      { offset: 8192, length: 4096, zero: true },
      { offset: 16384, length: 4096, pattern: 0x33 },
      { offset: 65536, length: 65536, pattern: 0x11, compressed: true },
      // qcow2 only discards whole clusters: this drops cluster 0 and with it the pattern and zero writes.
      { offset: 0, length: 16384, discard: true },
    ]);
    const info = await qemuInfo(path);
    expect(info['cluster-size']).toBe(16384);
    expect(info['virtual-size']).toBe(4 * 1024 * 1024);
    expect(info['format-specific'].data).toMatchObject({ 'refcount-bits': 8, 'extended-l2': true, 'compression-type': 'zstd', 'lazy-refcounts': true });
    const raw = await qemuConvertToRaw(path);
    expect(raw.length).toBe(4 * 1024 * 1024);
    expect(raw.subarray(0, 16384).every((b) => b === 0)).toBe(true);
    expect(raw.subarray(16384, 20480).every((b) => b === 0x33)).toBe(true);
    expect(raw.subarray(65536, 131072).every((b) => b === 0x11)).toBe(true);
    const map = await qemuMap(path);
    expect(map.find((e) => e.start <= 16384 && e.start + e.length > 16384)).toMatchObject({ data: true, present: true });
    expect(map.find((e) => e.start === 0)).toMatchObject({ data: false });
  });

  it('retries qemu-img only on the LUKS key-slot calibration failure', async () => {
    // A stand-in qemu-img first in PATH: fails twice with QEMU's calibration message, then succeeds; a second
    // mode fails with another message, which must not be retried.
    const dir = tempDir();
    const counter = join(dir, 'count');
    await writeFile(join(dir, 'qemu-img'), `#!/bin/sh
n=$(cat ${counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > ${counter}
if [ "$1" = other ]; then echo "qemu-img: some other failure" >&2; exit 1; fi
if [ $n -le 2 ]; then echo "qemu-img: x.qcow2: Unable to get accurate CPU usage" >&2; exit 1; fi
echo created
`, { mode: 0o755 });
    const savedPath = process.env.PATH;
    process.env.PATH = `${dir}:${savedPath}`;
    try {
      expect(await qemuImg(['create'])).toBe('created\n');
      expect(await readFile(counter, 'utf8')).toBe('3\n');
      await writeFile(counter, '0');
      const other = await runQemuImg(['other']);
      expect(other.exitCode).toBe(1);
      expect(await readFile(counter, 'utf8')).toBe('1\n');
    } finally {
      process.env.PATH = savedPath;
    }
  });

  it('spells qemu-io commands', () => {
    expect(ioCommand({ offset: 1, length: 2, pattern: 3 })).toBe('write -P 3 1 2');
    expect(ioCommand({ offset: 0, length: 65536, pattern: 3, compressed: true })).toBe('write -c -P 3 0 65536');
    expect(ioCommand({ offset: 1, length: 2, zero: true, unmap: true })).toBe('write -z -u 1 2');
    expect(ioCommand({ offset: 1, length: 2, discard: true })).toBe('discard 1 2');
  });

  it('records backing files and reads the chain', async () => {
    const dir = tempDir();
    await makeImage({ path: join(dir, 'base.qcow2'), size: '1M' }, [{ offset: 0, length: 512, pattern: 1 }]);
    const top = await makeImage({ path: join(dir, 'top.qcow2'), size: '2M', backing: 'base.qcow2', backingFormat: 'qcow2' });
    const chain = await qemuInfo(top, { backingChain: true });
    expect(chain).toHaveLength(2);
    expect(chain[0]['backing-filename']).toBe('base.qcow2');
    expect(chain[0]['backing-filename-format']).toBe('qcow2');
  });

  it('returns check results with their exit codes: clean 0, leaks 3, corruption 2', async () => {
    const path = await makeImage({ size: '1M' }, [{ offset: 0, length: 65536, pattern: 7 }]);
    expect(await qemuCheck(path)).toMatchObject({ exitCode: 0, result: { 'check-errors': 0 } });
    const bytes = new Uint8Array(await readFile(path));
    const view = new DataView(bytes.buffer);
    const l1 = Number(view.getBigUint64(40));
    const l1Entry = view.getBigUint64(l1);
    view.setBigUint64(l1, 0n); // the L2 table and its data cluster are now referenced by nothing
    await writeFile(path, bytes);
    const leaky = await qemuCheck(path);
    expect(leaky.exitCode).toBe(3);
    expect(leaky.result.leaks).toBe(2);
    view.setBigUint64(l1, l1Entry);
    const refcountTable = Number(view.getBigUint64(48));
    const block = Number(view.getBigUint64(refcountTable));
    view.setUint16(block, 0); // the header cluster's refcount: 0 while in use is a corruption
    await writeFile(path, bytes);
    const corrupt = await qemuCheck(path);
    expect(corrupt.exitCode).toBe(2);
    expect(corrupt.result.corruptions).toBeGreaterThan(0);
  });

  it('converts to raw bytes or to a file, and hashes both the same', async () => {
    const path = await makeImage({ size: '1M' }, [{ offset: 4096, length: 100, pattern: 0x42 }]);
    const out = join(tempDir(), 'out.raw');
    expect(await qemuConvertToRaw(path, { out })).toBe(out);
    expect(existsSync(out)).toBe(true);
    expect(await sha256(out)).toBe(sha256Bytes(await qemuConvertToRaw(path)));
    expect(await sha256(out)).not.toBe(sha256Bytes(new Uint8Array(1024 * 1024)));
  });

  it('throws with the tool’s message on failure', async () => {
    await expect(qemuImg(['info', join(tempDir(), 'missing.qcow2')])).rejects.toThrow(/exited with 1:[\s\S]*Could not open/);
  });
});

describe('test/helpers/qemu external data files', () => {
  it('creates a relative data file beside the image, where qemu-img will look for it', async () => {
    const dir = tempDir();
    const path = await makeImage({ path: join(dir, 'd.qcow2'), size: '1M', dataFile: 'd.data', dataFileRaw: true }, [{ offset: 0, length: 4096, pattern: 0x44 }]);
    expect(existsSync(join(dir, 'd.data'))).toBe(true);
    const info = await qemuInfo(path);
    expect(info['format-specific'].data).toMatchObject({ 'data-file': 'd.data', 'data-file-raw': true });
    expect((await readFile(join(dir, 'd.data'))).subarray(0, 4096).every((b) => b === 0x44)).toBe(true);
  });
});

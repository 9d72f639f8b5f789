#!/usr/bin/env node
// Encrypted images (LUKS, aes-256-xts-plain64), two tables; never fails on speed. Needs `npm run build`.
// 1. convert -O raw of a 256 MiB LUKS image made by qemu-img (random data in every cluster), ours vs qemu-img as
//    whole CLI runs, alternating, best and median of QCOW86_BENCH_RUNS (default 5). Both unlock the key slot
//    first: the image is made with encrypt.iter-time=10 so that PBKDF2 (the same work on both sides) does not
//    drown the decryption being compared. Target: ratio <= 1.2.
// 2. The guest's dd on an encrypted overlay vs a plain one, in Node (`qcow86 boot`'s machine, in-process, on its
//    default disk bus): 8 MiB copied into a new file with fsync, then read back four times with the page cache
//    dropped before each (so both directions go through the encryption), timed by the guest's clock. Rounds
//    alternate plain/encrypted, QCOW86_BENCH_ROUNDS (default 3), medians. Target: encrypted at most 1.3x slower.
//    (The tab's figures: bench/browser-encrypted.mjs.) QCOW86_BENCH_ONLY=convert or =dd runs one of the two.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'bin/qcow86.js');
const dir = mkdtempSync(join(tmpdir(), 'qcow86-bench-encrypted-'));
const RUNS = Number(process.env.QCOW86_BENCH_RUNS ?? 5);
const ROUNDS = Number(process.env.QCOW86_BENCH_ROUNDS ?? 3);
/** Reads of the 8 MiB file per measurement. */
const READS = 4;
/** QCOW86_BENCH_ONLY=dd skips the convert table, =convert the guest one. */
const ONLY = process.env.QCOW86_BENCH_ONLY;
const SECRET = ['--object', 'secret,id=sec0,data=benchmark passphrase'];
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const best = (xs) => Math.min(...xs);
const time = (run) => {
  const start = process.hrtime.bigint();
  run();
  return Number(process.hrtime.bigint() - start) / 1e6;
};

/** qemu-img, retried while its PBKDF2 calibration measures no CPU time (a busy machine). */
function qemuImg(args) {
  for (let attempt = 1; ; attempt++) {
    try {
      return execFileSync('qemu-img', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (error) {
      if (attempt < 32 && String(error.stderr).includes('Unable to get accurate CPU usage')) continue;
      throw error;
    }
  }
}

try {
  if (ONLY !== 'dd') {
    // ---- 1. convert -O raw -------------------------------------------------------------------------------------
    const raw = join(dir, 'random.raw');
    execFileSync('sh', ['-c', `head -c ${256 * 1024 * 1024} /dev/urandom > '${raw}'`]);
    const luks = join(dir, 'luks.qcow2');
    const tiny = join(dir, 'tiny.qcow2');
    const options = 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10';
    qemuImg(['convert', ...SECRET, '-f', 'raw', raw, '-O', 'qcow2', '-o', options, luks]);
    qemuImg(['create', '-q', ...SECRET, '-f', 'qcow2', '-o', options, tiny, '1M']);
    execFileSync('qemu-io', [...SECRET, '--image-opts', `driver=qcow2,file.filename=${tiny},encrypt.key-secret=sec0`, '-c', 'write -P 90 0 64k'], { stdio: 'ignore' });
    const opts = (path) => ['--image-opts', `driver=qcow2,file.filename=${path},encrypt.key-secret=sec0`];
    const out = join(dir, 'out.raw');
    const runs = (path) => {
      const theirs = [];
      const ours = [];
      for (let i = 0; i < RUNS; i++) {
        theirs.push(time(() => execFileSync('qemu-img', ['convert', ...SECRET, ...opts(path), '-O', 'raw', out])));
        ours.push(time(() => execFileSync(process.execPath, [cli, 'convert', ...SECRET, ...opts(path), '-O', 'raw', out])));
      }
      return { theirs, ours };
    };
    const fixed = runs(tiny);
    const big = runs(luks);
    execFileSync('cmp', [out, raw]);
    const rows = [];
    const addRows = (label, result, less = { theirs: [0], ours: [0] }) => {
      for (const [figure, pick] of [['best', best], ['median', median]]) {
        const t = pick(result.theirs) - pick(less.theirs);
        const o = pick(result.ours) - pick(less.ours);
        rows.push({ image: figure === 'best' ? label : '', figure, 'qemu-img ms': t.toFixed(0), 'qcow86 ms': o.toFixed(0), 'ratio (ours/qemu)': (o / t).toFixed(2), target: label.startsWith('fixed') ? '' : '<= 1.2' });
      }
    };
    addRows('fixed cost (1 MiB LUKS, one cluster)', fixed);
    addRows('256 MiB LUKS aes-256-xts', big);
    addRows('256 MiB LUKS, above the fixed cost', big, fixed);
    console.log(`convert -O raw of an encrypted image (${RUNS} runs each, alternating)`);
    console.table(rows);
    rmSync(raw, { force: true });
    rmSync(out, { force: true });
  }

  if (ONLY !== 'convert') {
    // ---- 2. guest dd on an encrypted overlay -------------------------------------------------------------------
    const { ensureImages } = await import(join(root, 'images/build.mjs'));
    const { Machine } = await import(join(root, 'dist/v86/machine.js'));
    const { loadMachineAssets } = await import(join(root, 'dist/node/machine-assets.js'));
    const { openBootDisk } = await import(join(root, 'dist/node/boot-disk.js'));
    await ensureImages();
    const assets = await loadMachineAssets();
    /** Runs `command` in the guest and returns its console output (between two markers the shell computes). */
    const inGuest = async (machine, command) => {
      const tag = `b${Math.random().toString(36).slice(2, 7)}`;
      const { match } = await machine.send(`echo ${tag}-$((1+1)); ${command}; echo ${tag}-$((2+1))\n`).expect(new RegExp(`${tag}-2\\n([\\s\\S]*?)${tag}-3\\n`), { timeout: 300_000 });
      return match[1];
    };
    /** Seconds by the guest's own clock (busybox time, reported on stderr), so the console round trip is not counted. */
    const guestSeconds = async (machine, command) => {
      const output = await inGuest(machine, `time ${command}`);
      const match = /real\s+(\d+)m\s*([\d.]+)s/.exec(output);
      if (!match) throw new Error(`no 'time' output in: ${output}`);
      return Number(match[1]) * 60 + Number(match[2]);
    };
    const results = { plain: [], encrypted: [] };
    for (let round = 0; round < ROUNDS; round++) {
      for (const kind of round % 2 ? ['encrypted', 'plain'] : ['plain', 'encrypted']) {
        // A throw-away overlay in memory on the default base; the encrypted one is LUKS with QEMU's defaults.
        const disk = await openBootDisk(kind === 'encrypted' ? { password: new TextEncoder().encode('benchmark passphrase') } : {});
        const machine = new Machine({ disk: disk.device, ...assets });
        await machine.expect('# ', { timeout: 600_000 });
        // The source file is made first (not timed), then copied with fsync and read back with the page cache dropped.
        await inGuest(machine, 'dd if=/dev/urandom of=/root/rand.bin bs=1M count=8 2>/dev/null; sync; echo 3 > /proc/sys/vm/drop_caches');
        const write = await guestSeconds(machine, 'dd if=/root/rand.bin of=/root/dd.bin bs=1M conv=fsync');
        // Read back READS times, the page cache dropped before each: one 8 MiB read takes tens of milliseconds here,
        // too close to the 10 ms resolution of the guest's clock to compare.
        const read = await guestSeconds(machine, `sh -c 'for i in $(seq ${READS}); do echo 3 > /proc/sys/vm/drop_caches; dd if=/root/dd.bin of=/dev/null bs=1M 2>/dev/null; done'`);
        await machine.close();
        results[kind].push({ write: 8 / write, read: (8 * READS) / read });
        console.log(`  ${kind}: write ${(8 / write).toFixed(1)} MiB/s, read ${((8 * READS) / read).toFixed(1)} MiB/s`);
      }
    }
    const m = (kind, key) => median(results[kind].map((r) => r[key]));
    console.log(`\nguest dd in Node (${ROUNDS} round(s), median)`);
    console.log('| direction | plain overlay MiB/s | encrypted overlay MiB/s | slowdown (plain/encrypted) | target |');
    console.log('| --- | ---: | ---: | ---: | --- |');
    for (const key of ['write', 'read']) {
      console.log(`| ${key} (8 MiB${key === 'write' ? ', file copy, fsync' : ` x ${READS}, cache dropped before each`}) | ${m('plain', key).toFixed(1)} | ${m('encrypted', key).toFixed(1)} | ${(m('plain', key) / m('encrypted', key)).toFixed(2)}x | <= 1.3x |`);
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

// Crash-test child: random guest writes, zero writes and discards on an image, reporting each operation on
// stdout BEFORE it starts and "flushed" after each completed flush (synchronous writes: nothing is lost in a
// Node buffer when the parent SIGKILLs us). Arguments: engine dir, image path, seed, sector count.
import { writeSync } from 'node:fs';

const [dist, path, seedText, sectorsText] = process.argv.slice(2);
const { openImage } = await import(`${dist}/qcow2/open.js`);
const { FileStore, nodeResolver } = await import(`${dist}/io/node.js`);
const image = await openImage(await FileStore.open(path, { readOnly: false }), { readOnly: false, resolver: nodeResolver() });
const sectors = Number(sectorsText);
let x = Number(seedText) >>> 0 || 1;
const rand = (n) => {
  x ^= x << 13;
  x ^= x >>> 17;
  x ^= x << 5;
  return (x >>> 0) % n;
};
const say = (line) => writeSync(1, `${line}\n`);
say('ready');
for (let seq = 1; ; seq++) {
  const kind = rand(10);
  const first = rand(sectors - 1);
  const count = 1 + rand(Math.min(sectors - first, rand(4) === 0 ? 2048 : 160));
  const value = (seq % 250) + 1;
  const op = kind < 7 ? { kind: 'write', first, count, value } : kind < 9 ? { kind: 'zero', first, count, unmap: rand(2) === 0 } : { kind: 'discard', first, count };
  say(`op ${JSON.stringify(op)}`);
  if (op.kind === 'write') await image.write(first * 512, new Uint8Array(count * 512).fill(value));
  else if (op.kind === 'zero') await image.writeZeroes(first * 512, count * 512, { unmap: op.unmap });
  else await image.discard(first * 512, count * 512);
  if (rand(4) === 0) {
    await image.flush();
    say('flushed');
  }
}

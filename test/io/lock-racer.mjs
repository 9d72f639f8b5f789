// Lock-race child: waits until the go file exists, then tries to take an image's write lock at once. Prints
// 'locked' and keeps the lock until told to stop (its stdin closes), or 'refused' and exits.
import { existsSync, writeSync } from 'node:fs';
const [dist, path, go] = process.argv.slice(2);
const { WriteLock } = await import(`${dist}/io/lock.js`);
while (!existsSync(go)) await new Promise((done) => setImmediate(done));
let lock;
try {
  lock = await WriteLock.acquire(path);
} catch (error) {
  writeSync(1, `refused ${error.message}\n`);
  process.exit(0);
}
writeSync(1, 'locked\n');
process.stdin.on('end', async () => {
  await lock.release();
  process.exit(0);
});
process.stdin.resume();

// Lock-test child: takes an image's write lock, says so, and waits to be killed.
import { writeSync } from 'node:fs';
const [dist, path] = process.argv.slice(2);
const { WriteLock } = await import(`${dist}/io/lock.js`);
await WriteLock.acquire(path);
writeSync(1, 'locked\n');
setInterval(() => {}, 1000);

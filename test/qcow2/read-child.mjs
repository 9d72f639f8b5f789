// Child process for the corrupt-image suite: opens an image with the compiled engine, reads it through, and
// prints one JSON line: the error (class, message) or success, how long it took (wall and CPU time) and the peak resident size.
// Usage: node read-child.mjs DIST_DIR IMAGE [FORMAT]
const [dist, image, format] = process.argv.slice(2);
const { FileStore, nodeResolver, nodeCodecs } = await import(`${dist}/io/node.js`);
const { openImage } = await import(`${dist}/qcow2/open.js`);
const started = performance.now();
const startedCpu = process.cpuUsage();
let result;
try {
  const device = await openImage(await FileStore.open(image), { format, resolver: nodeResolver(), codecs: nodeCodecs() });
  // Read through at most 256 MiB of the disk in 4 MiB pieces: every table the reads touch is decoded.
  const limit = Math.min(device.virtualSize, 256 * 1024 * 1024);
  for (let at = 0; at < limit; at += 4 * 1024 * 1024) await device.read(at, Math.min(4 * 1024 * 1024, limit - at));
  await device.close();
  result = { ok: true };
} catch (error) {
  result = { ok: false, error: error?.name, message: String(error?.message ?? error) };
}
result.ms = performance.now() - started;
// CPU time is what the 1 s bound is about: wall time on a loaded CI machine also counts other processes.
const cpu = process.cpuUsage(startedCpu);
result.cpuMs = (cpu.user + cpu.system) / 1000;
result.maxRssMiB = process.resourceUsage().maxRSS / 1024;
process.stdout.write(`${JSON.stringify(result)}\n`);

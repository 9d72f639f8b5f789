// The peer for the HTTP base benchmark (issue 6): a ByteStore that sends one `bytes=a-b` request per read, with
// no cache, coalescing or readahead, like v86's AsyncXHRBuffer does per sector run. It validates just enough to
// be fair (206 and the body length) and counts requests and bytes. Not run by bench/run.mjs (leading _).

/** Opens `url` naively: one request for the size (bytes=0-0), then one per read. */
export async function openNaiveHttpStore(url) {
  const counters = { requests: 0, bytesFetched: 0 };
  const get = async (start, end) => {
    counters.requests++;
    const response = await fetch(url, { headers: { Range: `bytes=${start}-${end}`, 'Accept-Encoding': 'identity' } });
    if (response.status !== 206) throw new Error(`${url}: expected 206 for bytes=${start}-${end}, got ${response.status}`);
    const bytes = new Uint8Array(await response.arrayBuffer());
    counters.bytesFetched += bytes.length;
    return { bytes, contentRange: response.headers.get('Content-Range') ?? '' };
  };
  const first = await get(0, 0);
  const size = Number(/\/(\d+)$/.exec(first.contentRange)?.[1] ?? NaN);
  if (!Number.isFinite(size)) throw new Error(`${url}: no size in Content-Range '${first.contentRange}'`);
  const readOnly = () => Promise.reject(new Error(`${url}: read-only`));
  return {
    name: url,
    readOnly: true,
    validator: undefined,
    size: async () => size,
    async read(offset, length) {
      const end = Math.min(size, offset + length);
      if (offset >= end) return new Uint8Array(0);
      const { bytes } = await get(offset, end - 1);
      if (bytes.length !== end - offset) throw new Error(`${url}: short body at ${offset}: ${bytes.length} of ${end - offset}`);
      return bytes;
    },
    write: readOnly,
    truncate: readOnly,
    flush: async () => {},
    close: async () => {},
    stats: () => ({ ...counters, size }),
  };
}

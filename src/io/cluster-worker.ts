/**
 * A worker thread of cluster-workers.ts: encrypts, decrypts and compresses what it is sent with the same code
 * the calling thread would use (sector-cipher.ts over Node's crypto, Node's zlib, zstd-wasm), and transfers the
 * result back.
 */
import { parentPort } from 'node:worker_threads';
import { SectorCipher } from '../qcow2/sector-cipher.js';
import { QEMU_ZSTD_LEVEL } from '../qcow2/compression.js';
import { nodeCryptoPrimitives } from './node-crypto.js';
import { nodeCodecs } from './node-codecs.js';
import type { CipherSpec } from '../qcow2/crypto.js';
import type { WorkerReply, WorkerRequest } from './cluster-workers.js';

const primitives = nodeCryptoPrimitives();
const codecs = nodeCodecs({ workers: false });
/** Ciphers by key and spec: an image's key arrives with every request, its key schedule is made once. */
const ciphers = new Map<string, SectorCipher>();

function cipherFor(spec: CipherSpec, key: Uint8Array): SectorCipher {
  const id = `${spec.aesKeyBytes}/${spec.mode}/${spec.ivgen}/${spec.ivgenHash ?? ''}/${Buffer.from(key).toString('hex')}`;
  let cipher = ciphers.get(id);
  if (!cipher) {
    if (ciphers.size > 16) ciphers.clear();
    cipher = new SectorCipher(primitives, spec, key);
    ciphers.set(id, cipher);
  }
  return cipher;
}

/** `bytes` in an ArrayBuffer of its own, so it can be transferred (Node's small Buffers share a pool). */
function own(bytes: Uint8Array): Uint8Array {
  return bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength ? bytes : bytes.slice();
}

async function handle(request: WorkerRequest): Promise<Uint8Array> {
  switch (request.op) {
    case 'decrypt':
      cipherFor(request.spec, request.key).decrypt(request.data, request.sector);
      return request.data;
    case 'encrypt':
      return cipherFor(request.spec, request.key).encrypt(request.data, request.sector);
    case 'deflate':
      return codecs.deflateRaw(request.data);
    case 'zstd':
      return codecs.zstdCompress(request.data, QEMU_ZSTD_LEVEL);
  }
}

parentPort!.on('message', (request: WorkerRequest) => {
  handle(request).then(
    (result) => {
      // Decrypted in place in shared memory: the caller already has the bytes; the reply only says done.
      if (result.buffer instanceof SharedArrayBuffer) return parentPort!.postMessage({ id: request.id, data: new Uint8Array(0) } satisfies WorkerReply);
      const data = own(result);
      parentPort!.postMessage({ id: request.id, data } satisfies WorkerReply, [data.buffer as ArrayBuffer]);
    },
    (error: unknown) => parentPort!.postMessage({ id: request.id, error: error instanceof Error ? error.message : String(error) } satisfies WorkerReply),
  );
});

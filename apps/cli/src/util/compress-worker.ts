/**
 * Worker thread of the compression pool (./compress-pool.ts): deflates clusters as QEMU's
 * qcow2 driver does (raw deflate, 4 KiB window, default level) and sends the bytes back.
 * Built as its own entry (dist/compress-worker.cjs) next to dist/cli.cjs.
 */
import { parentPort } from "node:worker_threads";
import { deflateRawSync } from "node:zlib";

interface Job {
  readonly id: number;
  readonly data: Uint8Array;
  /** qcow2 compression type: 0 zlib (raw deflate), 1 zstd. */
  readonly type?: number;
}

type ZstdCompress = (data: Uint8Array, level: number) => Uint8Array;
let zstd: Promise<ZstdCompress> | undefined;
function loadZstd(): Promise<ZstdCompress> {
  zstd ??= import("@bokuweb/zstd-wasm").then(async (m) => {
    await m.init();
    return (d: Uint8Array, level: number) => m.compress(d, level);
  });
  return zstd;
}

const port = parentPort;
if (port !== null) {
  port.on("message", (job: Job) => {
    void handle(job);
  });
}

async function handle(job: Job): Promise<void> {
  const out = parentPort;
  if (out === null) return;
  try {
    const packed =
      job.type === 1
        ? (await loadZstd())(job.data, 3)
        : deflateRawSync(job.data, { windowBits: 12 });
    const bytes = new Uint8Array(packed.buffer, packed.byteOffset, packed.byteLength);
    // Transfer when the result owns its buffer; copy otherwise (pooled small buffers).
    const own = bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength;
    const send = own ? bytes : bytes.slice();
    out.postMessage({ id: job.id, data: send }, [send.buffer as ArrayBuffer]);
  } catch (e) {
    out.postMessage({ id: job.id, error: e instanceof Error ? e.message : String(e) });
  }
}

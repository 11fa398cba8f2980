/**
 * Worker thread of the compression pool (./compress-pool.ts): compresses clusters with
 * @qimg/qcow2's `defaultCompress`, the one place that says how QEMU compresses them (raw
 * deflate with a 4 KiB window, or zstd at level 3), and sends the bytes back, or `none` when
 * compression does not pay. Built as its own entry (dist/compress-worker.cjs) next to
 * dist/cli.cjs.
 */
import { parentPort } from "node:worker_threads";
import { defaultCompress } from "@qimg/qcow2";

interface Job {
  readonly id: number;
  readonly data: Uint8Array;
  /** qcow2 compression type: 0 zlib (raw deflate), 1 zstd. */
  readonly type: number;
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
    const packed = await defaultCompress(job.data, job.type);
    if (packed === undefined) {
      out.postMessage({ id: job.id, none: true });
      return;
    }
    // Transfer when the result owns its buffer; copy otherwise (pooled small buffers).
    const own = packed.byteOffset === 0 && packed.byteLength === packed.buffer.byteLength;
    const send = own ? packed : packed.slice();
    out.postMessage({ id: job.id, data: send }, [send.buffer as ArrayBuffer]);
  } catch (e) {
    out.postMessage({ id: job.id, error: e instanceof Error ? e.message : String(e) });
  }
}

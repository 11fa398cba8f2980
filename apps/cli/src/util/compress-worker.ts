/**
 * Worker thread of the compression pool (./compress-pool.ts): compresses clusters with
 * @qimg/qcow2's `defaultCompress`, the one place that says how QEMU compresses them (raw
 * deflate with a 4 KiB window, or zstd at level 3), and sends the bytes back, or `none` when
 * compression does not pay; or decompresses a cluster with the driver's own decompressor.
 * Built as its own entry (dist/compress-worker.cjs) next to dist/cli.cjs.
 */
import { parentPort } from "node:worker_threads";
import { decompressorFor, defaultCompress } from "@qimg/qcow2";
import type { Job } from "./compress-pool.js";

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
    let result: Uint8Array | undefined;
    if (job.inflate !== undefined) {
      result = new Uint8Array(job.inflate);
      await decompressorFor(job.type)(job.data, result);
    } else {
      result = await defaultCompress(job.data, job.type);
    }
    if (result === undefined) {
      out.postMessage({ id: job.id, none: true });
      return;
    }
    // Transfer when the result owns its buffer; copy otherwise (pooled small buffers).
    const own = result.byteOffset === 0 && result.byteLength === result.buffer.byteLength;
    const send = own ? result : result.slice();
    out.postMessage({ id: job.id, data: send }, [send.buffer as ArrayBuffer]);
  } catch (e) {
    out.postMessage({ id: job.id, error: e instanceof Error ? e.message : String(e) });
  }
}

/**
 * The qcow2 driver's `decompress` open option for the CLI: compressed clusters are decoded on
 * the main thread at first, and once a command has decoded more than a few, in the worker
 * threads of a compression pool (./compress-pool.ts) that lives as long as the process, as
 * QEMU hands them to its thread pool. A big copy of a compressed image then decodes on every
 * core while the main thread reads and writes; a small read starts no thread.
 *
 * The workers run the driver's own decompressors (`decompressorFor`), so the bytes and the
 * errors are the same either way.
 */
import { decompressorFor } from "@qimg/qcow2";
import type { ClusterDecompressor } from "@qimg/qcow2";
import type { CompressPool } from "./compress-pool.js";

/** Clusters decoded on the main thread before the workers start. */
const INLINE_DECODES = 64;

let decoded = 0;
let offloaded = 0;
let pool: CompressPool | undefined;
let starting: Promise<void> | undefined;

function startPool(): void {
  starting ??= import("./compress-pool.js")
    .then((m) => m.CompressPool.start(undefined, { unrefIdle: true }))
    .then(
      (p) => {
        pool = p.size > 1 ? p : undefined;
        if (pool === undefined) void p.close();
      },
      () => undefined, // no workers: keep decoding on the main thread
    );
}

export const offloadDecompress: ClusterDecompressor = (src, out, compressionType) => {
  if (pool !== undefined) {
    offloaded++;
    return pool.decompress(src, out, compressionType);
  }
  if (++decoded > INLINE_DECODES) startPool();
  return decompressorFor(compressionType)(src, out);
};

/** How many clusters this process has decoded in worker threads (for the tests). */
export function offloadedDecodes(): number {
  return offloaded;
}

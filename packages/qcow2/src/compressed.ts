/**
 * Compressed cluster writes (QEMU's qcow2_co_pwritev_compressed_task and the byte allocator
 * qcow2_alloc_bytes that packs compressed clusters into shared host clusters).
 */
import { InvalidArgumentError, IoError, U64TableView, hex } from "@qimg/structs";
import { encodeCompressed, l2Word } from "./spec/l2.js";
import { checkOverlap, refreshRefcountBlocks } from "./overlap.js";
import { checkWritable, withClusters } from "./state.js";
import type { Qcow2State } from "./state.js";
import { checkRequest } from "@qimg/io";
import { Kind, resolve } from "./cluster-map.js";
import { l2ForWrite, queueFree } from "./alloc.js";
import { writeLocked } from "./write.js";
import { markDirtyOnDisk } from "./dirty.js";
import { flushImage } from "./flush.js";

/**
 * Write one whole cluster compressed (the last cluster of the disk may be shorter and is
 * padded). Falls back to a normal write when compression does not pay.
 */
export async function guestWriteCompressed(
  s: Qcow2State,
  offset: number,
  data: Uint8Array,
): Promise<void> {
  const w = checkWritable(s);
  const cs = s.clusterSize;
  // QEMU refuses a misaligned compressed write, or one with a data file, after its bitmaps
  // took the range as dirty (the refusal comes from inside the request): so do we.
  if (Number.isSafeInteger(offset) && offset >= 0 && offset + data.length <= s.size)
    s.pbm?.setDirty(offset, data.length);
  if (
    offset % cs !== 0 ||
    (data.length !== cs && offset + data.length !== s.size) ||
    data.length > cs
  ) {
    throw new InvalidArgumentError(
      `compressed writes must cover exactly one whole cluster (${cs} bytes)`,
    );
  }
  if (s.hasDataFile) {
    throw new InvalidArgumentError(
      "compressed writes are not supported with an external data file",
    );
  }
  checkRequest(offset, data.length, s.size);
  const g = offset / cs;
  await withClusters(s, g, g, async () => {
    let full = data;
    if (data.length < cs) {
      full = new Uint8Array(cs);
      full.set(data);
    }
    const packed = await w.compress(full, s.hdr.compressionType);
    // Data that does not shrink below a cluster is stored as it is (QEMU's limit too: with
    // 512-byte clusters most data still compresses).
    if (!packed || packed.length >= cs) {
      await writeLocked(s, offset, data);
      return;
    }
    // Compressed data never overwrites a cluster that has a host cluster (data, compressed,
    // or preallocated zeros): QEMU fails such a write with EIO, and so do we.
    const e = await resolve(s, offset, data.length);
    if (e.kind === Kind.Compressed || e.host >= 0) {
      throw new IoError(
        `compressed write at guest offset ${hex(offset)}: the cluster is already allocated (compressed data cannot overwrite it)`,
      );
    }
    await storeCompressed(s, g, packed);
  });
  if (w.writethrough) await flushImage(s);
}

/** Under the claim of guest cluster `g`: store `packed` as its compressed cluster. */
export async function storeCompressed(s: Qcow2State, g: number, packed: Uint8Array): Promise<void> {
  const w = s.w!;
  if (w.lazy) await markDirtyOnDisk(s);
  const l1Index = Math.floor(g / s.l2Entries);
  const table = await w.meta.run(() => l2ForWrite(s, l1Index));
  try {
    const host = await w.meta.run(() => allocateBytes(s, packed.length));
    await checkOverlap(s, host, packed.length);
    await s.backend.write(host, packed);
    s.fileSize = Math.max(s.fileSize, host + packed.length);
    await w.meta.run(async () => {
      const l2 = new U64TableView(table.bytes, "big");
      const i = l2Word(s.fmt, g - l1Index * s.l2Entries);
      queueFree(s, l2, i);
      const sectors = Math.floor((host + packed.length - 1) / 512) - Math.floor(host / 512);
      const d = encodeCompressed(host, sectors, s.layout);
      l2.setWords(i, d.hi, d.lo);
      if (s.extendedL2) l2.setWords(i + 1, 0, 0); // no subcluster bits
      await s.l2Cache.markDirty(table);
    });
  } finally {
    s.l2Cache.release(table);
  }
}

/** Under the metadata lock: byte-granular space for compressed data (QEMU's alloc_bytes). */
export async function allocateBytes(s: Qcow2State, size: number): Promise<number> {
  const w = s.w!;
  const cs = s.clusterSize;
  // Another compressed cluster may share the current host cluster (one more reference),
  // unless its refcount is at the width's maximum (refcount_bits 1 or 2): then a new
  // cluster is started, as QEMU's byte allocator does.
  const cur = w.compressedCluster;
  const shareable = cur >= 0 && (await w.refcounts.get(cur)) < w.refcounts.maxRefcount;
  if (shareable && w.compressedNext + size <= cs) {
    const at = cur * cs + w.compressedNext;
    await w.refcounts.update(cur, 1);
    w.compressedNext += size;
    if (w.compressedNext === cs) w.compressedCluster = -1;
    return at;
  }
  const n = Math.ceil(size / cs);
  const host = await w.refcounts.allocate(n);
  refreshRefcountBlocks(s, host + n * cs);
  let at = host;
  if (shareable && host === (cur + 1) * cs) {
    // The new clusters follow the current one: the data starts in its free tail and runs on
    // (QEMU packs the same way); clusters it does not reach are given back.
    at = cur * cs + w.compressedNext;
    const reached = Math.ceil((at + size - host) / cs);
    if (reached < n) await w.refcounts.free(host + reached * cs, n - reached);
    await w.refcounts.update(cur, 1);
  }
  const end = at + size;
  w.compressedCluster = end % cs !== 0 ? Math.floor(end / cs) : -1;
  w.compressedNext = end % cs;
  return at;
}

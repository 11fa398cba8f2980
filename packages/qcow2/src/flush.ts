/** Flush and close: metadata reaches the disk in the order that keeps the image consistent. */
import { IncompatibleFeatures } from "./spec/header.js";
import { Meta, checkOverlap, updateHeader } from "./overlap.js";
import { checkOpen, corruptCause } from "./state.js";
import type { Qcow2State } from "./state.js";

/**
 * Make every completed write durable, in the order that keeps the image consistent: refcount
 * blocks, then L2 tables, then the L1 table, then a sync; only then are freed clusters'
 * refcounts lowered.
 */
export async function flushImage(s: Qcow2State): Promise<void> {
  checkOpen(s);
  const w = s.w;
  if (!w) return;
  if (w.corrupted) return;
  await w.meta
    .run(() => flushLocked(s))
    .catch((e: unknown) => {
      throw corruptCause(s, e);
    });
}

export async function flushLocked(s: Qcow2State): Promise<void> {
  const w = s.w!;
  if (s.dataBackend !== s.backend) await s.dataBackend.flush();
  // With lazy refcounts and the dirty bit on disk, refcounts need not be accurate on disk
  // (a crash makes the next open rebuild them), so a flush leaves them cached, as QEMU
  // does (qcow2_need_accurate_refcounts); a clean close writes them.
  if (!w.lazy || !w.dirtyOnDisk) await w.refcountCache.flush();
  await s.l2Cache.flush();
  if (w.l1DirtyHi > w.l1DirtyLo) {
    const from = w.l1DirtyLo * 8;
    const to = w.l1DirtyHi * 8;
    await checkOverlap(s, s.hdr.l1TableOffset + from, to - from, Meta.activeL1);
    await s.backend.write(s.hdr.l1TableOffset + from, s.l1.bytes.subarray(from, to));
    w.l1DirtyLo = Number.MAX_SAFE_INTEGER;
    w.l1DirtyHi = 0;
    for (const off of w.retiredL2) w.metadata.remove(off / s.clusterSize, Meta.activeL2);
    w.retiredL2 = [];
  }
  await s.backend.flush();
  const frees = w.pendingFrees;
  w.pendingFrees = [];
  for (const [off, n] of frees) {
    await w.refcounts.free(off, n);
    // A freed cluster may be reused for anything: no more compressed data goes into it.
    const c = w.compressedCluster;
    if (c >= 0 && c * s.clusterSize >= off && c * s.clusterSize < off + n * s.clusterSize)
      w.compressedCluster = -1;
  }
}

/**
 * Close the image. A read-write image is closed cleanly: every cache is flushed, pending
 * refcount decrements are applied, and the dirty bit is cleared.
 */
export async function closeImage(s: Qcow2State): Promise<void> {
  if (s.closed) return;
  try {
    if (s.w && !s.w.corrupted)
      await closeClean(s).catch((e: unknown) => {
        throw corruptCause(s, e);
      });
  } finally {
    s.closed = true;
    await closeSide(s);
    await s.backend.close();
  }
}

export async function closeSide(s: Qcow2State): Promise<void> {
  const b = s.backing;
  s.backing = undefined;
  if (b) await b.close();
  if (s.dataBackend !== s.backend) await s.dataBackend.close();
}

/** Flush everything, apply the postponed refcount changes, and clear the dirty bit. */
export async function closeClean(s: Qcow2State): Promise<void> {
  const w = s.w!;
  // Let requests still in flight finish first.
  await w.claims.drain();
  await w.meta.run(async () => {
    await flushLocked(s);
    // Bitmaps go back to disk (IN_USE cleared) before the image is marked clean.
    if (s.pbm) await s.pbm.store();
    await w.refcountCache.flush();
    if (IncompatibleFeatures.decode(s.hdr.incompatibleFeatures).has("dirty")) {
      await updateHeader(s, {
        incompatibleFeatures: s.hdr.incompatibleFeatures & ~IncompatibleFeatures.maskOf("dirty"),
      });
    }
  });
}

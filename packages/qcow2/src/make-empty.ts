/**
 * Making a qcow2 image empty (QEMU's bdrv_make_empty, used by `qemu-img commit` after the data
 * reached the backing file): every guest cluster becomes unallocated, so the image reads
 * exactly as its backing file (or as zeros without one).
 *
 * QEMU has two ways: a fast one for version 3 images without snapshots or bitmaps that
 * rebuilds the file from scratch (make_completely_empty), and a fallback that discards every
 * active cluster with "full discard" semantics (the L2 entries become 0, not zero clusters).
 * qimg always takes the discard path: it goes through the driver's ordinary, crash-safe
 * metadata updates (L2 entries are written, then the freed clusters' refcounts lowered), and
 * the result reads the same. Snapshots keep their clusters (shared L2 tables are copied first).
 */
import { U64TableView } from "@qimg/structs";
import { entryCompressed, entryCopied, l2Word } from "./spec/l2.js";
import { checkWritable, l1Entry, withClusters } from "./state.js";
import type { Qcow2State } from "./state.js";
import { hostOf, l2ForWrite, queueFree } from "./alloc.js";
import { markDirtyOnDisk } from "./dirty.js";
import { flushImage } from "./flush.js";

/**
 * Make every guest cluster of the image unallocated (full discard: no zero flags) and flush.
 * Data clusters and compressed clusters are freed once the L2 change is durable. L2 tables
 * themselves stay allocated (as QEMU's discard fallback leaves them).
 */
export async function makeEmpty(s: Qcow2State): Promise<void> {
  const w = checkWritable(s);
  if (s.size === 0) return;
  const cs = s.clusterSize;
  s.pbm?.setDirty(0, s.size);
  const lastCluster = Math.floor((s.size - 1) / cs);
  const tables = Math.floor(lastCluster / s.l2Entries) + 1;
  await withClusters(s, 0, lastCluster, async () => {
    if (w.lazy) await markDirtyOnDisk(s);
    for (let l1Index = 0; l1Index < tables; l1Index++) {
      if (l1Entry(s, l1Index) === 0) continue;
      const first = l1Index * s.l2Entries;
      const count = Math.min(s.l2Entries, lastCluster + 1 - first);
      await w.meta.run(async () => {
        const table = await l2ForWrite(s, l1Index);
        try {
          const l2 = new U64TableView(table.bytes, "big");
          let changed = false;
          for (let j = 0; j < count; j++) {
            const i = l2Word(s.fmt, j);
            const hi = l2.hi(i);
            const lo = l2.lo(i);
            const ext = s.extendedL2 && (l2.hi(i + 1) !== 0 || l2.lo(i + 1) !== 0);
            if (hi === 0 && lo === 0 && !ext) continue;
            const allocated =
              entryCompressed(hi) || hostOf(l2, i) !== 0 || (s.hasDataFile && entryCopied(hi));
            if (allocated) queueFree(s, l2, i);
            l2.setWords(i, 0, 0);
            if (s.extendedL2) l2.setWords(i + 1, 0, 0);
            changed = true;
          }
          if (changed) await s.l2Cache.markDirty(table);
        } finally {
          s.l2Cache.release(table);
        }
      });
    }
  });
  await flushImage(s);
}

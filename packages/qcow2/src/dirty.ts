/**
 * Lazy refcounts (QEMU's dirty bit): the bit goes to disk before the first allocating write,
 * and an image found dirty at open has its refcounts rebuilt from the references.
 */
import { rebuildRefcounts } from "@qimg/refcount";
import { IncompatibleFeatures } from "./spec/header.js";
import { U64TableView } from "@qimg/structs";
import { OFLAG_ZERO, withoutCopied } from "./spec/l2.js";
import { walkReferences } from "./walk.js";
import { updateHeader } from "./overlap.js";
import type { Qcow2State } from "./state.js";

/** With lazy refcounts the dirty bit must be on disk before any allocating write. */
export async function markDirtyOnDisk(s: Qcow2State): Promise<void> {
  const w = s.w!;
  if (!w.lazy || w.dirtyOnDisk || s.hdr.version === 2) return;
  await w.meta.run(async () => {
    if (w.dirtyOnDisk) return;
    await updateHeader(s, {
      incompatibleFeatures: s.hdr.incompatibleFeatures | IncompatibleFeatures.maskOf("dirty"),
    });
    w.dirtyOnDisk = true;
  });
}

/** Count every reference and write fresh refcount structures (the repair of a dirty image). */
export async function rebuildRefcountStructures(s: Qcow2State): Promise<void> {
  const cs = s.clusterSize;
  // Every reference as a run of host clusters; adjacent runs merge, so a sequentially written
  // image needs only a few. The refcount package counts them (and refuses overflows).
  const runs: [number, number][] = [];
  // A reference that ends a cluster or more past the end of the file is corruption, not
  // space to count (QEMU's check reports it and leaves it out): memory stays bounded by the
  // file's real size. Such a data cluster (typically a crash lost its data write but kept the
  // L2 entry) reads as zeros; its entry is rewritten to say so (a zero cluster on version 3,
  // unallocated on version 2 without a backing file), so that neither the new refcount
  // structures nor later allocations land under it and change what it reads, and a later
  // write allocates instead of writing far past the end. (QEMU's repair only clears COPIED,
  // which leaves the stale reference in place.)
  const fileSize = await s.backend.size();
  const pastEnd: number[] = [];
  await walkReferences(
    {
      backend: s.backend,
      header: s.hdr,
      snapshots: s.snapshots,
      bitmaps: s.bitmaps,
      bitmapDirectory: s.bitmapDirectory,
    },
    {
      reference: (r) => {
        if (r.kind === "refcount-table" || r.kind === "refcount-block") return;
        if (r.offset + Math.max(1, r.length) - fileSize >= cs) {
          if (r.kind === "data" && r.entryOffset !== undefined) pastEnd.push(r.entryOffset);
          return;
        }
        const first = Math.floor(r.offset / cs);
        const count = Math.floor((r.offset + Math.max(1, r.length) - 1) / cs) - first + 1;
        const last = runs[runs.length - 1];
        if (last !== undefined && last[0] + last[1] * cs === first * cs) last[1] += count;
        else runs.push([first * cs, count]);
      },
    },
  );
  await rebuildRefcounts({
    backend: s.backend,
    clusterBits: s.clusterBits,
    refcountOrder: s.hdr.refcountOrder,
    references: runs,
    onTableMoved: async (tableOffset, tableClusters) => {
      await updateHeader(s, {
        refcountTableOffset: tableOffset,
        refcountTableClusters: tableClusters,
      });
    },
  });
  if (pastEnd.length > 0) {
    const hasBacking = s.backingFilename !== undefined;
    const entry = new U64TableView(new Uint8Array(8 * s.fmt.stride), "big");
    for (const at of pastEnd) {
      await s.backend.read(at, entry.bytes);
      if (s.extendedL2) {
        // No host cluster, every subcluster reads as zeros.
        entry.setWords(0, 0, 0);
        entry.setWords(1, 0xffff_ffff, 0);
      } else if (s.hdr.version === 3) {
        entry.setWords(0, 0, OFLAG_ZERO.lo);
      } else if (!hasBacking) {
        entry.setWords(0, 0, 0);
      } else {
        // Version 2 over a backing file has no way to say "zeros": keep the entry, not COPIED.
        entry.setWords(0, withoutCopied(entry.hi(0)), entry.lo(0));
      }
      await s.backend.write(at, entry.bytes);
    }
    await s.backend.flush();
  }
  s.fileSize = await s.backend.size();
}

/**
 * Shrinking the disk (QEMU's qcow2_co_truncate for a smaller size): the clusters past the new
 * end are released, the L2 tables past the new end are freed (the L1 table keeps its size on
 * disk, zero entries at the end, as QEMU's), refcount blocks left describing nothing are
 * dropped, and the file is cut after the last cluster still in use.
 */
import { InvalidArgumentError, U64TableView } from "@qimg/structs";
import { Refcounts } from "@qimg/refcount";
import { ClusterType, clusterType, l2Word } from "./spec/l2.js";
import { hostOf, l2ForWrite, queueFree } from "./alloc.js";
import { Meta, buildMetadataMap, checkOverlap, updateHeader } from "./overlap.js";
import { checkWritable, guarded, l1Entry } from "./state.js";
import type { Qcow2State } from "./state.js";
import { flushLocked } from "./flush.js";
import { markDirtyOnDisk } from "./dirty.js";

/** The refusals QEMU's driver makes before it changes anything (wording as qemu-img prints it). */
export function checkShrink(s: Qcow2State, newSize: number): void {
  if (!Number.isSafeInteger(newSize) || newSize < 0 || newSize % 512 !== 0) {
    throw new InvalidArgumentError("The new size must be a multiple of 512");
  }
  if (s.hdr.version < 3 && s.snapshots.length > 0) {
    throw new InvalidArgumentError("Can't resize a v2 image which has snapshots");
  }
}

/**
 * Shrink the disk to `newSize` bytes (a multiple of 512, not larger than the current size).
 * Everything past the new end is lost; snapshots keep their own L1 tables and data.
 *
 * Crash safety: every dropped reference is on disk (L2 entries, then L1 entries, synced)
 * before a refcount is lowered, so a crash at any point leaves at most leaked clusters, which
 * `check -r leaks` repairs; the guest data below the new size is never touched.
 */
export async function shrinkImage(s: Qcow2State, newSize: number): Promise<void> {
  const w = checkWritable(s);
  checkShrink(s, newSize);
  if (newSize > s.size) {
    throw new InvalidArgumentError(
      `cannot shrink from ${s.size} to the larger size ${newSize} bytes`,
    );
  }
  s.pbm?.checkResize();
  // With lazy refcounts the dirty bit goes to disk first, as before any refcount change.
  if (w.lazy) await markDirtyOnDisk(s);
  await w.claims.drain();
  await w.meta.run(async () => {
    await flushLocked(s);
    const cs = s.clusterSize;
    const span = s.l2Entries * cs;
    // QEMU discards whole clusters from the first cluster boundary at or after the new end;
    // the part of the last cluster past the new end keeps what it holds.
    const start = Math.ceil(newSize / cs) * cs;
    const newL1 = Math.ceil(newSize / span);

    // 1. The L2 table that holds the new end: its entries past the end are released.
    const part = Math.floor(start / span);
    if (part < newL1 && part < s.l1.length && l1Entry(s, part) !== 0) {
      const table = await l2ForWrite(s, part);
      try {
        const l2 = new U64TableView(table.bytes, "big");
        for (let j = start / cs - part * s.l2Entries; j < s.l2Entries; j++) {
          const i = l2Word(s.fmt, j);
          if (isAllocated(s, l2, i)) queueFree(s, l2, i);
          l2.setWords(i, 0, 0);
          if (s.extendedL2) l2.setWords(i + 1, 0, 0);
        }
        await s.l2Cache.markDirty(table);
      } finally {
        s.l2Cache.release(table);
      }
    }

    // 2. L2 tables wholly past the new end: the L1 entries become zero on disk first.
    const dropped: number[] = [];
    for (let i = newL1; i < s.l1.length; i++) {
      const off = l1Entry(s, i);
      if (off !== 0) dropped.push(off);
      if (s.l1.hi(i) !== 0 || s.l1.lo(i) !== 0) {
        s.l1.setWords(i, 0, 0);
        w.l1DirtyLo = Math.min(w.l1DirtyLo, i);
        w.l1DirtyHi = Math.max(w.l1DirtyHi, i + 1);
      }
    }
    await flushLocked(s);
    // Then each table's references go (every data cluster reached through it loses the
    // reference of the active L1 table, shared with a snapshot or not), then the table.
    for (const off of dropped) {
      if (off % cs !== 0 || off + cs > s.fileSize) continue; // names no cluster of the file
      const table = await s.l2Cache.get(off);
      try {
        const l2 = new U64TableView(table.bytes, "big");
        for (let j = 0; j < s.l2Entries; j++) {
          const i = l2Word(s.fmt, j);
          if (isAllocated(s, l2, i)) queueFree(s, l2, i);
        }
      } finally {
        s.l2Cache.release(table);
      }
      s.l2Cache.discard(off);
      w.pendingFrees.push([off, 1]);
    }
    await flushLocked(s);
    await updateHeader(s, { size: newSize });
    s.size = newSize;
    s.pbm?.resize(newSize);
    buildMetadataMap(s);

    // 3. Refcount blocks that describe no cluster in use any more.
    await w.refcounts.flush();
    await dropUnusedRefcountBlocks(s);

    // 4. The file ends after the last cluster in use.
    await w.refcounts.flush();
    await s.backend.flush();
    const fileSize = await s.backend.size();
    const last = await lastUsedCluster(s, Math.ceil(fileSize / cs));
    if (last >= 0 && fileSize > (last + 1) * cs) {
      await s.backend.truncate((last + 1) * cs);
      s.fileSize = (last + 1) * cs;
      if (w.compressedCluster > last) w.compressedCluster = -1;
    }
    buildMetadataMap(s);
  });
}

/** Whether L2 entry word `i` holds a reference to a host cluster. */
function isAllocated(s: Qcow2State, l2: U64TableView, i: number): boolean {
  const type = clusterType(s.fmt, l2.hi(i), l2.lo(i));
  return type === ClusterType.Compressed || hostOf(l2, i) !== 0;
}

/** The index of the last host cluster with a refcount, below `clusters` (-1 for none). */
async function lastUsedCluster(s: Qcow2State, clusters: number): Promise<number> {
  const rc = s.w!.refcounts;
  const chunk = 4096;
  const buf = new Float64Array(chunk);
  for (let end = clusters; end > 0; end -= chunk) {
    const first = Math.max(0, end - chunk);
    const out = buf.subarray(0, end - first);
    await rc.readRange(first, out);
    for (let k = out.length - 1; k >= 0; k--) if (out[k] !== 0) return first + k;
  }
  return -1;
}

/**
 * QEMU's qcow2_shrink_reftable: a refcount block whose clusters are all free (but for its
 * own reference when it describes itself) is dropped from the refcount table, which is
 * rewritten in place; a block described by another block is then freed there.
 */
async function dropUnusedRefcountBlocks(s: Qcow2State): Promise<void> {
  const w = s.w!;
  const cs = s.clusterSize;
  const rc = w.refcounts;
  const per = rc.entriesPerBlock;
  const counts = new Float64Array(per);
  const unused: { index: number; offset: number; self: boolean }[] = [];
  for (let i = 0; i < rc.tableEntries; i++) {
    const b = rc.blockOffset(i);
    if (b === 0) continue;
    await rc.readRange(i * per, counts);
    const own = b / cs - i * per;
    const self = own >= 0 && own < per;
    let empty = true;
    for (let k = 0; k < per && empty; k++) {
      if (counts[k] !== 0 && !(self && k === own)) empty = false;
    }
    if (empty) unused.push({ index: i, offset: b, self });
  }
  if (unused.length === 0) return;
  const tableOffset = rc.tableOffset;
  const tableClusters = rc.tableClusters;
  const table = new Uint8Array(tableClusters * cs);
  await s.backend.read(tableOffset, table);
  const view = new U64TableView(table, "big");
  for (const u of unused) view.setWords(u.index, 0, 0);
  await checkOverlap(s, tableOffset, table.length, Meta.refcountTable);
  await guarded(s, Meta.refcountTable).write(tableOffset, table);
  await s.backend.flush();
  for (const u of unused) w.refcountCache.discard(u.offset);
  const fresh = await Refcounts.open({
    backend: guarded(s, Meta.refcountTable),
    cache: w.refcountCache,
    clusterBits: s.clusterBits,
    refcountOrder: s.hdr.refcountOrder,
    tableOffset,
    tableClusters,
    onTableMoved: async (offset, clusters) => {
      await updateHeader(s, { refcountTableOffset: offset, refcountTableClusters: clusters });
      if (s.w) buildMetadataMap(s);
    },
  });
  (w as { refcounts: Refcounts }).refcounts = fresh;
  for (const u of unused) if (!u.self) await fresh.free(u.offset, 1);
  buildMetadataMap(s);
}

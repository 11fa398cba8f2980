/**
 * Allocation of L2 tables and the bookkeeping of references (QEMU's qcow2-cluster.c
 * l2_allocate / get_cluster_table, and the frees postponed until the new metadata is on disk).
 */
import { CorruptImageError, U64TableView, hex } from "@qimg/structs";
import type { CachedTable } from "@qimg/cluster-cache";
import {
  ClusterType,
  clusterType,
  compressedLength,
  compressedOffset,
  entryCopied,
  entryOffset,
  withCopied,
} from "./spec/l2.js";
import { Meta, checkOverlap, refreshRefcountBlocks, signalCorruption } from "./overlap.js";
import { l1Copied, l1Entry } from "./state.js";
import type { Qcow2State } from "./state.js";

const TWO_32 = 0x1_0000_0000;

/** Point active L1 entry `index` at the L2 table at `l2Offset` (COPIED), to be written at flush. */
export function setL1(s: Qcow2State, index: number, l2Offset: number): void {
  const w = s.w!;
  s.l1.setWords(index, withCopied(Math.floor(l2Offset / TWO_32), true), l2Offset >>> 0);
  w.l1DirtyLo = Math.min(w.l1DirtyLo, index);
  w.l1DirtyHi = Math.max(w.l1DirtyHi, index + 1);
}

/** Under the metadata lock: the L2 table for `l1Index`, allocated or copied when needed; pinned. */
export async function l2ForWrite(s: Qcow2State, l1Index: number): Promise<CachedTable> {
  const w = s.w!;
  const cs = s.clusterSize;
  if (l1Index >= s.l1.length) {
    throw new CorruptImageError(
      `guest offset needs L1 entry ${l1Index}, but the L1 table has ${s.l1.length}`,
    );
  }
  const off = l1Entry(s, l1Index);
  const copied = l1Copied(s, l1Index);
  if (off % cs !== 0) {
    // As QEMU: an unaligned L2 table offset marks the image corrupt.
    await signalCorruption(
      s,
      `L2 table offset ${hex(off)} in L1 entry ${l1Index} is not aligned to the cluster size ${cs}`,
      s.hdr.l1TableOffset + l1Index * 8,
    );
  }
  if (off !== 0 && copied) {
    if (off % cs !== 0 || off + cs > s.fileSize) {
      throw new CorruptImageError(
        `L2 table offset ${hex(off)} in L1 entry ${l1Index} is not a cluster inside the file`,
        { offset: s.hdr.l1TableOffset + l1Index * 8 },
      );
    }
    await checkOverlap(s, off, cs, Meta.activeL2);
    return s.l2Cache.get(off);
  }
  if (off !== 0 && (off % cs !== 0 || off + cs > s.fileSize)) {
    throw new CorruptImageError(
      `L2 table offset ${hex(off)} in L1 entry ${l1Index} is not a cluster inside the file`,
      { offset: s.hdr.l1TableOffset + l1Index * 8 },
    );
  }
  // New table, or a copy of a table shared with a snapshot.
  const newOff = await w.refcounts.allocate(1);
  refreshRefcountBlocks(s, newOff);
  await checkOverlap(s, newOff, cs);
  // A new L2 table's refcount is on disk before the table is used, lazy refcounts or not
  // (QEMU's l2_allocate flushes the refcount cache here too); without lazy refcounts the
  // cache dependency already orders it.
  if (w.lazy) await w.refcountCache.flush();
  const table = await s.l2Cache.getEmpty(newOff);
  if (off !== 0) {
    const old = await s.l2Cache.get(off);
    table.bytes.set(old.bytes);
    s.l2Cache.release(old);
    w.pendingFrees.push([off, 1]);
  }
  s.fileSize = Math.max(s.fileSize, newOff + cs);
  await s.l2Cache.markDirty(table);
  w.metadata.add(newOff, cs, Meta.activeL2);
  // The old table stays protected as an active one until the L1 table on disk no longer
  // points at it (then a snapshot may still use it: an inactive L2 table).
  if (off !== 0) w.retiredL2.push(off);
  setL1(s, l1Index, newOff);
  return table;
}

/** Queue the reference held by L2 entry word `i` for freeing once the change is durable. */
export function queueFree(s: Qcow2State, l2: U64TableView, i: number): void {
  const w = s.w!;
  const hi = l2.hi(i);
  const lo = l2.lo(i);
  const type = clusterType(s.fmt, hi, lo);
  if (type === ClusterType.Compressed) {
    const at = compressedOffset(s.fmt, hi, lo);
    const cs = s.clusterSize;
    const first = Math.floor(at / cs);
    const last = Math.floor((at + compressedLength(s.fmt, hi, lo) - 1) / cs);
    w.pendingFrees.push([first * cs, last - first + 1]);
    return;
  }
  if (s.hasDataFile) return; // data clusters are not refcounted
  const off = entryOffset(hi, lo);
  // An unaligned offset names no cluster: its reference is dropped without freeing anything
  // (QEMU's non-fatal "cannot free unaligned cluster"; the request itself succeeds).
  if (off !== 0 && off % s.clusterSize === 0) w.pendingFrees.push([off, 1]);
}

/**
 * True when L2 entry word `i` claims a host cluster of refcount 1 (COPIED, data or preallocated
 * zero) at an unaligned offset. Such an entry must not be written through: QEMU marks the
 * image corrupt there rather than write beside the cluster or reuse it.
 */
export function copiedMisaligned(s: Qcow2State, l2: U64TableView, i: number): boolean {
  const hi = l2.hi(i);
  const lo = l2.lo(i);
  if (!entryCopied(hi) || entryOffset(hi, lo) % s.clusterSize === 0) return false;
  const type = clusterType(s.fmt, hi, lo);
  return type === ClusterType.Normal || type === ClusterType.ZeroAlloc;
}

/** Mark the image corrupt for the entry {@link copiedMisaligned} found (guest cluster `g`). */
export function refuseMisaligned(
  s: Qcow2State,
  l2Offset: number,
  l2: U64TableView,
  i: number,
  g: number,
): Promise<never> {
  const hi = l2.hi(i);
  const lo = l2.lo(i);
  const zero = clusterType(s.fmt, hi, lo) === ClusterType.ZeroAlloc;
  return signalCorruption(
    s,
    `${zero ? "preallocated zero" : "data"} cluster offset ${hex(entryOffset(hi, lo))} for guest offset ${hex(g * s.clusterSize)} is not aligned to the cluster size ${s.clusterSize}`,
    l2Offset + i * 8,
  );
}

/** True when standard L2 entry word `i` can take a write in place. */
export function inPlace(s: Qcow2State, l2: U64TableView, i: number): boolean {
  const hi = l2.hi(i);
  // A data cluster (not compressed, no zero flag) whose refcount is exactly 1.
  return entryCopied(hi) && clusterType(s.fmt, hi, l2.lo(i)) === ClusterType.Normal;
}

/** The host offset in L2 entry word `i` (0 for none; not meaningful for compressed entries). */
export function hostOf(l2: U64TableView, i: number): number {
  return entryOffset(l2.hi(i), l2.lo(i));
}

/** Point L2 entry word `i` at data cluster `host`, COPIED (the subcluster bitmap is not touched). */
export function setDataEntry(l2: U64TableView, i: number, host: number): void {
  l2.setWords(i, withCopied(Math.floor(host / TWO_32), true), host >>> 0);
}

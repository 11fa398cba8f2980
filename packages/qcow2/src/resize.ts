/** Growing the disk (QEMU's qcow2_co_truncate for a larger size, preallocation off). */
import { InvalidArgumentError, UnsupportedFeatureError, U64TableView } from "@qimg/structs";
import { buildMetadataMap, checkOverlap, refreshRefcountBlocks, updateHeader } from "./overlap.js";
import { checkWritable, withClusters } from "./state.js";
import type { Qcow2State } from "./state.js";
import { zeroAligned } from "./zero.js";
import { writeLocked } from "./write.js";
import { flushImage, flushLocked } from "./flush.js";
import { markDirtyOnDisk } from "./dirty.js";
import { hostOf, l2ForWrite, setDataEntry } from "./alloc.js";
import { ClusterType, clusterType, l2Word } from "./spec/l2.js";
import { checkShrink, shrinkImage } from "./shrink.js";

/** qemu-img's `--preallocation` modes for a growing resize. */
export type Qcow2Preallocation = "off" | "metadata" | "falloc" | "full";

/** Options of {@link resizeWith} (`Qcow2Image.resizeWith`). */
export interface Qcow2ResizeOptions {
  /** Allow a smaller size: everything past the new end is lost (qemu-img's `--shrink`). */
  readonly shrink?: boolean;
  /** How the new area of a growing resize is allocated (default `off`). */
  readonly preallocation?: Qcow2Preallocation;
}

/**
 * Resize as qemu-img does with options: a smaller size needs `shrink` (then QEMU's shrink,
 * see shrink.ts) and takes no preallocation; a larger one may preallocate the new area.
 */
export async function resizeWith(
  s: Qcow2State,
  newSize: number,
  options: Qcow2ResizeOptions = {},
): Promise<void> {
  const prealloc = options.preallocation ?? "off";
  if (!["off", "metadata", "falloc", "full"].includes(prealloc)) {
    throw new InvalidArgumentError(`Unsupported preallocation mode '${String(prealloc)}'`);
  }
  checkShrink(s, newSize);
  const before = s.size;
  if (newSize < s.size) {
    if (options.shrink !== true) {
      throw new InvalidArgumentError(
        `qcow2 images cannot be shrunk (from ${s.size} to ${newSize} bytes) without the shrink option`,
      );
    }
    if (prealloc !== "off") {
      throw new InvalidArgumentError("Preallocation can't be used for shrinking an image");
    }
    await shrinkImage(s, newSize);
  } else {
    const old = s.size;
    await resizeImage(s, newSize);
    // A raw external data file is the guest disk: every cluster is mapped (QEMU preallocates
    // the metadata of the new area, and the data file reaches the end of its last cluster).
    const mode = s.dataFileRaw && prealloc === "off" ? "metadata" : prealloc;
    if (mode !== "off" && newSize > old) await preallocate(s, old, newSize, mode);
  }
  // QEMU sets an external data file to the new size too (cut on shrink, zeros on grow).
  if (s.hasDataFile && s.dataBackend !== s.backend) {
    const cs = s.clusterSize;
    const grew = newSize > before;
    await s.dataBackend.truncate(grew && s.dataFileRaw ? Math.ceil(newSize / cs) * cs : newSize);
    await s.dataBackend.flush();
  }
}

/**
 * Grow the disk to `newSize` bytes (a multiple of 512). When the L1 table is too small, a
 * larger one is written and synced before the header points at it; the old one is freed
 * afterwards. Shrinking is refused (data would be lost).
 */
export async function resizeImage(s: Qcow2State, newSize: number): Promise<void> {
  const w = checkWritable(s);
  if (!Number.isSafeInteger(newSize) || newSize < 0 || newSize % 512 !== 0) {
    throw new InvalidArgumentError("The new size must be a multiple of 512");
  }
  if (newSize < s.size) {
    throw new InvalidArgumentError(
      `qcow2 images cannot be shrunk (from ${s.size} to ${newSize} bytes): data past the new end would be lost`,
    );
  }
  s.pbm?.checkResize();
  // A backing file that reaches past the old end would show through the new area: QEMU
  // then zeroes the whole new area, with zero flags from the first granule boundary at or
  // after the old end (a subcluster; a cluster on version 2) and zero bytes before it.
  // Version 2 has no zero flag: QEMU refuses when the new end passes that boundary (before
  // changing anything, here); a grow inside the old last cluster only writes zero bytes.
  const oldSize = s.size;
  const backingEnd =
    s.backing !== undefined ? s.backing.virtualSize : s.backingFilename !== undefined ? newSize : 0;
  const zeroNew = newSize > oldSize && backingEnd > oldSize;
  const zeroGran = s.hdr.version === 2 ? s.clusterSize : s.subclusterSize;
  const zeroStart = Math.ceil(oldSize / zeroGran) * zeroGran;
  if (zeroNew && s.hdr.version === 2 && newSize > zeroStart) {
    throw new UnsupportedFeatureError(
      `Failed to zero out new clusters: a version 2 image (compat=0.10) cannot hide its backing file's data past its last cluster (${zeroStart} bytes) without zero clusters`,
      ["zero clusters"],
    );
  }
  await w.claims.drain();
  await w.meta.run(async () => {
    await flushLocked(s);
    const cs = s.clusterSize;
    const needed = Math.ceil(newSize / (cs * s.l2Entries));
    if (needed * 8 > 32 * 1024 * 1024) {
      throw new InvalidArgumentError(
        `${newSize} bytes is too large for this image's cluster size ${cs}`,
      );
    }
    if (needed > s.l1.length) {
      const clusters = Math.ceil((needed * 8) / cs);
      const offset = await w.refcounts.allocate(clusters);
      refreshRefcountBlocks(s, offset + clusters * cs);
      await checkOverlap(s, offset, clusters * cs);
      const grown = new U64TableView(new Uint8Array(needed * 8), "big");
      grown.bytes.set(s.l1.bytes);
      const padded = new Uint8Array(clusters * cs);
      padded.set(grown.bytes);
      await w.refcountCache.flush();
      await s.backend.write(offset, padded);
      await s.backend.flush();
      const oldOffset = s.hdr.l1TableOffset;
      const oldClusters = Math.ceil((s.hdr.l1Size * 8) / cs);
      await updateHeader(s, { l1TableOffset: offset, l1Size: needed, size: newSize });
      s.l1 = grown;
      s.fileSize = Math.max(s.fileSize, offset + clusters * cs);
      if (oldClusters > 0) await w.refcounts.free(oldOffset, oldClusters);
      await w.refcountCache.flush();
      buildMetadataMap(s);
    } else {
      await updateHeader(s, { size: newSize });
    }
    s.size = newSize;
    s.pbm?.resize(newSize);
  });
  if (zeroNew) {
    const cs = s.clusterSize;
    await withClusters(s, Math.floor(oldSize / cs), Math.floor((newSize - 1) / cs), async () => {
      if (newSize > zeroStart) await zeroAligned(s, zeroStart, newSize, "zero", false);
      if (zeroStart > oldSize)
        await writeLocked(s, oldSize, new Uint8Array(Math.min(zeroStart, newSize) - oldSize));
    });
    await flushImage(s);
  }
}

/**
 * Preallocate the guest clusters from the first cluster boundary at or after `from` up to `to`
 * (qemu-img resize --preallocation): each unallocated cluster gets a host cluster and a data
 * entry. The host clusters read as zeros: `full` writes zeros into all of them, `metadata` and
 * `falloc` only into clusters reused inside the file (the file is extended sparsely past its
 * old end; qimg has no fallocate, so `falloc` is `metadata` here).
 */
async function preallocate(
  s: Qcow2State,
  from: number,
  to: number,
  mode: Qcow2Preallocation,
): Promise<void> {
  const w = checkWritable(s);
  if (w.lazy) await markDirtyOnDisk(s);
  const cs = s.clusterSize;
  const firstCluster = Math.ceil(from / cs);
  const endCluster = Math.ceil(to / cs);
  if (firstCluster >= endCluster) return;
  await w.claims.drain();
  await w.meta.run(async () => {
    for (let g = firstCluster; g < endCluster;) {
      const l1Index = Math.floor(g / s.l2Entries);
      const stop = Math.min(endCluster, (l1Index + 1) * s.l2Entries);
      const table = await l2ForWrite(s, l1Index);
      try {
        const l2 = new U64TableView(table.bytes, "big");
        const todo: number[] = [];
        for (let c = g; c < stop; c++) {
          const i = l2Word(s.fmt, c - l1Index * s.l2Entries);
          const t = clusterType(s.fmt, l2.hi(i), l2.lo(i));
          if (t === ClusterType.Unallocated || (t === ClusterType.ZeroPlain && hostOf(l2, i) === 0))
            todo.push(i);
        }
        if (todo.length > 0 && s.hasDataFile) {
          // An external data file maps each guest cluster at its own offset (no refcounts).
          for (const i of todo) {
            const g = l1Index * s.l2Entries + (s.extendedL2 ? i / 2 : i);
            setDataEntry(l2, i, g * cs);
            if (s.extendedL2) l2.setWords(i + 1, 0, 0xffff_ffff);
            else l2.setWords(i, l2.hi(i), (l2.lo(i) & ~1) >>> 0);
          }
          await s.l2Cache.markDirty(table);
        } else if (todo.length > 0) {
          const host = await w.refcounts.allocate(todo.length);
          refreshRefcountBlocks(s, host + todo.length * cs);
          await checkOverlap(s, host, todo.length * cs);
          const fileEnd = await s.backend.size();
          const zeroEnd =
            mode === "full" ? host + todo.length * cs : Math.min(fileEnd, host + todo.length * cs);
          for (let p = host; p < zeroEnd; p += 1024 * 1024) {
            await s.backend.write(p, new Uint8Array(Math.min(1024 * 1024, zeroEnd - p)));
          }
          if (host + todo.length * cs > fileEnd) await s.backend.truncate(host + todo.length * cs);
          s.fileSize = Math.max(s.fileSize, host + todo.length * cs);
          s.l2Cache.dependOnFlush();
          todo.forEach((i, k) => {
            setDataEntry(l2, i, host + k * cs);
            if (s.extendedL2) l2.setWords(i + 1, 0, 0xffff_ffff);
            else l2.setWords(i, l2.hi(i), (l2.lo(i) & ~1) >>> 0);
          });
          await s.l2Cache.markDirty(table);
        }
      } finally {
        s.l2Cache.release(table);
      }
      g = stop;
    }
    await flushLocked(s);
  });
}

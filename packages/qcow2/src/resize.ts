/** Growing the disk (QEMU's qcow2_co_truncate for a larger size, preallocation off). */
import { InvalidArgumentError, UnsupportedFeatureError, U64TableView } from "@qimg/structs";
import { buildMetadataMap, checkOverlap, refreshRefcountBlocks, updateHeader } from "./overlap.js";
import { checkWritable, withClusters } from "./state.js";
import type { Qcow2State } from "./state.js";
import { zeroAligned } from "./zero.js";
import { writeLocked } from "./write.js";
import { flushImage, flushLocked } from "./flush.js";

/**
 * Grow the disk to `newSize` bytes (a multiple of 512). When the L1 table is too small, a
 * larger one is written and synced before the header points at it; the old one is freed
 * afterwards. Shrinking is refused (data would be lost).
 */
export async function resizeImage(s: Qcow2State, newSize: number): Promise<void> {
  const w = checkWritable(s);
  if (!Number.isSafeInteger(newSize) || newSize < 0 || newSize % 512 !== 0) {
    throw new InvalidArgumentError(`The new size must be a multiple of 512 (got ${newSize})`);
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

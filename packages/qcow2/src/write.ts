/**
 * Guest writes: in place where the clusters are writable (a lock-free fast path when the L2
 * table is cached), otherwise through the allocating copy-on-write path (cow.ts).
 */
import { U64TableView } from "@qimg/structs";
import { checkData, checkOverlap } from "./overlap.js";
import { checkWritable, l1Copied, l1Entry, withClusters } from "./state.js";
import type { Qcow2State } from "./state.js";
import { checkRequest } from "@qimg/io";
import { copiedMisaligned, hostOf, inPlace, l2ForWrite, refuseMisaligned } from "./alloc.js";
import { l2Word } from "./spec/l2.js";
import { allocatingWrite, writeClusterExtended } from "./cow.js";
import { markDirtyOnDisk } from "./dirty.js";
import { flushImage } from "./flush.js";

/** Write guest bytes. Allocates (copying on write) where the clusters are not writable in place. */
export async function guestWrite(s: Qcow2State, offset: number, data: Uint8Array): Promise<void> {
  checkWritable(s);
  checkRequest(offset, data.length, s.size);
  if (data.length === 0) return;
  s.pbm?.setDirty(offset, data.length);
  const cs = s.clusterSize;
  await withClusters(s, Math.floor(offset / cs), Math.floor((offset + data.length - 1) / cs), () =>
    writeLocked(s, offset, data),
  );
  if (s.w?.writethrough) await flushImage(s);
}

/** Write while holding the cluster claim for the range. */
export async function writeLocked(s: Qcow2State, offset: number, data: Uint8Array): Promise<void> {
  const cs = s.clusterSize;
  const span = s.l2Entries * cs;
  const end = offset + data.length;
  // Most requests stay inside one L2 table's range: no subarray for them.
  if (Math.floor(offset / span) === Math.floor((end - 1) / span)) {
    await writeChunk(s, offset, data);
    return;
  }
  let pos = offset;
  while (pos < end) {
    const chunkEnd = Math.min(end, (Math.floor(pos / span) + 1) * span);
    await writeChunk(s, pos, data.subarray(pos - offset, chunkEnd - offset));
    pos = chunkEnd;
  }
}

/** Write [pos, pos + src.length), which lies inside one L2 table's range. */
export async function writeChunk(s: Qcow2State, pos: number, src: Uint8Array): Promise<void> {
  const w = s.w!;
  const cs = s.clusterSize;
  const end = pos + src.length;
  const g0 = Math.floor(pos / cs);
  const g1 = Math.floor((end - 1) / cs);
  const l1Index = Math.floor(g0 / s.l2Entries);
  const base = l1Index * s.l2Entries;
  // Fast path: the L2 table is cached and every cluster is writable in place, so no metadata
  // changes and no lock are needed (the host offsets are taken before the first await).
  if (!s.extendedL2 && l1Copied(s, l1Index)) {
    const cached = s.l2Cache.peek(l1Entry(s, l1Index));
    if (cached) {
      const l2 = new U64TableView(cached.bytes, "big");
      const h = hostOf(l2, g0 - base);
      // (An unaligned offset takes the slow path, which refuses it.)
      let ok = h % cs === 0 && inPlace(s, l2, g0 - base);
      for (let g = g0 + 1; ok && g <= g1; g++) {
        ok = inPlace(s, l2, g - base) && hostOf(l2, g - base) === h + (g - g0) * cs;
      }
      if (ok) {
        const hostStart = h + (pos - g0 * cs);
        if (!s.hasDataFile) {
          for (
            let c = Math.floor(hostStart / cs);
            c <= Math.floor((hostStart + src.length - 1) / cs);
            c++
          ) {
            if (w.metadata.has(c)) await checkOverlap(s, c * cs, cs);
          }
        }
        await s.dataBackend.write(hostStart, src);
        return;
      }
    }
  }
  if (w.lazy) await markDirtyOnDisk(s);
  const table = await w.meta.run(() => l2ForWrite(s, l1Index));
  try {
    const l2 = new U64TableView(table.bytes, "big");
    for (let g = g0; g <= g1; g++) {
      const i = l2Word(s.fmt, g - base);
      if (copiedMisaligned(s, l2, i)) await refuseMisaligned(s, table.offset, l2, i, g);
    }
    if (s.extendedL2) {
      for (let g = g0; g <= g1; g++) {
        const cStart = Math.max(pos, g * cs);
        const cEnd = Math.min(end, (g + 1) * cs);
        await writeClusterExtended(
          s,
          table,
          l2,
          g - base,
          g,
          cStart,
          src.subarray(cStart - pos, cEnd - pos),
        );
      }
      return;
    }
    let g = g0;
    while (g <= g1) {
      const i = g - base;
      if (inPlace(s, l2, i)) {
        const h = hostOf(l2, i);
        let gEnd = g + 1;
        while (
          gEnd <= g1 &&
          inPlace(s, l2, gEnd - base) &&
          hostOf(l2, gEnd - base) === h + (gEnd - g) * cs
        ) {
          gEnd++;
        }
        const runStart = Math.max(pos, g * cs);
        const runEnd = Math.min(end, gEnd * cs);
        const hostStart = h + (runStart - g * cs);
        await checkData(s, hostStart, runEnd - runStart);
        await s.dataBackend.write(hostStart, src.subarray(runStart - pos, runEnd - pos));
        g = gEnd;
      } else {
        let gEnd = g + 1;
        while (gEnd <= g1 && !inPlace(s, l2, gEnd - base)) gEnd++;
        await allocatingWrite(s, table, l2, base, g, gEnd, pos, src);
        g = gEnd;
      }
    }
  } finally {
    s.l2Cache.release(table);
  }
}

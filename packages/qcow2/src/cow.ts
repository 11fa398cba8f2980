/**
 * Allocating writes with copy on write (QEMU's qcow2_alloc_host_offset + perform_cow): new
 * clusters get the new data plus the old contents around it, then the L2 entries point at them.
 */
import type { U64TableView } from "@qimg/structs";
import type { CachedTable } from "@qimg/cluster-cache";
import { l2Word } from "./spec/l2.js";
import { checkData, checkOverlap, refreshRefcountBlocks } from "./overlap.js";
import type { Qcow2State } from "./state.js";
import { hostOf, inPlace, queueFree, setDataEntry } from "./alloc.js";
import { readGuest } from "./cluster-map.js";

/**
 * Allocate fresh clusters for guest clusters [g0, g1), fill them with the new data plus the
 * old contents around it (copy on write), then point the L2 entries at them.
 */
export async function allocatingWrite(
  s: Qcow2State,
  table: CachedTable,
  l2: U64TableView,
  base: number,
  g0: number,
  g1: number,
  pos: number,
  src: Uint8Array,
): Promise<void> {
  const w = s.w!;
  const cs = s.clusterSize;
  const n = g1 - g0;
  const end = pos + src.length;
  let host: number;
  if (s.hasDataFile) {
    host = g0 * cs; // clusters in an external data file sit at their guest offset
  } else {
    host = await w.meta.run(async () => {
      const h = await w.refcounts.allocate(n);
      refreshRefcountBlocks(s, h + n * cs);
      return h;
    });
    await checkOverlap(s, host, n * cs);
  }
  const runStart = g0 * cs;
  const runEnd = g1 * cs;
  const dataStart = Math.max(pos, runStart);
  const dataEnd = Math.min(end, runEnd);
  const body = src.subarray(dataStart - pos, dataEnd - pos);
  const headLen = dataStart - runStart;
  const tailLen = runEnd - dataEnd;
  if (headLen === 0 && tailLen === 0) {
    await s.dataBackend.write(host, body);
  } else if (n * cs <= 4 * 1024 * 1024) {
    const buf = new Uint8Array(n * cs);
    if (headLen > 0) await readGuest(s, runStart, buf.subarray(0, headLen));
    buf.set(body, headLen);
    if (tailLen > 0) await readGuest(s, dataEnd, buf.subarray(n * cs - tailLen));
    await s.dataBackend.write(host, buf);
  } else {
    if (headLen > 0) {
      const head = new Uint8Array(headLen);
      await readGuest(s, runStart, head);
      await s.dataBackend.write(host, head);
    }
    await s.dataBackend.write(host + headLen, body);
    if (tailLen > 0) {
      const tail = new Uint8Array(tailLen);
      await readGuest(s, dataEnd, tail);
      await s.dataBackend.write(host + n * cs - tailLen, tail);
    }
  }
  s.fileSize = Math.max(s.fileSize, s.hasDataFile ? s.fileSize : host + n * cs);
  // Copied-on-write bytes are synced before any L2 table pointing at them is written (QEMU's
  // perform_cow): with lazy refcounts nothing else orders them.
  if (headLen > 0 || tailLen > 0)
    s.l2Cache.dependOnFlush(s.hasDataFile ? s.dataBackend : undefined);
  await w.meta.run(async () => {
    for (let k = 0; k < n; k++) {
      const i = g0 + k - base;
      queueFree(s, l2, i);
      setDataEntry(l2, i, host + k * cs);
    }
    await s.l2Cache.markDirty(table);
  });
}

/** Extended L2: write inside one cluster at subcluster granularity. */
export async function writeClusterExtended(
  s: Qcow2State,
  table: CachedTable,
  l2: U64TableView,
  index: number,
  g: number,
  start: number,
  src: Uint8Array,
): Promise<void> {
  const w = s.w!;
  const cs = s.clusterSize;
  const scs = s.subclusterSize;
  const i = l2Word(s.fmt, index);
  const within = start - g * cs;
  const sc0 = Math.floor(within / scs);
  const sc1 = Math.floor((within + src.length - 1) / scs);
  const touched =
    (sc1 === 31 ? 0xffff_ffff : ((1 << (sc1 + 1)) >>> 0) - 1) & ~(((1 << sc0) >>> 0) - 1);
  const off = hostOf(l2, i);
  // A data cluster of refcount 1: its subclusters are filled in place.
  if (inPlace(s, l2, i)) {
    const alloc = l2.lo(i + 1);
    if ((alloc & touched) >>> 0 === touched >>> 0) {
      await checkData(s, off + within, src.length);
      await s.dataBackend.write(off + within, src);
      return;
    }
    // Fill the touched subclusters: old contents around the new data, then mark them allocated.
    const regionStart = sc0 * scs;
    const buf = new Uint8Array((sc1 + 1) * scs - regionStart);
    await readGuest(s, g * cs + regionStart, buf);
    buf.set(src, within - regionStart);
    await checkData(s, off + regionStart, buf.length);
    await s.dataBackend.write(off + regionStart, buf);
    s.l2Cache.dependOnFlush(s.hasDataFile ? s.dataBackend : undefined);
    await w.meta.run(async () => {
      l2.setWords(i + 1, (l2.hi(i + 1) & ~touched) >>> 0, (l2.lo(i + 1) | touched) >>> 0);
      await s.l2Cache.markDirty(table);
    });
    return;
  }
  // A new cluster: copy the whole cluster's current contents and allocate every subcluster.
  let host: number;
  if (s.hasDataFile) {
    host = g * cs;
  } else {
    host = await w.meta.run(async () => {
      const h = await w.refcounts.allocate(1);
      refreshRefcountBlocks(s, h + cs);
      return h;
    });
    await checkOverlap(s, host, cs);
  }
  const buf = new Uint8Array(cs);
  await readGuest(s, g * cs, buf);
  buf.set(src, within);
  await s.dataBackend.write(host, buf);
  if (!s.hasDataFile) s.fileSize = Math.max(s.fileSize, host + cs);
  if (src.length < cs) s.l2Cache.dependOnFlush(s.hasDataFile ? s.dataBackend : undefined);
  await w.meta.run(async () => {
    queueFree(s, l2, i);
    setDataEntry(l2, i, host);
    l2.setWords(i + 1, 0, 0xffff_ffff); // every subcluster allocated
    await s.l2Cache.markDirty(table);
  });
}

/**
 * Zero writes and discards (QEMU's qcow2_co_pwrite_zeroes / qcow2_cluster_zeroize /
 * qcow2_cluster_discard): through the L2 entries where the format can express it, zero bytes
 * where it cannot.
 */
import { U64TableView } from "@qimg/structs";
import { OFLAG_ZERO, entryCompressed, entryCopied, l2Word } from "./spec/l2.js";
import { checkWritable, hasBackingFile, l1Entry, withClusters } from "./state.js";
import type { Qcow2State } from "./state.js";
import { checkRequest } from "@qimg/io";
import type { WriteZeroesOptions } from "@qimg/io";
import { Kind, readsAsZeros, resolve } from "./cluster-map.js";
import { hostOf, l2ForWrite, queueFree } from "./alloc.js";
import { writeChunk, writeLocked } from "./write.js";
import { markDirtyOnDisk } from "./dirty.js";
import { flushImage } from "./flush.js";

/** QEMU writes at most this much zero bytes per try when a zero write falls back. */
const ZERO_FALLBACK_MAX = 16 * 1024 * 1024;

/**
 * Make [offset, +length) read as zeros. Whole clusters (subclusters with extended L2) get
 * the zero flag on version 3 images (released when `mayUnmap`); partial ones are written
 * with zero bytes.
 */
export async function guestWriteZeroes(
  s: Qcow2State,
  offset: number,
  length: number,
  options: WriteZeroesOptions = {},
): Promise<void> {
  checkWritable(s);
  checkRequest(offset, length, s.size);
  if (length === 0) return;
  s.pbm?.setDirty(offset, length);
  const cs = s.clusterSize;
  await withClusters(
    s,
    Math.floor(offset / cs),
    Math.floor((offset + length - 1) / cs),
    async () => {
      // QEMU's request loop: a piece up to the first granule boundary, then the aligned
      // middle, then the tail. Each piece is zeroed through the metadata when the format
      // can express it; otherwise (a compressed cluster partly covered, a version 2 image
      // over a backing file, a partial granule holding data) the whole piece is written
      // as zero bytes, at most 16 MiB at a time before the metadata is tried again.
      const gran = s.hdr.version === 2 ? cs : s.subclusterSize;
      const unmap = options.mayUnmap ?? false;
      let head = offset % gran;
      const tail = (offset + length) % gran;
      let pos = offset;
      let bytes = length;
      let zeros: Uint8Array | undefined;
      while (bytes > 0) {
        let num = bytes;
        if (head) {
          num = Math.min(bytes, gran - head);
          head = (head + num) % gran;
        } else if (tail && num > gran) {
          num -= tail;
        }
        if (!(await zeroPiece(s, pos, num, gran, unmap))) {
          num = Math.min(num, ZERO_FALLBACK_MAX);
          if (!zeros || zeros.length < num) zeros = new Uint8Array(num);
          await writeLocked(s, pos, zeros.subarray(0, num));
        }
        pos += num;
        bytes -= num;
      }
    },
  );
  if (s.w?.writethrough) await flushImage(s);
}

/**
 * Zero [start, start + n) through the metadata, as QEMU's driver does; false when the
 * format cannot (the caller writes zero bytes). A piece that is not granule aligned is
 * widened to its granule when the rest of the granule reads as zeros and the granule
 * holds no data. Version 2 has no zero flag: without a backing file the clusters are
 * released (they read as zeros); over a backing file nothing can be done.
 */
export async function zeroPiece(
  s: Qcow2State,
  start: number,
  n: number,
  gran: number,
  unmap: boolean,
): Promise<boolean> {
  let end = start + n;
  const h = start % gran;
  let t = end === s.size ? 0 : (gran - (end % gran)) % gran;
  if (h || t) {
    t = Math.min(t, s.size - end);
    if (!(await readsAsZeros(s, start - h, start)) || !(await readsAsZeros(s, end, end + t)))
      return false;
    start -= h;
    const e = await resolve(s, start, gran);
    if (e.kind !== Kind.Unallocated && e.kind !== Kind.Zero) return false;
    end = Math.min(start + gran, s.size);
  }
  if (s.hdr.version === 2 && hasBackingFile(s)) return false;
  return zeroAligned(s, start, end, "zero", unmap);
}

/**
 * Discard [offset, +length): whole clusters only (as QEMU). The clusters are released; they
 * read as zeros afterwards (unallocated without a backing file on version 2). A version 2
 * image with a backing file has no way to make a released cluster read as zeros (no zero
 * flag), so there the discard does nothing, as QEMU's (which reports success).
 */
export async function guestDiscard(s: Qcow2State, offset: number, length: number): Promise<void> {
  checkWritable(s);
  checkRequest(offset, length, s.size);
  // QEMU dirties the whole requested range, even where nothing is released.
  s.pbm?.setDirty(offset, length);
  if (s.hdr.version === 2 && (s.backing !== undefined || s.backingFilename !== undefined)) return;
  const cs = s.clusterSize;
  const end = offset + length;
  const alignedStart = Math.ceil(offset / cs) * cs;
  const alignedEnd = end === s.size ? end : Math.floor(end / cs) * cs;
  if (alignedStart >= alignedEnd) return;
  await withClusters(s, alignedStart / cs, Math.floor((alignedEnd - 1) / cs), () =>
    zeroAligned(s, alignedStart, alignedEnd, "discard", true),
  );
  if (s.w?.writethrough) await flushImage(s);
}

/**
 * Zero or discard [start, end) in the L2 entries (granule aligned, or ending at the end of
 * the disk). False when a zero write reaches part of a compressed cluster, which has no
 * subcluster bits: the entries before it are done, the rest is left (as QEMU's driver).
 */
export async function zeroAligned(
  s: Qcow2State,
  start: number,
  end: number,
  mode: "zero" | "discard",
  mayUnmap: boolean,
): Promise<boolean> {
  const w = s.w!;
  const cs = s.clusterSize;
  {
    // A raw external data file equals the guest disk at all times: zero it first (as QEMU
    // does), for discards as well as zero writes.
    if (s.dataFileRaw) await zeroDataFile(s, start, end);
    if (w.lazy) await markDirtyOnDisk(s);
    const span = s.l2Entries * cs;
    let pos = start;
    while (pos < end) {
      const chunkEnd = Math.min(end, (Math.floor(pos / span) + 1) * span);
      const l1Index = Math.floor(pos / span);
      const base = l1Index * s.l2Entries;
      // Nothing to do for a discard where no L2 table exists and nothing shows through.
      if (l1Entry(s, l1Index) === 0 && (mode === "discard" || s.hdr.version === 2) && !s.backing) {
        pos = chunkEnd;
        continue;
      }
      // Guest ranges the L2 entries cannot express as zeros: zero bytes are written there
      // (QEMU's fallback when its zeroing reports "not supported").
      const fallback: [number, number][] = [];
      let supported = true;
      await w.meta.run(async () => {
        const table = await l2ForWrite(s, l1Index);
        try {
          const l2 = new U64TableView(table.bytes, "big");
          for (let p = pos; p < chunkEnd;) {
            const g = Math.floor(p / cs);
            const i = g - base;
            const cEnd = Math.min(chunkEnd, (g + 1) * cs);
            if (s.extendedL2) {
              if (!zeroExtended(s, l2, i, g, p - g * cs, cEnd - g * cs, mode, mayUnmap)) {
                supported = false;
                break;
              }
            } else {
              zeroStandard(s, l2, i, g, mode, mayUnmap, fallback);
            }
            p = cEnd;
          }
          await s.l2Cache.markDirty(table);
        } finally {
          s.l2Cache.release(table);
        }
      });
      for (const [o, n] of fallback) {
        await writeChunk(s, o, new Uint8Array(n));
      }
      if (!supported) return false;
      pos = chunkEnd;
    }
  }
  return true;
}

/** Write zeros into the external data file over guest bytes [start, end). */
export async function zeroDataFile(s: Qcow2State, start: number, end: number): Promise<void> {
  const chunk = Math.min(end - start, 1024 * 1024);
  const zeros = new Uint8Array(chunk);
  for (let pos = start; pos < end; pos += chunk) {
    const n = Math.min(chunk, end - pos);
    await s.dataBackend.write(pos, n === chunk ? zeros : zeros.subarray(0, n));
  }
}

export function zeroStandard(
  s: Qcow2State,
  l2: U64TableView,
  i: number,
  g: number,
  mode: "zero" | "discard",
  mayUnmap: boolean,
  fallback: [number, number][],
): void {
  const cs = s.clusterSize;
  const hi = l2.hi(i);
  const lo = l2.lo(i);
  const compressed = entryCompressed(hi);
  const host = compressed ? 0 : hostOf(l2, i);
  const allocated = compressed || host !== 0 || (s.hasDataFile && entryCopied(hi));
  const v3 = s.hdr.version === 3;
  if (mode === "discard") {
    if (!s.backing && !allocated) return;
    if (allocated) queueFree(s, l2, i);
    l2.setWords(i, 0, v3 ? OFLAG_ZERO.lo : 0);
    return;
  }
  if (!v3) {
    // No zero flag. Without a backing file a released cluster reads as zeros, so QEMU
    // zeroes by discarding (the cluster is freed, with or without unmap); over a backing
    // file only zero bytes can hide its data.
    if (!hasBackingFile(s)) {
      if (allocated) queueFree(s, l2, i);
      l2.setWords(i, 0, 0);
      return;
    }
    fallback.push([g * cs, Math.min(cs, s.size - g * cs)]);
    return;
  }
  if (allocated && !mayUnmap && !compressed && !s.hasDataFile) {
    // Keep the cluster allocated (zero-alloc), as QEMU does without unmap, also when it is
    // shared with a snapshot (not COPIED: a later write allocates a new cluster).
    l2.setWords(i, hi, (lo | OFLAG_ZERO.lo) >>> 0);
    return;
  }
  if (allocated) queueFree(s, l2, i);
  l2.setWords(i, 0, OFLAG_ZERO.lo);
}

export function zeroExtended(
  s: Qcow2State,
  l2: U64TableView,
  index: number,
  g: number,
  from: number,
  to: number,
  mode: "zero" | "discard",
  mayUnmap: boolean,
): boolean {
  const scs = s.subclusterSize;
  const cs = s.clusterSize;
  const i = l2Word(s.fmt, index);
  // The last cluster of the disk may be shorter than a cluster: covering it from its start
  // to the end of the disk counts as covering the whole cluster (as QEMU takes it).
  const toEnd = from === 0 && g * cs + to >= s.size;
  const sc0 = Math.floor(from / scs);
  const sc1 = toEnd ? 31 : Math.ceil(to / scs) - 1;
  const mask =
    (sc1 === 31 ? 0xffff_ffff : ((1 << (sc1 + 1)) >>> 0) - 1) & ~(((1 << sc0) >>> 0) - 1);
  const whole = mask >>> 0 === 0xffff_ffff;
  const hi = l2.hi(i);
  const compressed = entryCompressed(hi);
  const host = compressed ? 0 : hostOf(l2, i);
  if (whole && (mayUnmap || mode === "discard" || compressed)) {
    if (compressed || host !== 0) queueFree(s, l2, i);
    l2.setWords(i, 0, 0);
    l2.setWords(i + 1, 0xffff_ffff, 0);
    return true;
  }
  // A compressed cluster has no subcluster bits: QEMU's zeroing reports "not supported"
  // and zero bytes are written instead (copy on write of the decompressed cluster).
  if (compressed) return mode !== "zero";
  l2.setWords(i + 1, (l2.hi(i + 1) | mask) >>> 0, (l2.lo(i + 1) & ~mask) >>> 0);
  return true;
}

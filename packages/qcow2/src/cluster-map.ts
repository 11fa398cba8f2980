/**
 * Guest offset -> what is stored there: the L1/L2 lookup (`resolve`, QEMU's
 * qcow2_get_host_offset), and the read path and block status built on it.
 */
import { CorruptImageError, InvalidArgumentError, U64TableView, hex } from "@qimg/structs";
import { backingNotOpenedError, checkRequest } from "@qimg/io";
import type { BlockStatus } from "@qimg/io";
import {
  ClusterType,
  SUBCLUSTERS,
  SubclusterType,
  clusterType,
  compressedLength as compressedLengthOf,
  compressedOffset,
  entryCopied,
  entryOffset,
  l2Word,
  subclusterType,
} from "./spec/l2.js";
import type { L2Format } from "./spec/l2.js";
import { checkUsable, l1Entry } from "./state.js";
import { signalCorruption } from "./overlap.js";
import type { Qcow2State } from "./state.js";

/** Kinds of guest ranges, as the qcow2 spec classifies (sub)clusters. */
export const Kind = {
  /** Not allocated here: read from the backing file or zeros. */
  Unallocated: 0,
  /** Reads as zeros; `host` is set when a cluster stays allocated (zero-alloc). */
  Zero: 1,
  /** Data stored uncompressed at `host`. */
  Normal: 2,
  /** Data stored compressed at `host` (a whole cluster). */
  Compressed: 3,
} as const;
export type Kind = (typeof Kind)[keyof typeof Kind];

/** One resolved run of guest bytes with the same kind. */
export interface Extent {
  kind: Kind;
  length: number;
  /** Host offset of the run's first byte, or -1. */
  host: number;
  /** Compressed: length of the compressed bytes. */
  compressedLength: number;
}

/** Subcluster `sc`'s type, judged on its own bitmap bits only. */
function subclusterAt(
  fmt: L2Format,
  hi: number,
  lo: number,
  bitmapHi: number,
  bitmapLo: number,
  sc: number,
): SubclusterType {
  const bit = (1 << sc) >>> 0;
  return subclusterType(fmt, hi, lo, bitmapHi & bit, bitmapLo & bit, sc);
}

/** Read guest bytes. Ranges past `virtualSize` are refused. */
export async function guestRead(s: Qcow2State, offset: number, buf: Uint8Array): Promise<void> {
  checkUsable(s);
  checkRequest(offset, buf.length, s.size);
  await readAt(s, offset, buf);
}

export async function readAt(s: Qcow2State, offset: number, buf: Uint8Array): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const pos = offset + done;
    const e = await resolve(s, pos, buf.length - done);
    const n = e.length;
    const dst = buf.subarray(done, done + n);
    switch (e.kind) {
      case Kind.Zero:
        dst.fill(0);
        break;
      case Kind.Normal:
        // Data past the end of the file (even past 2^53) reads as zeros, as QEMU reads it.
        if (e.host > Number.MAX_SAFE_INTEGER - n) dst.fill(0);
        else await s.dataBackend.read(e.host, dst, { zeroPastEof: true });
        break;
      case Kind.Compressed: {
        const cluster = await readCompressed(s, e.host, e.compressedLength);
        const inCluster = pos % s.clusterSize;
        dst.set(cluster.subarray(inCluster, inCluster + n));
        break;
      }
      case Kind.Unallocated:
        await readBacking(s, pos, dst);
        break;
    }
    done += n;
  }
}

/** The status of the extent at `offset` (at most `length` bytes), looking through backing files. */
export async function guestBlockStatus(
  s: Qcow2State,
  offset: number,
  length: number,
): Promise<BlockStatus> {
  checkUsable(s);
  checkRequest(offset, length, s.size);
  if (length === 0) throw new InvalidArgumentError("block status of an empty range");
  const e = await resolve(s, offset, length);
  const file = s.hasDataFile ? s.dataFileName : s.backend.name;
  switch (e.kind) {
    case Kind.Normal:
      return {
        offset,
        length: e.length,
        present: true,
        zero: false,
        data: true,
        depth: 0,
        hostOffset: e.host,
        file,
      };
    case Kind.Compressed:
      return {
        offset,
        length: e.length,
        present: true,
        zero: false,
        data: true,
        depth: 0,
        compressed: true,
        file,
      };
    case Kind.Zero:
      return {
        offset,
        length: e.length,
        present: true,
        zero: true,
        data: false,
        depth: 0,
        hostOffset: e.host >= 0 ? e.host : undefined,
        file: e.host >= 0 ? file : undefined,
      };
    case Kind.Unallocated: {
      const n = e.length;
      const b = s.backing;
      if (b && offset < b.virtualSize) {
        const s = await b.blockStatus(offset, Math.min(n, b.virtualSize - offset));
        return { ...s, depth: s.depth + 1 };
      }
      return {
        offset,
        length: n,
        present: false,
        zero: true,
        data: false,
        depth: 0,
        hostOffset: e.host >= 0 ? e.host : undefined,
        file: e.host >= 0 ? file : undefined,
      };
    }
  }
}

export async function readBacking(s: Qcow2State, pos: number, dst: Uint8Array): Promise<void> {
  const b = s.backing;
  if (!b && s.backingFilename !== undefined && !s.noBacking) {
    throw backingNotOpenedError(s.backend.name, s.backingFilename);
  }
  if (!b || pos >= b.virtualSize) {
    dst.fill(0);
    return;
  }
  const inBacking = Math.min(dst.length, b.virtualSize - pos);
  await b.read(pos, dst.subarray(0, inBacking));
  if (inBacking < dst.length) dst.fill(0, inBacking);
}

export async function readCompressed(
  s: Qcow2State,
  host: number,
  length: number,
): Promise<Uint8Array> {
  const last = s.lastCompressed;
  if (last && last.host === host) return last.data;
  const avail = Math.max(0, s.fileSize - host);
  if (host >= s.fileSize) {
    throw new CorruptImageError(
      `compressed cluster at ${hex(host)} is past the end of the file (${s.fileSize} bytes)`,
      {
        offset: host,
      },
    );
  }
  const src = new Uint8Array(Math.min(length, avail));
  await s.backend.read(host, src);
  const out = new Uint8Array(s.clusterSize);
  try {
    await s.decompress(src, out);
  } catch (cause) {
    throw new CorruptImageError(
      `compressed cluster at ${hex(host)} (${length} bytes) cannot be decompressed: ${(cause as Error).message}`,
      { offset: host, cause },
    );
  }
  s.lastCompressed = { host, data: out };
  return out;
}

/**
 * Resolve the run of guest bytes starting at `pos` (at most `max` bytes) that share one kind,
 * walking contiguous entries of one L2 table.
 */
export async function resolve(s: Qcow2State, pos: number, max: number): Promise<Extent> {
  // A fresh result per call (per extent, not per entry): concurrent requests interleave at
  // every await, so a shared scratch object would be overwritten under another request.
  const cs = s.clusterSize;
  const guestCluster = Math.floor(pos / cs);
  const l1Index = Math.floor(guestCluster / s.l2Entries);
  let l2Index = guestCluster % s.l2Entries;
  // Bytes until the end of the range this L2 table maps (or the request).
  const tableEnd = (l1Index + 1) * s.l2Entries * cs;
  const limit = Math.min(max, tableEnd - pos, s.size - pos);
  if (l1Index >= s.l1.length) {
    return { kind: Kind.Unallocated, length: limit, host: -1, compressedLength: 0 };
  }
  const l2Offset = l1Entry(s, l1Index);
  if (l2Offset === 0)
    return { kind: Kind.Unallocated, length: limit, host: -1, compressedLength: 0 };
  if (l2Offset % cs !== 0) {
    // As QEMU: a read-write open marks the image corrupt, a read-only one fails the request.
    await signalCorruption(
      s,
      `L2 table offset ${hex(l2Offset)} in L1 entry ${l1Index} is not aligned to the cluster size ${cs}`,
      s.hdr.l1TableOffset + l1Index * 8,
    );
  }
  if (l2Offset + cs > s.fileSize) {
    throw new CorruptImageError(
      `L2 table at ${hex(l2Offset)} (L1 entry ${l1Index}) is past the end of the file (${s.fileSize} bytes)`,
      { offset: s.hdr.l1TableOffset + l1Index * 8 },
    );
  }
  let table = s.l2Cache.peek(l2Offset);
  if (!table) {
    const pinned = await s.l2Cache.get(l2Offset);
    s.l2Cache.release(pinned);
    table = pinned;
  }
  const l2 = new U64TableView(table.bytes, "big");
  const fmt = s.fmt;
  let inCluster = pos % cs;
  let kind = -1 as Kind | -1;
  let host = -1;
  let length = 0;
  let compressedLength = 0;
  // Walk (sub)clusters while the kind stays the same and host offsets stay contiguous.
  while (length < limit && l2Index < s.l2Entries) {
    const i = l2Word(fmt, l2Index);
    const hi = l2.hi(i);
    const lo = l2.lo(i);
    const type = clusterType(fmt, hi, lo);
    let k: Kind;
    let h = -1;
    let runBytes: number;
    if (type === ClusterType.Compressed) {
      if (s.hasDataFile) {
        throw new CorruptImageError(
          `compressed cluster in L2 entry ${l2Index} of an image with an external data file`,
          { offset: l2Offset + i * 8 },
        );
      }
      const at = compressedOffset(fmt, hi, lo);
      if (at === 0) {
        throw new CorruptImageError(
          `compressed cluster descriptor in L2 entry ${l2Index} of table ${hex(l2Offset)} has offset 0`,
          { offset: l2Offset + i * 8 },
        );
      }
      k = Kind.Compressed;
      h = at;
      // Compressed clusters never merge: each decompresses on its own.
      if (length > 0) break;
      compressedLength = compressedLengthOf(fmt, hi, lo);
      runBytes = cs - inCluster;
    } else {
      const off = entryOffset(hi, lo);
      if (off !== 0 && off % cs !== 0) {
        await signalCorruption(
          s,
          `cluster offset ${hex(off)} in L2 entry ${l2Index} of table ${hex(l2Offset)} is not aligned to the cluster size ${cs}`,
          l2Offset + i * 8,
        );
      }
      // A host cluster: an offset, or (external data file) COPIED at offset 0.
      const hasHost = off !== 0 || (s.hasDataFile && entryCopied(hi));
      h = hasHost ? off + inCluster : -1;
      if (fmt.extendedL2) {
        const bitmapHi = l2.hi(i + 1);
        const bitmapLo = l2.lo(i + 1);
        const sc = Math.floor(inCluster / s.subclusterSize);
        // Each subcluster is judged on its own bits (a bad neighbour does not fail this one).
        const st = subclusterAt(fmt, hi, lo, bitmapHi, bitmapLo, sc);
        if (st === SubclusterType.Invalid) {
          const both = type === ClusterType.Normal || ((bitmapHi >>> sc) & 1) !== 0;
          throw new CorruptImageError(
            both
              ? `subcluster ${sc} of L2 entry ${l2Index} in table ${hex(l2Offset)} is marked both allocated and zero`
              : `subcluster ${sc} of L2 entry ${l2Index} in table ${hex(l2Offset)} is allocated but the cluster has no host offset`,
            { offset: l2Offset + i * 8 },
          );
        }
        k =
          st === SubclusterType.Normal
            ? Kind.Normal
            : st === SubclusterType.ZeroPlain || st === SubclusterType.ZeroAlloc
              ? Kind.Zero
              : Kind.Unallocated;
        // Extend across following subclusters of the same type.
        let end = sc + 1;
        while (end < SUBCLUSTERS && subclusterAt(fmt, hi, lo, bitmapHi, bitmapLo, end) === st)
          end++;
        runBytes = end * s.subclusterSize - inCluster;
      } else {
        if (type === ClusterType.ZeroPlain || type === ClusterType.ZeroAlloc) {
          if (s.hdr.version === 2) {
            throw new CorruptImageError(
              `zero cluster entry in L2 entry ${l2Index} of table ${hex(l2Offset)} in a version 2 image`,
              { offset: l2Offset + i * 8 },
            );
          }
          k = Kind.Zero;
        } else {
          k = type === ClusterType.Normal ? Kind.Normal : Kind.Unallocated;
        }
        runBytes = cs - inCluster;
      }
    }
    if (kind === -1) {
      kind = k;
      host = h;
    } else {
      // Same kind and (where there is a host offset) contiguous on the host.
      if (k !== kind) break;
      const expected = host >= 0 ? host + length : -1;
      if (h >= 0 !== host >= 0 || (h >= 0 && h !== expected)) break;
    }
    length += runBytes;
    if (k === Kind.Compressed) break;
    inCluster = (inCluster + runBytes) % cs;
    if (inCluster === 0) l2Index++;
  }
  return {
    kind: kind === -1 ? Kind.Unallocated : kind,
    length: Math.min(length, limit),
    host,
    compressedLength,
  };
}

/** Read guest bytes for copy-on-write; bytes past the virtual size read as zeros. */
export async function readGuest(s: Qcow2State, offset: number, buf: Uint8Array): Promise<void> {
  const n = Math.max(0, Math.min(buf.length, s.size - offset));
  if (n > 0) await readAt(s, offset, buf.subarray(0, n));
  if (n < buf.length) buf.fill(0, n);
}

/**
 * True when guest bytes [pos, end) read as zeros and nothing is stored for them here: zero
 * (sub)clusters, or unallocated ones over no backing data (or backing data that reads as
 * zeros).
 */
export async function readsAsZeros(s: Qcow2State, pos: number, end: number): Promise<boolean> {
  while (pos < end) {
    const e = await resolve(s, pos, end - pos);
    if (e.kind !== Kind.Zero) {
      if (e.kind !== Kind.Unallocated) return false;
      const b = s.backing;
      if (!b && s.backingFilename !== undefined) return false; // not opened: unknown
      if (b && pos < b.virtualSize) {
        const stop = Math.min(pos + e.length, b.virtualSize);
        for (let p = pos; p < stop;) {
          const st = await b.blockStatus(p, stop - p);
          if (!st.zero) return false;
          p += st.length;
        }
      }
    }
    pos += e.length;
  }
  return true;
}

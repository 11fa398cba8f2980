/**
 * Build fresh refcount structures from the set of referenced host clusters (qemu-img check
 * -r all's "rebuild refcount structure"), or lay out the first ones of a new image.
 *
 * Memory is bounded by one counter per *host* cluster (a typed array no wider than the
 * refcount width needs) plus the new table; blocks are written one at a time.
 *
 * Order: blocks and table are written into clusters nothing uses, the file is synced, then
 * `onTableMoved` points the header at the new table. The old table and blocks are not
 * counted in the new structures, so once the header has moved they are simply free.
 */
import type { BlockBackend } from "@qimg/io";
import {
  CorruptImageError,
  InvalidArgumentError,
  IoError,
  RangeFormatError,
  U64TableView,
  hex,
} from "@qimg/structs";
import { refcountGeometry } from "./geometry.js";
import { RefcountBlockView, maxRefcount } from "./spec/refcount-block.js";
import { MAX_REFTABLE_BYTES, REFTABLE_ENTRY_SIZE } from "./spec/refcount-table.js";
import type { TableMovedHook } from "./refcounts.js";

/** Refcount of every host cluster, indexed by cluster index. */
export type ClusterCounts = Uint8Array | Uint16Array | Uint32Array | Float64Array;

/** `[hostOffset, clusterCount]`: one reference to each of `clusterCount` clusters from the one holding `hostOffset`. */
export type ClusterRun = readonly [hostOffset: number, clusterCount: number];

/** A zeroed counts array of `length` entries, of the narrowest type that holds `refcountBits`. */
export function createClusterCounts(refcountBits: number, length: number): ClusterCounts {
  if (refcountBits <= 8) return new Uint8Array(length);
  if (refcountBits <= 16) return new Uint16Array(length);
  if (refcountBits <= 32) return new Uint32Array(length);
  return new Float64Array(length);
}

/** The geometry a reference count is made for. */
export interface CountReferencesOptions {
  /** header.cluster_bits. */
  readonly clusterBits: number;
  /** header.refcount_order. */
  readonly refcountOrder: number;
  /**
   * Number of host clusters that can hold anything (from the file's real size). The counts
   * never grow past it: memory is bounded by the file, whatever the references say.
   */
  readonly hostClusters: number;
  /**
   * Receives a reference that reaches past `hostClusters` and drops it (QEMU's check counts
   * such a reference as a corruption and leaves it out). Without it, such a reference is a
   * CorruptImageError.
   */
  readonly onPastEnd?: (run: ClusterRun) => void;
}

/**
 * Count references: every run adds one to each cluster it covers. A count above the
 * refcount width's maximum is a RangeFormatError (the image needs a wider refcount_bits); a
 * run past the end of the file is a CorruptImageError (or goes to `onPastEnd`).
 */
export async function countReferences(
  references: Iterable<ClusterRun> | AsyncIterable<ClusterRun>,
  options: CountReferencesOptions,
): Promise<ClusterCounts> {
  const g = refcountGeometry(options.clusterBits, options.refcountOrder);
  const max = maxRefcount(g.refcountBits);
  if (!Number.isSafeInteger(options.hostClusters) || options.hostClusters < 0) {
    throw new InvalidArgumentError(`host cluster count ${options.hostClusters} is not a count`);
  }
  const counts = createClusterCounts(g.refcountBits, options.hostClusters);
  for await (const [hostOffset, clusterCount] of references) {
    if (
      !Number.isSafeInteger(hostOffset) ||
      hostOffset < 0 ||
      !Number.isSafeInteger(clusterCount) ||
      clusterCount < 0
    ) {
      throw new InvalidArgumentError(
        `reference [${hostOffset}, ${clusterCount}] is not a host offset and a cluster count`,
      );
    }
    const first = Math.floor(hostOffset / g.clusterSize);
    const end = first + clusterCount;
    if (end > counts.length) {
      if (options.onPastEnd) {
        options.onPastEnd([hostOffset, clusterCount]);
        continue;
      }
      throw new CorruptImageError(
        `reference to ${clusterCount} cluster(s) at ${hex(hostOffset)} reaches past the end of the file (${counts.length} clusters)`,
        { offset: hostOffset },
      );
    }
    for (let c = first; c < end; c++) {
      const v = (counts[c] ?? 0) + 1;
      if (v > max) throw overflow(c * g.clusterSize, v, max, g.refcountBits);
      counts[c] = v;
    }
  }
  return counts;
}

/** What {@link rebuildRefcounts} writes, and where. */
export interface RebuildOptions {
  /** The image file. */
  readonly backend: BlockBackend;
  /** header.cluster_bits. */
  readonly clusterBits: number;
  /** header.refcount_order. */
  readonly refcountOrder: number;
  /**
   * Refcount of every host cluster by index (see {@link countReferences}). Give this or
   * `references`.
   */
  readonly counts?: ArrayLike<number>;
  /**
   * References to count (each run adds 1). Give this or `counts`. A run reaching a cluster or
   * more past the end of the file is a CorruptImageError (drop such runs before).
   */
  readonly references?: Iterable<ClusterRun> | AsyncIterable<ClusterRun>;
  /**
   * Byte offset (cluster aligned) where the new table and blocks go. Default: the end of the
   * file (or of the counted clusters, if later), rounded up to a cluster. Any other place
   * must be free in `counts` and unused by the old structures, which stay live until the
   * header moves.
   */
  readonly placeAt?: number;
  /** Points the header at the new table and syncs; called after the new structures are durable. */
  readonly onTableMoved: TableMovedHook;
}

/** Where {@link rebuildRefcounts} put the new structures. */
export interface RebuildResult {
  /** New header.refcount_table_offset. */
  readonly tableOffset: number;
  /** New header.refcount_table_clusters. */
  readonly tableClusters: number;
  /** Refcount blocks written. */
  readonly blockCount: number;
  /** First byte and cluster count of the area holding the new table and blocks. */
  readonly areaOffset: number;
  /** Clusters of that area. */
  readonly areaClusters: number;
}

/**
 * Write new refcount structures holding exactly `counts` (plus 1 for each cluster of the new
 * table and blocks), then call `onTableMoved(tableOffset, tableClusters)`. Layout: the table
 * first, then the blocks in ascending order; only refcount blocks with a non-zero entry are
 * written.
 */
export async function rebuildRefcounts(options: RebuildOptions): Promise<RebuildResult> {
  const g = refcountGeometry(options.clusterBits, options.refcountOrder);
  const cs = g.clusterSize;
  const E = g.entriesPerBlock;
  const max = maxRefcount(g.refcountBits);
  const { backend } = options;
  if ((options.counts === undefined) === (options.references === undefined)) {
    throw new InvalidArgumentError(`rebuildRefcounts needs exactly one of counts and references`);
  }
  const fileSize = await backend.size();
  const counts: ArrayLike<number> =
    options.counts ??
    (await countReferences(options.references ?? [], {
      clusterBits: g.clusterBits,
      refcountOrder: g.refcountOrder,
      // A compressed cluster may end inside the cluster after a file's unaligned end.
      hostClusters: Math.ceil(fileSize / cs) + 1,
    }));
  const N = counts.length;

  // Which blocks the counted clusters need; reject values the width cannot hold up front.
  const baseSlots = Math.ceil(N / E);
  const used = new Uint8Array(baseSlots);
  let baseBlocks = 0;
  let lastBaseSlot = -1;
  for (let c = 0; c < N; c++) {
    const v = counts[c] ?? 0;
    if (v === 0) continue;
    if (!Number.isSafeInteger(v) || v < 0 || v > max) {
      if (Number.isInteger(v) && v > max) throw overflow(c * cs, v, max, g.refcountBits);
      throw new InvalidArgumentError(
        `count ${v} for cluster ${hex(c * cs)} is not a non-negative integer`,
      );
    }
    const s = Math.floor(c / E);
    if (used[s] === 0) {
      used[s] = 1;
      baseBlocks++;
      lastBaseSlot = s;
    }
  }

  let A: number;
  if (options.placeAt === undefined) {
    A = Math.max(Math.ceil(fileSize / cs), N);
  } else {
    if (
      !Number.isSafeInteger(options.placeAt) ||
      options.placeAt < 0 ||
      options.placeAt % cs !== 0
    ) {
      throw new InvalidArgumentError(
        `placeAt ${options.placeAt} is not aligned to the cluster size ${cs}`,
      );
    }
    A = options.placeAt / cs;
  }

  // Fixed point: area = table (T clusters) + base blocks + blocks describing area clusters
  // whose slot has no base block; the table must cover the last slot.
  const perTableCluster = cs / REFTABLE_ENTRY_SIZE;
  let T = 1;
  let extra = 0;
  let n = 0;
  for (;;) {
    n = T + baseBlocks + extra;
    const firstSlot = Math.floor(A / E);
    const lastSlot = Math.floor((A + n - 1) / E);
    let extra2 = 0;
    for (let s = firstSlot; s <= lastSlot; s++) if (s >= baseSlots || used[s] === 0) extra2++;
    const T2 = Math.max(T, Math.ceil((Math.max(lastBaseSlot, lastSlot) + 1) / perTableCluster));
    if (T2 === T && extra2 === extra) break;
    T = T2;
    extra = extra2;
  }
  if (T * cs > MAX_REFTABLE_BYTES) {
    throw new RangeFormatError(
      `rebuilt refcount table would need ${T} clusters (${T * cs} bytes), more than the limit of ${MAX_REFTABLE_BYTES} bytes`,
    );
  }
  const areaEnd = A + n;
  for (let c = A; c < Math.min(areaEnd, N); c++) {
    if ((counts[c] ?? 0) !== 0) {
      throw new InvalidArgumentError(
        `cannot place the new refcount structures at ${hex(A * cs)}: cluster ${hex(c * cs)} is in use`,
        { offset: c * cs },
      );
    }
  }

  // The set of slots to write, ascending: base slots plus the area's slots.
  const firstAreaSlot = Math.floor(A / E);
  const lastAreaSlot = Math.floor((areaEnd - 1) / E);
  const table = new U64TableView(new Uint8Array(T * cs), "big");
  const block = new Uint8Array(cs);
  const view = new RefcountBlockView(block, g.refcountBits);
  let next = A + T;
  let blockCount = 0;
  const lastSlot = Math.max(lastBaseSlot, lastAreaSlot);
  const write = async (off: number, bytes: Uint8Array, what: string): Promise<void> => {
    try {
      await backend.write(off, bytes);
    } catch (cause) {
      throw new IoError(`writing the rebuilt ${what} at ${hex(off)} failed`, {
        offset: off,
        cause,
      });
    }
  };
  {
    for (let s = 0; s <= lastSlot; s++) {
      const inArea = s >= firstAreaSlot && s <= lastAreaSlot;
      if (!inArea && (s >= baseSlots || used[s] === 0)) continue;
      block.fill(0);
      const lo = s * E;
      const hi = Math.min(lo + E, N);
      for (let c = lo; c < hi; c++) {
        const v = counts[c] ?? 0;
        if (v !== 0) view.set(c - lo, v);
      }
      if (inArea) {
        for (let c = Math.max(lo, A); c < Math.min(lo + E, areaEnd); c++) view.set(c - lo, 1);
      }
      const off = next * cs;
      next++;
      await write(off, block, "refcount block");
      table.set(s, off);
      blockCount++;
    }
    if (next !== areaEnd) {
      throw new Error(`internal: rebuilt refcount area has ${next - A} clusters, expected ${n}`);
    }
    await write(A * cs, table.bytes, "refcount table");
    try {
      await backend.flush();
    } catch (cause) {
      throw new IoError(`syncing the rebuilt refcount structures failed`, { cause });
    }
  }
  await options.onTableMoved(A * cs, T);
  return { tableOffset: A * cs, tableClusters: T, blockCount, areaOffset: A * cs, areaClusters: n };
}

function overflow(offset: number, value: number, max: number, bits: number): RangeFormatError {
  return new RangeFormatError(
    `refcount of cluster ${hex(offset)} would be ${value}, above the maximum ${max} of refcount_bits=${bits}; ` +
      `use a wider refcount width (e.g. refcount_bits=16)`,
    { offset },
  );
}

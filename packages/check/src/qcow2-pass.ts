/**
 * One pass of the qcow2 check (QEMU's qcow2_check_refcounts, plus our `-r all` extensions):
 * the state a pass shares — the reference counts it builds, the stored refcounts it compares
 * them with, the metadata map a repair consults — and the steps that do not walk the L1/L2
 * tables (the refcount table, bitmaps, comparing). The table walks are in qcow2-tables.ts.
 */
import type { BlockBackend } from "@qimg/io";
import {
  AutoclearFeatures,
  BitmapChunk,
  classifyBitmapTableEntry,
  reftableOffset,
  reftableReservedBits,
} from "@qimg/qcow2";
import type { L2Format, Qcow2Metadata, SnapshotEntry, TableSource } from "@qimg/qcow2";
import { createClusterCounts, maxRefcount } from "@qimg/refcount";
import type { ClusterCounts } from "@qimg/refcount";
import { U64TableView } from "@qimg/structs";
import type { CheckMessageKind, LostRange } from "./result.js";
import { StoredRefcounts } from "./stored.js";

export const FIX_LEAKS = 1;
export const FIX_ERRORS = 2;
/** How far past its end `-r all` grows a file to cover a refcount block (QEMU: any distance). */
const MAX_GROW = 2 ** 30;
/** QCOW_MAX_L1_SIZE / 8 */
export const MAX_L1_ENTRIES = 0x200_0000 / 8;

/** Everything about the image the checker needs, as read at open. */
export type Layout = Qcow2Metadata;

/** 64-bit entry words -> lower-case hex without leading zeros, as PRIx64. */
export function hex64(hi: number, lo: number): string {
  return ((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)).toString(16);
}

/** The counters of one pass (QEMU's BdrvCheckResult, and our fragmentation numbers). */
export interface Counters {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  allocated: number;
  fragmented: number;
  compressed: number;
}

/** All counters at zero. */
export const zeroCounters = (): Counters => ({
  checkErrors: 0,
  corruptions: 0,
  leaks: 0,
  corruptionsFixed: 0,
  leaksFixed: 0,
  allocated: 0,
  fragmented: 0,
  compressed: 0,
});

/** What a host cluster holds, as far as the metadata structures say (bits of `Pass.meta`). */
export const M_HEADER = 1;
export const M_L1 = 2;
export const M_REFTABLE = 4;
export const M_REFBLOCK = 8;
export const M_SNAPTABLE = 16;

/**
 * Whether the snapshot table looks like garbage rather than a table with short entries: a
 * version 3 entry without the 16 bytes of extra data it needs, beside an ID or name that is
 * not UTF-8 or an L1 table that is unaligned or outside the file. (A snapshot table offset
 * that points at the wrong bytes gives such entries.) Repairs then neither rewrite the table
 * nor let it outrank the tables and data it overlaps: QEMU trusts it no more than that either.
 */
export function suspectSnapshotTable(
  layout: {
    readonly header: { readonly version: number };
    readonly snapshots: readonly SnapshotEntry[];
  },
  fileSize: number,
  clusterSize: number,
): boolean {
  if (layout.header.version < 3) return false;
  if (!layout.snapshots.some((sn) => sn.extraData.byteLength < 16)) return false;
  return layout.snapshots.some(
    (sn) =>
      sn.id.includes("\uFFFD") ||
      sn.name.includes("\uFFFD") ||
      sn.l1TableOffset % clusterSize !== 0 ||
      (sn.l1Size > 0 && (sn.l1TableOffset === 0 || sn.l1TableOffset + sn.l1Size * 8 > fileSize)),
  );
}
export const M_BITMAP = 32;
export const M_CRYPTO = 64;
export const M_L2 = 128;
export const M_DATA = 256;
/** An L1 entry points into its own table (always dropped; the entry's table stays writable). */
export const M_SELF = 512;
/** Structures that are never data or an L2 table, and are not rebuilt by a repair. */
const FIXED_META = M_HEADER | M_L1 | M_SNAPTABLE | M_BITMAP | M_CRYPTO;

/** Thrown inside a pass when the check cannot go on (qemu-img: "Check failed: ..."). */
export class CheckAbort extends Error {}

/** The state of one pass over one layout. */
export class Pass {
  readonly cs: number;
  readonly refcountBits: number;
  readonly maxRc: number;
  readonly fmt: L2Format;
  /** What the table walks read. */
  readonly src: TableSource;
  res: Counters = zeroCounters();
  counts: ClusterCounts;
  nbClusters: number;
  fileSize: number;
  rebuild = false;
  highest = 0;
  /** Clusters counted for the refcount table and blocks, [first, count] runs. */
  refcountRuns: [number, number][] = [];
  tagRefcount = false;
  stored!: StoredRefcounts;
  /**
   * Two bytes per host cluster inside the file (M_* bits): which metadata structures claim it,
   * built before a repair walks the tables so that no repair writes into a "table" that is
   * really the header, a refcount structure or another table, and no data entry that points
   * at metadata survives a repair. Empty when not repairing.
   */
  meta: Uint16Array = new Uint16Array(0);
  /** Offsets of the L1 tables the map trusts (overlapping no other metadata). */
  trustedL1 = new Set<number>();

  constructor(
    readonly backend: BlockBackend,
    readonly layout: Layout,
    fileSize: number,
    readonly log: (kind: CheckMessageKind, text: string, offset?: number) => void,
    readonly lost: LostRange[],
  ) {
    const h = layout.header;
    this.fmt = layout.l2;
    this.cs = this.fmt.clusterSize;
    this.refcountBits = 2 ** h.refcountOrder;
    this.maxRc = maxRefcount(this.refcountBits);
    this.fileSize = fileSize;
    this.nbClusters = Math.ceil(fileSize / this.cs);
    this.counts = createClusterCounts(this.refcountBits, this.nbClusters);
    this.src = { backend, format: this.fmt, fileSize };
  }

  async openStored(): Promise<void> {
    const h = this.layout.header;
    this.stored = await StoredRefcounts.open(
      this.backend,
      h.clusterBits,
      h.refcountOrder,
      h.refcountTableOffset,
      h.refcountTableClusters,
    );
  }

  grow(n: number): void {
    if (n <= this.counts.length) {
      this.nbClusters = Math.max(this.nbClusters, n);
      return;
    }
    const next = createClusterCounts(
      this.refcountBits,
      Math.max(n, Math.ceil(this.counts.length * 1.5)),
    );
    next.set(this.counts);
    this.counts = next;
    this.nbClusters = n;
  }

  mark(offset: number, size: number, flag: number): void {
    if (size <= 0 || offset < 0 || offset >= this.fileSize) return;
    const first = Math.floor(offset / this.cs);
    const last = Math.min(Math.floor((offset + size - 1) / this.cs), this.meta.length - 1);
    for (let c = first; c <= last; c++) this.meta[c] = this.meta[c]! | flag;
  }

  /** Whether an L1 table at [offset, +bytes) is one the map may trust (see buildMetaMap). */
  saneL1(offset: number, size: number): boolean {
    if (size === 0 || size > MAX_L1_ENTRIES || offset % this.cs !== 0) return false;
    if (offset === 0 || offset + size * 8 > this.fileSize) return false;
    const last = Math.floor((offset + size * 8 - 1) / this.cs);
    for (let c = offset / this.cs; c <= last; c++) if (this.meta[c] !== 0) return false;
    return true;
  }

  /**
   * Whether a repair may write into the L2 table at `offset`: aligned, past the header,
   * inside the file, and claimed by nothing but L2 tables (no data cluster either).
   * (Always true when not repairing.)
   */
  l2Writable(offset: number): boolean {
    if (this.meta.length === 0) return true;
    if (offset === 0 || offset % this.cs !== 0 || offset >= this.fileSize) return false;
    return (this.meta[offset / this.cs]! & ~M_L2) === 0;
  }

  /**
   * Whether an L2 table at `offset` (aligned, inside the file) would be offset 0, the header,
   * an L1 table, the snapshot table, bitmaps or the encryption header: never a table, and the
   * L1 entry is dropped. Under a refcount structure or a data cluster it is walked without
   * writes instead (the refcount structures are rebuilt; which of an L2 and a data pointer
   * to the same cluster is wrong cannot be told, so both mappings stay, as in QEMU).
   */
  l2OnOtherMeta(offset: number): boolean {
    if (this.meta.length === 0) return false;
    if (offset === 0) return true;
    return (this.meta[offset / this.cs]! & FIXED_META) !== 0;
  }

  /**
   * Whether a repair may write the L1 entry at `entryOffset` (of a trusted table): its cluster
   * is claimed by L1 tables only (and by entries pointing into their own table, which are
   * dropped). A cluster an L2 or data pointer also claims may be a real table or real data
   * under an L1 table whose size is wrong: never written.
   */
  l1EntryWritable(entryOffset: number): boolean {
    if (this.meta.length === 0) return true;
    if (entryOffset < this.cs || entryOffset >= this.fileSize) return false;
    const m = this.meta[Math.floor(entryOffset / this.cs)]!;
    return (m & M_L1) !== 0 && (m & ~(M_L1 | M_SELF)) === 0;
  }

  /** Whether a repair may write through the L1 table at `offset` at all. */
  l1Trusted(offset: number): boolean {
    return this.meta.length === 0 || this.trustedL1.has(offset);
  }

  /**
   * Whether [offset, +size) touches the header, an L1 table, the snapshot table, bitmaps or
   * the encryption header. A data cluster under the refcount structures or an L2 table keeps
   * its mapping: the refcount structures are rebuilt (a block claimed twice forces a rebuild),
   * and an L2 table that is also a data cluster is never written into; the guest data could
   * not be rebuilt.
   */
  overlapsMeta(offset: number, size: number): boolean {
    if (this.meta.length === 0 || size <= 0) return false;
    const first = Math.floor(offset / this.cs);
    const last = Math.min(Math.floor((offset + size - 1) / this.cs), this.meta.length - 1);
    for (let c = first; c <= last; c++) {
      if ((this.meta[c]! & FIXED_META) !== 0) return true;
    }
    return false;
  }

  /** qcow2_inc_refcounts_imrt: count one reference to every cluster of [offset, offset+size). */
  /**
   * {@link inc} for one whole cluster inside the file, by index (the hot path of the walk:
   * a cluster index stays a small integer, where a byte offset past 2 GiB is a heap number).
   */
  incCluster(k: number): void {
    const v = this.counts[k]!;
    if (v !== this.maxRc && !this.tagRefcount) this.counts[k] = v + 1;
    else this.inc(k * this.cs, this.cs);
  }

  inc(offset: number, size: number): void {
    if (size <= 0) return;
    if (offset + size - this.fileSize >= this.cs) {
      this.log(
        "corruption",
        `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offset.toString(16)} size 0x${size.toString(16)}`,
        offset,
      );
      this.res.corruptions++;
      return;
    }
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + size - 1) / this.cs);
    if (last >= this.nbClusters) this.grow(last + 1);
    for (let k = first; k <= last; k++) {
      const v = this.counts[k]!;
      if (v === this.maxRc) {
        this.log(
          "corruption",
          `ERROR: overflow cluster offset=0x${(k * this.cs).toString(16)}`,
          k * this.cs,
        );
        this.log(
          "info",
          "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing",
        );
        this.res.corruptions++;
        continue;
      }
      this.counts[k] = v + 1;
    }
    if (this.tagRefcount) this.refcountRuns.push([first, last - first + 1]);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.backend.write(offset, data);
  }

  /** The stored refcount of a cluster: without a promise when the loaded block has it. */
  storedRefcount(cluster: number): number | Promise<number> {
    const r = this.stored.peek(cluster);
    return r >= 0 ? r : this.stored.get(cluster);
  }

  async checkBitmaps(): Promise<void> {
    const L = this.layout;
    if (L.bitmaps.length === 0 || L.bitmapDirectory === undefined) return;
    if (!AutoclearFeatures.decode(L.header.autoclearFeatures).has("bitmaps")) return;
    this.inc(L.bitmapDirectory.offset, L.bitmapDirectory.length);
    for (const bm of L.bitmaps) {
      const bytes = bm.bitmapTableSize * 8;
      this.inc(bm.bitmapTableOffset, bytes);
      if (bm.bitmapTableOffset % this.cs !== 0 || bm.bitmapTableOffset + bytes > this.fileSize) {
        this.res.corruptions++;
        return;
      }
      const t = new U64TableView(new Uint8Array(bytes), "big");
      await this.backend.read(bm.bitmapTableOffset, t.bytes);
      for (let i = 0; i < t.length; i++) {
        // QEMU loads the table as it would at open (only bitmaps in use get this far; the
        // others were refused at open): a bad entry fails the whole check with EINVAL.
        const entry = classifyBitmapTableEntry(t, i, this.cs);
        if (typeof entry === "string") {
          this.res.checkErrors++;
          throw new CheckAbort("Invalid argument");
        }
        if (entry.kind === BitmapChunk.data) this.inc(entry.offset, this.cs);
      }
    }
  }

  /**
   * Grow the file so that the cluster at `offset` is inside it (then count the clusters up to
   * there). Returns why it could not, in strerror's words, or undefined.
   */
  async growToCover(offset: number): Promise<string | undefined> {
    // Past 2^53 (QEMU: past INT64_MAX) no file can reach.
    if (offset + this.cs > Number.MAX_SAFE_INTEGER) return "Invalid argument";
    // Unlike QEMU, never grow an image by more than MAX_GROW (a block pointer far past the
    // end is garbage, and a file grown to terabytes is worse): rebuild instead.
    if (offset + this.cs - this.fileSize > MAX_GROW) {
      return `the block is more than ${MAX_GROW / 2 ** 20} MiB past the end of the file`;
    }
    try {
      await this.backend.truncate(offset + this.cs);
    } catch (e) {
      const code = (e as { code?: unknown; cause?: { code?: unknown } }).code;
      const cause = (e as { cause?: { code?: unknown } }).cause?.code;
      return code === "EFBIG" || cause === "EFBIG" ? "File too large" : "Invalid argument";
    }
    this.fileSize = await this.backend.size();
    this.grow(Math.ceil(this.fileSize / this.cs));
    return undefined;
  }

  /** check_refblocks */
  async checkRefblocks(fix: number): Promise<void> {
    const table = this.stored.table;
    for (let i = 0; i < table.length; i++) {
      const hi = table.hi(i);
      const lo = table.lo(i);
      const offset = reftableOffset(hi, lo);
      const cluster = Math.floor(offset / this.cs);
      const entryOffset = this.layout.header.refcountTableOffset + i * 8;
      if (reftableReservedBits(lo)) {
        this.log(
          "corruption",
          `ERROR refcount table entry ${i} has reserved bits set`,
          entryOffset,
        );
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      if (offset % this.cs !== 0) {
        this.log(
          "corruption",
          `ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`,
          entryOffset,
        );
        this.res.corruptions++;
        this.rebuild = true;
        continue;
      }
      if (cluster >= this.nbClusters) {
        this.res.corruptions++;
        const repair = (fix & FIX_ERRORS) !== 0;
        this.log(
          repair ? "repair" : "corruption",
          `${repair ? "Repairing" : "ERROR"} refcount block ${i} is outside image`,
          entryOffset,
        );
        // Without -r all this is only counted (no rebuild). With it, as QEMU: grow the file
        // to cover the block (it reads as zeros: nothing it covers is in use), or rebuild
        // the refcount structures when the file cannot grow that far.
        if (repair) {
          const failed = await this.growToCover(offset);
          if (failed === undefined) {
            this.res.corruptions--;
            this.res.corruptionsFixed++;
            this.tagRefcount = true;
            this.inc(offset, this.cs);
            this.tagRefcount = false;
          } else {
            this.rebuild = true;
            this.log("error", `ERROR could not resize image: ${failed}`);
          }
        }
        continue;
      }
      if (offset !== 0) {
        this.tagRefcount = true;
        this.inc(offset, this.cs);
        this.tagRefcount = false;
        const n = this.counts[cluster]!;
        if (n !== 1) {
          this.log("corruption", `ERROR refcount block ${i} refcount=${n}`, offset);
          this.res.corruptions++;
          this.rebuild = true;
        }
      }
    }
  }

  /** compare_refcounts for a stored 64-bit refcount too large for a number. */
  async bigLeak(i: number, stored: bigint, fix: number): Promise<void> {
    const r2 = this.counts[i]!;
    this.highest = i;
    const repair = (fix & FIX_LEAKS) !== 0;
    this.log(
      repair ? "repair" : "leak",
      `${repair ? "Repairing" : "Leaked"} cluster ${i} refcount=${stored} reference=${r2}`,
      i * this.cs,
    );
    if (repair) {
      try {
        await this.stored.set(i, r2);
        this.res.leaksFixed++;
        return;
      } catch {
        // counted below
      }
    }
    this.res.leaks++;
  }

  /** compare_refcounts */
  async compare(fix: number): Promise<void> {
    this.highest = 0;
    const stored = this.stored;
    const counts = this.counts;
    const per = stored.entriesPerBlock;
    for (let i = 0; i < this.nbClusters; i++) {
      let r1: number;
      try {
        r1 = stored.peek(i);
        if (r1 < 0) r1 = await stored.get(i);
        // The rest of this block straight from its bytes, while the counts agree.
        // (64-bit entries can throw: those stay one cluster per try.)
        const block = this.refcountBits < 64 ? stored.loadedBlock(i) : undefined;
        if (block !== undefined) {
          const base = Math.floor(i / per) * per;
          const end = Math.min(this.nbClusters, base + per);
          let j = i;
          let highest = -1;
          while (r1 === counts[j] && j + 1 < end) {
            if (r1 > 0) highest = j;
            j++;
            r1 = block.get(j - base);
          }
          if (highest >= 0) this.highest = highest;
          i = j;
        }
      } catch {
        // A 64-bit refcount above 2^53 is a leak (no cluster has that many references).
        const big = this.refcountBits === 64 ? await stored.getBig(i).catch(() => -1n) : -1n;
        if (big > 0n) {
          await this.bigLeak(i, big, fix);
          continue;
        }
        this.log("error", `Can't get refcount for cluster ${i}: Input/output error`, i * this.cs);
        this.res.checkErrors++;
        continue;
      }
      const r2 = counts[i]!;
      if (r1 > 0 || r2 > 0) this.highest = i;
      if (r1 === r2) continue;
      let fixed: "leaksFixed" | "corruptionsFixed" | undefined;
      if (r1 === 0) this.rebuild = true;
      else if (r1 > r2 && fix & FIX_LEAKS) fixed = "leaksFixed";
      else if (r1 < r2 && fix & FIX_ERRORS) fixed = "corruptionsFixed";
      const word = fixed !== undefined ? "Repairing" : r1 < r2 ? "ERROR" : "Leaked";
      this.log(
        fixed !== undefined ? "repair" : r1 < r2 ? "corruption" : "leak",
        `${word} cluster ${i} refcount=${r1} reference=${r2}`,
        i * this.cs,
      );
      if (fixed !== undefined) {
        try {
          await stored.set(i, r2);
          this.res[fixed]++;
          continue;
        } catch {
          // counted below
        }
      }
      if (r1 < r2) this.res.corruptions++;
      else this.res.leaks++;
    }
  }
}

import type { BlockBackend } from "@qimg/io";
import {
  AutoclearFeatures,
  ExtensionType,
  FdeExtension,
  IncompatibleFeatures,
  compressedLayout,
  decodeCompressed,
  encodeHeaderArea,
  openQcow2,
} from "@qimg/qcow2";
import type {
  BitmapEntry,
  CompressedLayout,
  HeaderExtension,
  Qcow2Header,
  SnapshotEntry,
} from "@qimg/qcow2";
import { createClusterCounts, maxRefcount, rebuildRefcounts } from "@qimg/refcount";
import type { ClusterCounts } from "@qimg/refcount";
import { U64TableView } from "@qimg/structs";
import { checkExitCode } from "./result.js";
import type { CheckMessage, CheckMessageKind, CheckResult, LostRange } from "./result.js";
import { StoredRefcounts } from "./stored.js";

/** How much a check may repair, as `qemu-img check -r`. */
export type RepairMode = "leaks" | "all";

/** Options of a check: whether to repair, and the file name to report. */
export interface CheckOptions {
  /** Repair leaks only, or everything that can be repaired. Default: check only. */
  readonly repair?: RepairMode | undefined;
  /** Name reported as `filename` (qemu-img prints the path it was given). Default: the backend's name. */
  readonly filename?: string | undefined;
}

const FIX_LEAKS = 1;
const FIX_ERRORS = 2;
const TWO_32 = 0x1_0000_0000;
const MAX_L1_ENTRIES = 0x200_0000 / 8; // QCOW_MAX_L1_SIZE / 8

/** 64-bit entry words -> lower-case hex without leading zeros, as PRIx64. */
function hex64(hi: number, lo: number): string {
  return ((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)).toString(16);
}

/** Offset bits 9..55 of an L1/L2 entry as a number. */
function offsetOf(hi: number, lo: number): number {
  return (hi & 0x00ff_ffff) * TWO_32 + ((lo & 0xffff_fe00) >>> 0);
}

/** Everything about the image the checker needs, as read at open. */
interface Layout {
  readonly header: Qcow2Header;
  readonly extensions: readonly HeaderExtension[];
  readonly backingFile: string | undefined;
  readonly snapshots: readonly SnapshotEntry[];
  readonly snapshotsSize: number;
  readonly bitmaps: readonly BitmapEntry[];
  readonly bitmapDirectory: { readonly offset: number; readonly length: number } | undefined;
  readonly crypto: { readonly offset: number; readonly length: number } | undefined;
}

async function readLayout(backend: BlockBackend): Promise<Layout> {
  const image = await openQcow2(backend, { readOnly: true, noBacking: true });
  // Not closed: closing would close the caller's backend; a read-only image holds nothing else.
  const header = image.header;
  const snapshots = image.snapshots;
  let snapshotsSize = 0;
  if (snapshots.length > 0) {
    const enc = new TextEncoder();
    const last = snapshots[snapshots.length - 1]!;
    const bytes =
      40 +
      last.extraData.byteLength +
      enc.encode(last.id).byteLength +
      enc.encode(last.name).byteLength;
    snapshotsSize = last.offset + Math.ceil(bytes / 8) * 8 - header.snapshotsOffset;
  }
  let crypto: Layout["crypto"];
  const fde = image.extensions.find((e) => e.type === ExtensionType.fullDiskEncryption);
  if (fde !== undefined && fde.data.byteLength >= 16) {
    const d = FdeExtension.decode(fde.data, 0, fde.offset + 8);
    crypto = { offset: d.offset, length: d.length };
  }
  return {
    header,
    extensions: image.extensions,
    backingFile: image.backingFilename,
    snapshots,
    snapshotsSize,
    bitmaps: image.bitmaps,
    bitmapDirectory: image.bitmapDirectory,
    crypto,
  };
}

interface Counters {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  allocated: number;
  fragmented: number;
  compressed: number;
}

const zero = (): Counters => ({
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
const M_HEADER = 1;
const M_L1 = 2;
const M_REFTABLE = 4;
const M_REFBLOCK = 8;
const M_SNAPTABLE = 16;
const M_BITMAP = 32;
const M_CRYPTO = 64;
const M_L2 = 128;
const M_DATA = 256;
/** An L1 entry points into its own table (always dropped; the entry's table stays writable). */
const M_SELF = 512;
/** Structures that are never data or an L2 table, and are not rebuilt by a repair. */
const FIXED_META = M_HEADER | M_L1 | M_SNAPTABLE | M_BITMAP | M_CRYPTO;

/** Thrown inside a pass when the check cannot go on (qemu-img: "Check failed: ..."). */
class CheckAbort extends Error {}

/** One pass of QEMU's qcow2_check_refcounts (plus our -r all extensions), over one layout. */
class Pass {
  readonly cs: number;
  readonly bits: number;
  readonly refcountBits: number;
  readonly maxRc: number;
  readonly l2Entries: number;
  readonly entryBytes: number;
  readonly extendedL2: boolean;
  readonly hasDataFile: boolean;
  readonly layoutC: CompressedLayout;
  res: Counters = zero();
  counts: ClusterCounts;
  nbClusters: number;
  fileSize: number;
  rebuild = false;
  highest = 0;
  /** Clusters counted for the refcount table and blocks, [first, count] runs. */
  refcountRuns: [number, number][] = [];
  #tagRefcount = false;
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
    this.bits = h.clusterBits;
    this.cs = 2 ** h.clusterBits;
    this.refcountBits = 2 ** h.refcountOrder;
    this.maxRc = maxRefcount(this.refcountBits);
    const incompat = IncompatibleFeatures.decode(h.incompatibleFeatures);
    this.extendedL2 = incompat.has("extendedL2");
    this.hasDataFile = incompat.has("externalDataFile");
    this.entryBytes = this.extendedL2 ? 16 : 8;
    this.l2Entries = this.cs / this.entryBytes;
    this.layoutC = compressedLayout(h.clusterBits);
    this.fileSize = fileSize;
    this.nbClusters = Math.ceil(fileSize / this.cs);
    this.counts = createClusterCounts(this.refcountBits, this.nbClusters);
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

  #grow(n: number): void {
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

  #mark(offset: number, size: number, flag: number): void {
    if (size <= 0 || offset < 0 || offset >= this.fileSize) return;
    const first = Math.floor(offset / this.cs);
    const last = Math.min(Math.floor((offset + size - 1) / this.cs), this.meta.length - 1);
    for (let c = first; c <= last; c++) this.meta[c] = this.meta[c]! | flag;
  }

  /** Whether an L1 table at [offset, +bytes) is one the map may trust (see buildMetaMap). */
  #saneL1(offset: number, size: number): boolean {
    if (size === 0 || size > MAX_L1_ENTRIES || offset % this.cs !== 0) return false;
    if (offset === 0 || offset + size * 8 > this.fileSize) return false;
    const last = Math.floor((offset + size * 8 - 1) / this.cs);
    for (let c = offset / this.cs; c <= last; c++) if (this.meta[c] !== 0) return false;
    return true;
  }

  /**
   * Build `meta` (for repairs): which host clusters of the file the header, the refcount table
   * and blocks, the snapshot table, bitmaps, the encryption header and the L1 tables claim;
   * then, from every L1 table that overlaps none of those, the L2 tables it names (M_L2) and
   * the data clusters those name (M_DATA). A table the map cannot trust adds nothing: garbage
   * pointers must not make real tables or data look like metadata. Bounded by the file size.
   */
  async buildMetaMap(): Promise<void> {
    const L = this.layout;
    const h = L.header;
    this.meta = new Uint16Array(Math.ceil(this.fileSize / this.cs));
    this.#mark(0, this.cs, M_HEADER);
    this.#mark(h.snapshotsOffset, L.snapshotsSize, M_SNAPTABLE);
    this.#mark(h.refcountTableOffset, h.refcountTableClusters * this.cs, M_REFTABLE);
    for (let i = 0; i < this.stored.tableEntries; i++) {
      const { hi, lo } = this.stored.entryWords(i);
      const off = (hi >>> 0) * TWO_32 + ((lo & 0xffff_fe00) >>> 0);
      if (off !== 0 && off % this.cs === 0) this.#mark(off, this.cs, M_REFBLOCK);
    }
    if (L.crypto !== undefined) this.#mark(L.crypto.offset, L.crypto.length, M_CRYPTO);
    if (L.bitmapDirectory !== undefined) {
      this.#mark(L.bitmapDirectory.offset, L.bitmapDirectory.length, M_BITMAP);
      for (const bm of L.bitmaps) {
        const bytes = bm.bitmapTableSize * 8;
        if (bm.bitmapTableOffset % this.cs !== 0 || bm.bitmapTableOffset + bytes > this.fileSize)
          continue;
        this.#mark(bm.bitmapTableOffset, bytes, M_BITMAP);
        const t = new U64TableView(new Uint8Array(bytes), "big");
        await this.backend.read(bm.bitmapTableOffset, t.bytes);
        for (let i = 0; i < t.length; i++) {
          const off = offsetOf(t.hi(i), t.lo(i));
          if (off !== 0 && off % this.cs === 0) this.#mark(off, this.cs, M_BITMAP);
        }
      }
    }
    // L1 tables, the active one first: one is trusted (and claims its clusters, its L2
    // tables and their data) only when it lies inside the file and overlaps nothing claimed
    // so far. A snapshot L1 table whose size or offset is wrong must not make the active
    // image's tables or data look like metadata.
    const tables = [{ offset: h.l1TableOffset, size: h.l1Size }];
    for (const sn of L.snapshots) tables.push({ offset: sn.l1TableOffset, size: sn.l1Size });
    const seen = new Set<number>();
    const l2 = new U64TableView(new Uint8Array(this.cs), "big");
    const stride = this.extendedL2 ? 2 : 1;
    for (const t of tables) {
      if (!this.#saneL1(t.offset, t.size)) continue;
      this.#mark(t.offset, t.size * 8, M_L1);
      this.trustedL1.add(t.offset);
      const l1 = new U64TableView(new Uint8Array(t.size * 8), "big");
      await this.backend.read(t.offset, l1.bytes, { zeroPastEof: true });
      for (let i = 0; i < t.size; i++) {
        const off = offsetOf(l1.hi(i), l1.lo(i));
        if (off === 0 || off % this.cs !== 0 || off >= this.fileSize) continue;
        if (off >= t.offset && off < t.offset + t.size * 8) {
          this.#mark(off, this.cs, M_SELF);
          continue;
        }
        this.#mark(off, this.cs, M_L2);
        if (seen.has(off) || (this.meta[off / this.cs]! & ~M_L2) !== 0) continue;
        seen.add(off);
        await this.backend.read(off, l2.bytes, { zeroPastEof: true });
        for (let j = 0; j < this.l2Entries; j++) {
          const hi = l2.hi(j * stride);
          const lo = l2.lo(j * stride);
          const type = this.clusterType(hi, lo);
          if (type === "compressed") {
            const d = decodeCompressed(hi, lo, this.layoutC);
            if (d.hostOffset < this.fileSize) this.#mark(d.hostOffset, d.length, M_DATA);
          } else if ((type === "normal" || type === "zero-alloc") && !this.hasDataFile) {
            this.#mark(offsetOf(hi, lo), this.cs, M_DATA);
          }
        }
      }
    }
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
    if (last >= this.nbClusters) this.#grow(last + 1);
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
    if (this.#tagRefcount) this.refcountRuns.push([first, last - first + 1]);
  }

  async #write(offset: number, data: Uint8Array): Promise<void> {
    await this.backend.write(offset, data);
  }

  /** check_refcounts_l2 */
  async checkL2(l2Offset: number, l1Index: number, fragInfo: boolean, fix: number): Promise<void> {
    // A table past the end of the file reads as zeros (as QEMU reads it): nothing to walk.
    if (l2Offset >= this.fileSize) return;
    const l2 = new U64TableView(new Uint8Array(this.cs), "big");
    await this.backend.read(l2Offset, l2.bytes, { zeroPastEof: true });
    const stride = this.extendedL2 ? 2 : 1;
    let nextContiguous = 0;
    const virtualSize = this.layout.header.size;
    for (let i = 0; i < this.l2Entries; i++) {
      const k = i * stride;
      let hi = l2.hi(k);
      const lo = l2.lo(k);
      const bmHi = this.extendedL2 ? l2.hi(k + 1) : 0;
      const bmLo = this.extendedL2 ? l2.lo(k + 1) : 0;
      const bitmapNonZero = (bmHi | bmLo) !== 0;
      const entryOffset = l2Offset + i * this.entryBytes;
      const guest = (l1Index * this.l2Entries + i) * this.cs;
      const type = this.clusterType(hi, lo);
      if (type !== "compressed" && ((hi & 0x3f00_0000) !== 0 || (lo & 0x1fe) !== 0)) {
        this.log(
          "corruption",
          `ERROR found l2 entry with reserved bits set: ${hex64(hi, lo)}`,
          entryOffset,
        );
        this.res.corruptions++;
      }
      const drop = async (reason: string, replacement: number): Promise<boolean> => {
        // Our -r all extension: unmap an entry that points nowhere valid.
        if (!(fix & FIX_ERRORS)) return false;
        const e = new U64TableView(new Uint8Array(this.entryBytes), "big");
        e.setWords(0, 0, replacement);
        await this.#write(entryOffset, e.bytes);
        this.res.corruptions--;
        this.res.corruptionsFixed++;
        if (replacement === 0 && guest < virtualSize) {
          this.lost.push({ offset: guest, length: Math.min(this.cs, virtualSize - guest), reason });
        }
        this.log(
          "repair",
          `Repairing L2 entry ${i} of table ${l2Offset.toString(16)}: ${reason}`,
          entryOffset,
        );
        return true;
      };
      switch (type) {
        case "compressed": {
          if ((hi & 0x8000_0000) !== 0) {
            const d = decodeCompressed(hi, lo, this.layoutC);
            this.log(
              "corruption",
              `ERROR: coffset=0x${d.hostOffset.toString(16)}: copied flag must never be set for compressed clusters`,
              entryOffset,
            );
            hi &= 0x7fff_ffff;
            this.res.corruptions++;
          }
          if (this.hasDataFile) {
            this.log(
              "corruption",
              `ERROR compressed cluster ${i} with data file, entry=0x${hex64(hi, lo)}`,
              entryOffset,
            );
            this.res.corruptions++;
            break;
          }
          if (bitmapNonZero) {
            this.log(
              "corruption",
              `ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hex64(hi, lo)}`,
              entryOffset,
            );
            this.res.corruptions++;
            break;
          }
          const d = decodeCompressed(hi, lo, this.layoutC);
          if (fix & FIX_ERRORS && d.hostOffset + d.length - this.fileSize >= this.cs) {
            this.res.corruptions++;
            this.log(
              "corruption",
              `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${d.hostOffset.toString(16)} size 0x${d.length.toString(16)}`,
              d.hostOffset,
            );
            if (await drop("compressed data outside the image file", 0)) continue;
          } else if (fix & FIX_ERRORS && this.overlapsMeta(d.hostOffset, d.length)) {
            this.res.corruptions++;
            this.log(
              "corruption",
              `ERROR coffset=0x${d.hostOffset.toString(16)}: compressed data overlaps metadata; L2 entry corrupted`,
              entryOffset,
            );
            if (await drop("compressed data overlaps metadata", 0)) continue;
          } else {
            this.inc(d.hostOffset, d.length);
          }
          if (fragInfo) {
            this.res.allocated++;
            this.res.compressed++;
            this.res.fragmented++;
          }
          break;
        }
        case "normal":
        case "zero-alloc": {
          const offset = offsetOf(hi, lo);
          if (this.extendedL2 && ((bmHi >>> 0) & (bmLo >>> 0)) !== 0) {
            this.res.corruptions++;
            this.log(
              "corruption",
              `ERROR offset=${offset.toString(16)}: Allocated cluster has corrupted subcluster allocation bitmap`,
              entryOffset,
            );
          }
          if (offset % this.cs !== 0) {
            this.res.corruptions++;
            const containsData = this.extendedL2 ? bmLo >>> 0 !== 0 : (lo & 1) === 0;
            if (!containsData) {
              this.log(
                "corruption",
                `${fix & FIX_ERRORS ? "Repairing" : "ERROR"} offset=${offset.toString(16)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
                entryOffset,
              );
              if (fix & FIX_ERRORS) {
                const e = new U64TableView(new Uint8Array(this.entryBytes), "big");
                e.setWords(0, 0, this.extendedL2 ? 0 : 1);
                await this.#write(entryOffset, e.bytes);
                this.res.corruptions--;
                this.res.corruptionsFixed++;
                continue;
              }
            } else {
              this.log(
                "corruption",
                `ERROR offset=${offset.toString(16)}: Data cluster is not properly aligned; L2 entry corrupted.`,
                entryOffset,
              );
              if (await drop("data cluster offset not aligned to the cluster size", 0)) continue;
            }
          }
          if (
            !this.hasDataFile &&
            fix & FIX_ERRORS &&
            offset + this.cs - this.fileSize >= this.cs
          ) {
            this.res.corruptions++;
            this.log(
              "corruption",
              `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offset.toString(16)} size 0x${this.cs.toString(16)}`,
              offset,
            );
            // A preallocated zero cluster stays a zero cluster; data is lost.
            const preallocZero = !this.extendedL2 && (lo & 1) !== 0;
            if (await drop("data cluster outside the image file", preallocZero ? 1 : 0)) continue;
          }
          if (!this.hasDataFile && fix & FIX_ERRORS && this.overlapsMeta(offset, this.cs)) {
            // Our -r all extension: a data cluster on top of metadata would let guest writes
            // overwrite the metadata (and metadata updates the guest data).
            this.res.corruptions++;
            this.log(
              "corruption",
              `ERROR offset=${offset.toString(16)}: Data cluster overlaps metadata; L2 entry corrupted`,
              entryOffset,
            );
            const preallocZero = !this.extendedL2 && (lo & 1) !== 0;
            if (await drop("data cluster overlaps metadata", preallocZero ? 1 : 0)) continue;
          }
          if (fragInfo) {
            this.res.allocated++;
            if (nextContiguous !== 0 && offset !== nextContiguous) this.res.fragmented++;
            nextContiguous = offset + this.cs;
          }
          if (!this.hasDataFile) this.inc(offset, this.cs);
          break;
        }
        case "zero-plain":
          break;
        case "unallocated":
          if (this.extendedL2 && bmLo >>> 0 !== 0) {
            this.res.corruptions++;
            this.log(
              "corruption",
              "ERROR: Unallocated cluster has non-zero subcluster allocation map",
              entryOffset,
            );
          }
          break;
      }
    }
  }

  clusterType(
    hi: number,
    lo: number,
  ): "compressed" | "zero-alloc" | "zero-plain" | "unallocated" | "normal" {
    if ((hi & 0x4000_0000) !== 0) return "compressed";
    const hasOffset = offsetOf(hi, lo) !== 0;
    if ((lo & 1) !== 0 && !this.extendedL2) return hasOffset ? "zero-alloc" : "zero-plain";
    if (!hasOffset) return this.hasDataFile && (hi & 0x8000_0000) !== 0 ? "normal" : "unallocated";
    return "normal";
  }

  /** check_refcounts_l1 */
  async checkL1(l1Offset: number, l1Size: number, fragInfo: boolean, fix: number): Promise<void> {
    if (l1Size === 0) return;
    const bytes = l1Size * 8;
    this.inc(l1Offset, bytes);
    // A table past the end of the file reads as zeros: nothing to walk.
    if (l1Offset >= this.fileSize) return;
    const l1 = new U64TableView(new Uint8Array(bytes), "big");
    await this.backend.read(l1Offset, l1.bytes, { zeroPastEof: true });
    const virtualSize = this.layout.header.size;
    // A repair never writes into or through an L1 "table" that overlaps other metadata.
    const l1Fix = this.l1Trusted(l1Offset) ? fix : fix & ~FIX_ERRORS;
    for (let i = 0; i < l1Size; i++) {
      const hi = l1.hi(i);
      const lo = l1.lo(i);
      if ((hi | lo) === 0) continue;
      const entryOffset = l1Offset + i * 8;
      if ((hi & 0x7f00_0000) !== 0 || (lo & 0x1ff) !== 0) {
        this.log(
          "corruption",
          `ERROR found L1 entry with reserved bits set: ${hex64(hi, lo)}`,
          entryOffset,
        );
        this.res.corruptions++;
      }
      const l2Offset = offsetOf(hi, lo);
      const misaligned = l2Offset % this.cs !== 0;
      const outside = l2Offset + this.cs - this.fileSize >= this.cs;
      // Offset 0 (an entry holding only flags), the header cluster, or a cluster that other
      // metadata claims: never an L2 table a repair may write into.
      const onMeta = !misaligned && !outside && this.l2OnOtherMeta(l2Offset);
      if (
        l1Fix & FIX_ERRORS &&
        (misaligned || outside || onMeta) &&
        this.l1EntryWritable(entryOffset)
      ) {
        // Our -r all extension: drop an L1 entry whose L2 table cannot be where it says.
        this.res.corruptions++;
        const reason = misaligned
          ? "L2 table not aligned to the cluster size"
          : outside
            ? "L2 table outside the image file"
            : l2Offset === 0
              ? "L1 entry without an L2 table offset"
              : "L2 table overlaps other metadata";
        this.log(
          "corruption",
          misaligned
            ? `ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`
            : outside
              ? `ERROR l2_offset=${l2Offset.toString(16)}: L2 table is outside the image file; L1 entry corrupted`
              : l2Offset === 0
                ? `ERROR l1_entry=${hex64(hi, lo)}: L1 entry has flags but no L2 table offset; L1 entry corrupted`
                : `ERROR l2_offset=${l2Offset.toString(16)}: L2 table overlaps other metadata; L1 entry corrupted`,
          entryOffset,
        );
        await this.#write(entryOffset, new Uint8Array(8));
        this.res.corruptions--;
        this.res.corruptionsFixed++;
        const guest = i * this.l2Entries * this.cs;
        // Offset 0 reads as unallocated before and after: nothing is lost.
        if (guest < virtualSize && l2Offset !== 0) {
          this.lost.push({
            offset: guest,
            length: Math.min(this.l2Entries * this.cs, virtualSize - guest),
            reason,
          });
        }
        this.log("repair", `Repairing L1 entry ${i}: dropped (${reason})`, entryOffset);
        continue;
      }
      this.inc(l2Offset, this.cs);
      if (misaligned) {
        this.log(
          "corruption",
          `ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`,
          entryOffset,
        );
        this.res.corruptions++;
      }
      await this.checkL2(
        l2Offset,
        i,
        fragInfo,
        // Through an L1 table that cannot be trusted, nothing is written at all.
        this.l2Writable(l2Offset) ? l1Fix : l1Fix & ~FIX_ERRORS,
      );
    }
  }

  /** calculate_refcounts */
  async calculate(fix: number): Promise<void> {
    const L = this.layout;
    const h = L.header;
    this.inc(0, this.cs);
    await this.checkL1(h.l1TableOffset, h.l1Size, true, fix);
    if (this.hasDataFile && h.nbSnapshots > 0) {
      this.log("corruption", `ERROR ${h.nbSnapshots} snapshots in image with data file`);
      this.res.corruptions++;
    }
    for (const sn of L.snapshots) {
      if (sn.l1TableOffset % this.cs !== 0) {
        this.log(
          "corruption",
          `ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${sn.l1TableOffset.toString(16)}: L1 table is not cluster aligned; snapshot table entry corrupted`,
          sn.offset,
        );
        this.res.corruptions++;
        continue;
      }
      if (sn.l1Size > MAX_L1_ENTRIES) {
        this.log(
          "corruption",
          `ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${sn.l1Size.toString(16)}: L1 table is too large; snapshot table entry corrupted`,
          sn.offset,
        );
        this.res.corruptions++;
        continue;
      }
      await this.checkL1(sn.l1TableOffset, sn.l1Size, false, fix);
    }
    this.inc(h.snapshotsOffset, L.snapshotsSize);
    this.#tagRefcount = true;
    this.inc(h.refcountTableOffset, h.refcountTableClusters * this.cs);
    this.#tagRefcount = false;
    if (L.crypto !== undefined) this.inc(L.crypto.offset, L.crypto.length);
    await this.checkBitmaps();
    this.checkRefblocks();
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
        const hi = t.hi(i);
        const lo = t.lo(i);
        if ((hi & 0xff00_0000) !== 0 || (lo & 0x1fe) !== 0) {
          this.res.corruptions++;
          continue;
        }
        const off = offsetOf(hi, lo);
        if (off !== 0 && ((lo & 1) !== 0 || off % this.cs !== 0)) {
          this.res.corruptions++;
          continue;
        }
        if (off === 0) continue;
        this.inc(off, this.cs);
      }
    }
  }

  /** check_refblocks */
  checkRefblocks(): void {
    for (let i = 0; i < this.stored.tableEntries; i++) {
      const { hi, lo } = this.stored.entryWords(i);
      const offset = (hi >>> 0) * TWO_32 + ((lo & 0xffff_fe00) >>> 0);
      const cluster = Math.floor(offset / this.cs);
      const entryOffset = this.layout.header.refcountTableOffset + i * 8;
      if ((lo & 0x1ff) !== 0) {
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
        this.log("corruption", `ERROR refcount block ${i} is outside image`, entryOffset);
        // QEMU -r all grows the file to cover the block; we rebuild instead.
        this.rebuild = true;
        continue;
      }
      if (offset !== 0) {
        this.#tagRefcount = true;
        this.inc(offset, this.cs);
        this.#tagRefcount = false;
        const n = this.counts[cluster]!;
        if (n !== 1) {
          this.log("corruption", `ERROR refcount block ${i} refcount=${n}`, offset);
          this.res.corruptions++;
          this.rebuild = true;
        }
      }
    }
  }

  /** compare_refcounts */
  async compare(fix: number): Promise<void> {
    this.highest = 0;
    for (let i = 0; i < this.nbClusters; i++) {
      let r1: number;
      try {
        r1 = await this.stored.get(i);
      } catch {
        this.log("error", `Can't get refcount for cluster ${i}: Input/output error`, i * this.cs);
        this.res.checkErrors++;
        continue;
      }
      const r2 = this.counts[i]!;
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
          await this.stored.set(i, r2);
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

  /** check_oflag_copied */
  async checkOflagCopied(fix: number): Promise<void> {
    const h = this.layout.header;
    let repair: boolean;
    if (fix & FIX_ERRORS) repair = true;
    else if (fix & FIX_LEAKS)
      repair = this.res.checkErrors === 0 && this.res.corruptions === 0 && this.res.leaks === 0;
    else repair = false;
    const l1 = new U64TableView(new Uint8Array(h.l1Size * 8), "big");
    if (l1.bytes.byteLength > 0)
      await this.backend.read(h.l1TableOffset, l1.bytes, { zeroPastEof: true });
    const l2 = new U64TableView(new Uint8Array(this.cs), "big");
    const stride = this.extendedL2 ? 2 : 1;
    for (let i = 0; i < h.l1Size; i++) {
      let hi = l1.hi(i);
      const lo = l1.lo(i);
      const l2Offset = offsetOf(hi, lo);
      if (l2Offset === 0) continue;
      let refcount: number;
      try {
        refcount = await this.stored.get(Math.floor(l2Offset / this.cs));
      } catch {
        continue;
      }
      const copied = (hi & 0x8000_0000) !== 0;
      const aligned =
        l2Offset % this.cs === 0 && this.l2Writable(l2Offset) && this.l1Trusted(h.l1TableOffset);
      if ((refcount === 1) !== copied) {
        this.res.corruptions++;
        this.log(
          repair ? "repair" : "corruption",
          `${repair ? "Repairing" : "ERROR"} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hex64(hi, lo)} refcount=${refcount}`,
          h.l1TableOffset + i * 8,
        );
        const at = h.l1TableOffset + i * 8;
        if (repair && this.l1Trusted(h.l1TableOffset) && this.l1EntryWritable(at)) {
          hi = refcount === 1 ? (hi | 0x8000_0000) >>> 0 : hi & 0x7fff_ffff;
          l1.setWords(i, hi, lo);
          await this.#write(h.l1TableOffset + i * 8, l1.bytes.subarray(i * 8, i * 8 + 8));
          this.res.corruptions--;
          this.res.corruptionsFixed++;
        }
      }
      if (l2Offset >= this.fileSize) continue;
      await this.backend.read(l2Offset, l2.bytes, { zeroPastEof: true });
      let dirty = 0;
      for (let j = 0; j < this.l2Entries; j++) {
        const k = j * stride;
        const ehi = l2.hi(k);
        const elo = l2.lo(k);
        const type = this.clusterType(ehi, elo);
        if (type !== "normal" && type !== "zero-alloc") continue;
        let rc = 1;
        if (!this.hasDataFile) {
          try {
            rc = await this.stored.get(Math.floor(offsetOf(ehi, elo) / this.cs));
          } catch {
            continue;
          }
        }
        const ecopied = (ehi & 0x8000_0000) !== 0;
        if ((rc === 1) !== ecopied) {
          this.res.corruptions++;
          this.log(
            repair ? "repair" : "corruption",
            `${repair ? "Repairing" : "ERROR"} OFLAG_COPIED data cluster: l2_entry=${hex64(ehi, elo)} refcount=${rc}`,
            l2Offset + j * this.entryBytes,
          );
          if (repair && aligned) {
            l2.setWords(k, rc === 1 ? (ehi | 0x8000_0000) >>> 0 : ehi & 0x7fff_ffff, elo);
            dirty++;
          }
        }
      }
      if (dirty > 0) {
        await this.#write(l2Offset, l2.bytes);
        this.res.corruptions -= dirty;
        this.res.corruptionsFixed += dirty;
      }
    }
  }
}

/** Rewrite the header area (one write) and sync. */
async function writeHeader(
  backend: BlockBackend,
  layout: Layout,
  header: Qcow2Header,
): Promise<void> {
  const { bytes } = encodeHeaderArea(
    header,
    layout.extensions.map((e) => ({ type: e.type, data: e.data })),
    layout.backingFile,
  );
  await backend.write(0, bytes);
  await backend.flush();
}

const DIRTY = 1n;
const CORRUPT = 2n;
const KNOWN_AUTOCLEAR = 3n; // bitmaps, raw external data

interface PassOutcome {
  res: Counters;
  imageEndOffset: number;
  totalClusters: number;
  failure: string | undefined;
  rebuilt: boolean;
}

/**
 * The end of the furthest L1 table or snapshot table that starts inside the file (or up to
 * 32 MiB past it): a rebuild appends its structures at the end of the file, and a table that
 * reaches past the end (its size is wrong) would then read them as entries — new references
 * to garbage, which makes the image worse. (Placing them past the table instead turns its
 * garbage entries into references inside the file: worse again.)
 */
function tablesEnd(layout: Layout, fileSize: number): number {
  const h = layout.header;
  const cs = 2 ** h.clusterBits;
  let end = fileSize;
  const reach = (offset: number, bytes: number): void => {
    if (offset < fileSize + MAX_L1_ENTRIES * 8 && bytes <= MAX_L1_ENTRIES * 8) {
      end = Math.max(end, offset + bytes);
    }
  };
  reach(h.l1TableOffset, h.l1Size * 8);
  for (const sn of layout.snapshots) reach(sn.l1TableOffset, sn.l1Size * 8);
  reach(h.snapshotsOffset, layout.snapshotsSize);
  return Math.ceil(end / cs) * cs;
}

/** qcow2_co_check_locked: one full check (with repairs when `fix` says so). */
async function runCheck(
  backend: BlockBackend,
  fix: number,
  log: (kind: CheckMessageKind, text: string, offset?: number) => void,
  lost: LostRange[],
): Promise<PassOutcome> {
  let layout = await readLayout(backend);
  const h0 = layout.header;
  const cs = 2 ** h0.clusterBits;
  const totalClusters = Math.ceil(h0.size / cs);
  if (fix !== 0 && (h0.autoclearFeatures & ~KNOWN_AUTOCLEAR) !== 0n) {
    // What QEMU does on every read-write open: drop autoclear bits it does not know.
    const header = { ...h0, autoclearFeatures: h0.autoclearFeatures & KNOWN_AUTOCLEAR };
    await writeHeader(backend, layout, header);
    layout = { ...layout, header };
  }
  const fileSize = await backend.size();
  let p = new Pass(backend, layout, fileSize, log, lost);
  let rebuilt = false;
  try {
    await p.openStored();
    if (fix !== 0) await p.buildMetaMap();
    await p.calculate(fix);
    // Entries dropped by the walk must be gone on disk before any refcount goes down.
    if (fix !== 0) await backend.flush();
    const pre = { ...p.res };
    await p.compare(0);
    const size = await backend.size();
    // A rebuild appends its structures at the end of the file; a table reaching past the end
    // would read them as entries. Then repair what can be repaired without a rebuild.
    const noRebuild =
      p.rebuild && (fix & FIX_ERRORS) !== 0 && tablesEnd(layout, size) > Math.ceil(size / cs) * cs;
    if (p.rebuild && fix & FIX_ERRORS && !noRebuild) {
      const old = { ...p.res };
      log("info", "Rebuilding refcount structure");
      // New counts: everything referenced except the old refcount table and blocks, which
      // become free once the header names the new ones.
      const counts = p.counts.slice(0, p.nbClusters);
      for (const [first, n] of p.refcountRuns) {
        for (let c = first; c < first + n; c++) if (counts[c]! > 0) counts[c] = counts[c]! - 1;
      }
      await backend.flush();
      let header = layout.header;
      await rebuildRefcounts({
        backend,
        clusterBits: header.clusterBits,
        refcountOrder: header.refcountOrder,
        counts,
        onTableMoved: async (tableOffset, tableClusters) => {
          header = {
            ...header,
            refcountTableOffset: tableOffset,
            refcountTableClusters: tableClusters,
          };
          await writeHeader(backend, layout, header);
        },
      });
      rebuilt = true;
      layout = { ...layout, header };
      const carried = p.res;
      p = new Pass(backend, layout, await backend.size(), log, lost);
      await p.openStored();
      await p.buildMetaMap();
      p.res = { ...carried, corruptions: 0, leaks: 0, allocated: 0, fragmented: 0, compressed: 0 };
      await p.calculate(0);
      let freshLeaks = 0;
      if (fix & FIX_LEAKS) {
        const saved = p.res;
        p.res = zero();
        await p.compare(FIX_LEAKS);
        if (p.rebuild) log("error", "ERROR rebuilt refcount structure is still broken");
        freshLeaks = p.res.leaks;
        p.res = saved;
      }
      if (p.res.corruptions < old.corruptions)
        p.res.corruptionsFixed += old.corruptions - p.res.corruptions;
      if (p.res.leaks < old.leaks) p.res.leaksFixed += old.leaks - p.res.leaks;
      p.res.leaks += freshLeaks;
    } else if (fix !== 0) {
      if (noRebuild) {
        log(
          "error",
          "ERROR need to rebuild refcount structures, but an L1 table or the snapshot table reaches past the end of the file; not rebuilt",
        );
      } else if (p.rebuild) {
        log("error", "ERROR need to rebuild refcount structures");
        p.res.checkErrors++;
        throw new CheckAbort("Input/output error");
      }
      if (p.res.leaks > 0 || p.res.corruptions > 0) {
        p.res = pre;
        await p.compare(fix);
      }
    }
    if (fix !== 0) await backend.flush();
    await p.checkOflagCopied(fix);
    if (fix !== 0) await backend.flush();
  } catch (e) {
    if (e instanceof CheckAbort) {
      return { res: p.res, imageEndOffset: 0, totalClusters, failure: e.message, rebuilt };
    }
    throw e;
  }
  const res = p.res;
  if (fix !== 0 && res.checkErrors === 0 && res.corruptions === 0) {
    // qcow2_mark_clean + qcow2_mark_consistent, after everything else is on disk.
    const h = layout.header;
    const incompat = h.incompatibleFeatures & ~(DIRTY | CORRUPT);
    if (incompat !== h.incompatibleFeatures) {
      await writeHeader(backend, layout, { ...h, incompatibleFeatures: incompat });
    }
  }
  return { res, imageEndOffset: (p.highest + 1) * cs, totalClusters, failure: undefined, rebuilt };
}

/**
 * Check a qcow2 image as `qemu-img check [-r leaks|all]` does: count every reference to
 * every host cluster (header, active and snapshot L1/L2 tables, data and compressed
 * clusters, refcount table and blocks, snapshot table, bitmaps), compare with the stored
 * refcounts up to the end of the file, check the COPIED flags, and report what qemu-img
 * reports. Never throws on corruption; throws a typed error only when the image cannot be
 * opened at all (qemu-img: "Could not open", exit 1) or on I/O failure.
 *
 * With `repair`, fixes what qemu-img fixes (leaks; with "all" also too-low refcounts,
 * COPIED flags, and a rebuild of broken refcount structures), and in "all" mode also drops
 * L1/L2 entries pointing outside the file or misaligned (listed in `lostRanges`). After a
 * repair that fixed anything, the image is checked again and the result describes that
 * second check, with the fixed counts of the first (as qemu-img).
 */
export async function checkQcow2(
  backend: BlockBackend,
  options: CheckOptions = {},
): Promise<CheckResult> {
  const fix =
    options.repair === "all" ? FIX_LEAKS | FIX_ERRORS : options.repair === "leaks" ? FIX_LEAKS : 0;
  const messages: CheckMessage[] = [];
  const log = (kind: CheckMessageKind, text: string, offset?: number): void => {
    messages.push(offset === undefined ? { kind, text } : { kind, text, offset });
  };
  const lost: LostRange[] = [];
  const filename = options.filename ?? backend.name;
  let out = await runCheck(backend, fix, log, lost);
  let repaired: CheckResult["repaired"];
  const rebuilt = out.rebuilt;
  if (out.failure === undefined && (out.res.corruptionsFixed > 0 || out.res.leaksFixed > 0)) {
    repaired = { leaks: out.res.leaksFixed, corruptions: out.res.corruptionsFixed };
    const again = await runCheck(backend, 0, log, []);
    again.res.leaksFixed = out.res.leaksFixed;
    again.res.corruptionsFixed = out.res.corruptionsFixed;
    out = again;
  }
  const r = out.res;
  const base = {
    checkErrors: r.checkErrors,
    corruptions: r.corruptions,
    leaks: r.leaks,
    failure: out.failure,
  };
  return {
    filename,
    format: "qcow2",
    ...base,
    corruptionsFixed: r.corruptionsFixed,
    leaksFixed: r.leaksFixed,
    imageEndOffset: out.failure === undefined ? out.imageEndOffset : 0,
    totalClusters: out.totalClusters,
    allocatedClusters: r.allocated,
    fragmentedClusters: r.fragmented,
    compressedClusters: r.compressed,
    messages,
    repaired,
    lostRanges: lost,
    rebuilt,
    exitCode: checkExitCode(base),
  };
}

import { mask64 } from "@qimg/structs";
import type { U64TableView } from "@qimg/structs";

/**
 * L1 and L2 entry layouts (big-endian u64).
 *
 * L1 entry: bits 9..55 offset of an L2 table (cluster aligned, 0 = unallocated), bit 63
 * COPIED (refcount is exactly 1), all other bits reserved.
 *
 * Standard L2 entry: bit 0 reads-as-zero (v3), bits 9..55 host cluster offset, bit 62
 * compressed (0 here), bit 63 COPIED; bits 1..8 and 56..61 reserved.
 *
 * Compressed L2 entry (bit 62 set): with x = 62 - (cluster_bits - 8), bits 0..x-1 hold the
 * host byte offset of the compressed data and bits x..61 the number of additional 512-byte
 * sectors it spans.
 *
 * Extended L2 entries are 16 bytes: the standard u64, then a u64 bitmap whose bits 0..31 say
 * which of the 32 subclusters are allocated and bits 32..63 which read as zeros.
 */
/** L1 entry bits 9..55: the L2 table's file offset. */
export const L1_OFFSET_MASK = mask64(0x00ff_ffff_ffff_fe00n);
/** L1 entry bits that must be zero. */
export const L1_RESERVED_MASK = mask64(0x7f00_0000_0000_01ffn);
/** Standard L2 entry bits 9..55: the data cluster's file offset. */
export const L2_OFFSET_MASK = mask64(0x00ff_ffff_ffff_fe00n);
/** Standard L2 entry bits that must be zero. */
export const L2_RESERVED_MASK = mask64(0x3f00_0000_0000_01fen);
/** Bit 63 of L1 and L2 entries: the cluster's refcount is exactly 1 (writable in place). */
export const OFLAG_COPIED = mask64(1n << 63n);
/** Bit 62 of an L2 entry: the cluster is compressed (the rest is a {@link compressedLayout} descriptor). */
export const OFLAG_COMPRESSED = mask64(1n << 62n);
/** Bit 0 of a standard L2 entry (version 3): the cluster reads as zeros. */
export const OFLAG_ZERO = mask64(1n);
/** Refcount table entry bits 9..63: the refcount block's file offset. */
export const REFTABLE_OFFSET_MASK = mask64(0xffff_ffff_ffff_fe00n);
/** Refcount table entry bits 0..8, which must be zero. */
export const REFTABLE_RESERVED_MASK = mask64(0x1ffn);

/** Subclusters per cluster with extended L2 entries. */
export const SUBCLUSTERS = 32;

/** Masks for compressed descriptors for a given cluster_bits (computed once per image). */
export interface CompressedLayout {
  /** Number of bits holding the host offset (x). */
  readonly offsetBits: number;
  /** Mask of the host offset bits. */
  readonly offsetMask: ReturnType<typeof mask64>;
  /** Mask of the sector count bits (x..61), as a number after shifting right by x. */
  readonly sectorsMax: number;
}

/**
 * Where a compressed cluster descriptor keeps the host offset and the sector count, for a
 * given cluster_bits.
 */
export function compressedLayout(clusterBits: number): CompressedLayout {
  const x = 62 - (clusterBits - 8);
  return {
    offsetBits: x,
    offsetMask: mask64((1n << BigInt(x)) - 1n),
    sectorsMax: 2 ** (clusterBits - 8) - 1,
  };
}

/**
 * Decode a compressed descriptor from the entry's two words. Returns the host offset and the
 * byte length to read (to the end of the last sector it names).
 */
export function decodeCompressed(
  hi: number,
  lo: number,
  layout: CompressedLayout,
): { hostOffset: number; length: number; sectors: number } {
  const x = layout.offsetBits;
  // offset = low x bits; x >= 49 (cluster_bits <= 21), so the offset spans into hi.
  const offHi = hi & layout.offsetMask.hi;
  const hostOffset = offHi * 0x1_0000_0000 + (lo >>> 0);
  // sectors = bits x..61 -> all in hi (x >= 32): shift hi right by (x - 32), mask.
  const sectors = ((hi & 0x3fff_ffff) >>> (x - 32)) & layout.sectorsMax;
  const length = (sectors + 1) * 512 - (hostOffset % 512);
  return { hostOffset, length, sectors };
}

/** Encode a compressed descriptor's two words (without the COPIED bit). */
export function encodeCompressed(
  hostOffset: number,
  sectors: number,
  layout: CompressedLayout,
): { hi: number; lo: number } {
  const x = layout.offsetBits;
  const hi = (0x4000_0000 | (sectors << (x - 32)) | Math.floor(hostOffset / 0x1_0000_0000)) >>> 0;
  return { hi, lo: hostOffset >>> 0 };
}

// ---------------------------------------------------------------------------------------------
// Entry classification. Every function below works on an entry's two 32-bit words (`hi`, `lo`,
// as `U64TableView.hi/lo` return them) and returns small integers, so a walk over millions of
// entries allocates nothing per entry. The per-image facts the decoding depends on are gathered
// once in an {@link L2Format}.

const TWO_32 = 0x1_0000_0000;
/** Bits 9..55 of an L1/L2 entry, high word (bits 32..55). */
const OFFSET_HI = 0x00ff_ffff;
/** Bits 9..55 of an L1/L2 entry, low word (bits 9..31). */
const OFFSET_LO = 0xffff_fe00;
const COPIED_HI = 0x8000_0000;
const COMPRESSED_HI = 0x4000_0000;

/**
 * What a (standard) L2 entry says about its whole cluster, as QEMU's `QCow2ClusterType`.
 * With extended L2 entries the zero flag is not used, so only `Unallocated`, `Normal` and
 * `Compressed` occur; the subcluster bitmap says the rest ({@link subclusterType}).
 */
export const ClusterType = {
  /** No host cluster: reads from the backing file (or zeros). */
  Unallocated: 0,
  /** Zero flag, no host cluster. */
  ZeroPlain: 1,
  /** Zero flag with a host cluster kept allocated (preallocated zeros). */
  ZeroAlloc: 2,
  /** A host data cluster. */
  Normal: 3,
  /** A compressed cluster descriptor. */
  Compressed: 4,
} as const;
/** One of the {@link ClusterType} values. */
export type ClusterType = (typeof ClusterType)[keyof typeof ClusterType];

/** What one subcluster reads as, as QEMU's `QCow2SubclusterType` (standard entries: the cluster). */
export const SubclusterType = {
  /** The bitmap contradicts the entry (both allocated and zero, or allocated without a host). */
  Invalid: 0,
  /** No host cluster, not zero: reads from the backing file. */
  UnallocatedPlain: 1,
  /** The cluster has a host cluster but this subcluster is not allocated in it. */
  UnallocatedAlloc: 2,
  /** Reads as zeros, no host cluster. */
  ZeroPlain: 3,
  /** Reads as zeros, the host cluster stays allocated. */
  ZeroAlloc: 4,
  /** Data in the host cluster. */
  Normal: 5,
  /** Part of a compressed cluster. */
  Compressed: 6,
} as const;
/** One of the {@link SubclusterType} values. */
export type SubclusterType = (typeof SubclusterType)[keyof typeof SubclusterType];

/** What is wrong with an entry's bits, independent of the rest of the image. */
export const EntryProblem = {
  /** Nothing. */
  None: 0,
  /** Bits the format reserves are set. */
  ReservedBits: 1,
  /** The host offset is not a multiple of the cluster size. */
  Unaligned: 2,
} as const;
/** One of the {@link EntryProblem} values. */
export type EntryProblem = (typeof EntryProblem)[keyof typeof EntryProblem];

/** The per-image facts entry decoding depends on; build once with {@link l2Format}. */
export interface L2Format {
  /** log2 of the cluster size. */
  readonly clusterBits: number;
  /** The cluster size in bytes. */
  readonly clusterSize: number;
  /** Entries are 16 bytes (standard word + subcluster bitmap). */
  readonly extendedL2: boolean;
  /** u64 words per entry: 2 with extended L2 entries, else 1. */
  readonly stride: 1 | 2;
  /** Entries in one L2 table. */
  readonly entriesPerTable: number;
  /** Subclusters per cluster (32 with extended L2 entries, else 1). */
  readonly subclusters: number;
  /** Data clusters live in an external data file (offset 0 with COPIED is a real cluster). */
  readonly hasDataFile: boolean;
  /** Where compressed descriptors keep offset and length. */
  readonly compressed: CompressedLayout;
}

/** Gather the per-image facts for entry decoding (once per image, not per entry). */
export function l2Format(options: {
  readonly clusterBits: number;
  readonly extendedL2: boolean;
  readonly hasDataFile: boolean;
}): L2Format {
  const clusterSize = 2 ** options.clusterBits;
  const stride = options.extendedL2 ? 2 : 1;
  return {
    clusterBits: options.clusterBits,
    clusterSize,
    extendedL2: options.extendedL2,
    stride,
    entriesPerTable: clusterSize / (8 * stride),
    subclusters: options.extendedL2 ? SUBCLUSTERS : 1,
    hasDataFile: options.hasDataFile,
    compressed: compressedLayout(options.clusterBits),
  };
}

/** Bits 9..55 of an L1 or standard L2 entry: the table's or data cluster's host offset. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & OFFSET_HI) * TWO_32 + ((lo & OFFSET_LO) >>> 0);
}

/** Bit 63 of an L1 or L2 entry: the referenced cluster's refcount is exactly 1. */
export function entryCopied(hi: number): boolean {
  return (hi & COPIED_HI) !== 0;
}

/** Bit 62 of an L2 entry: a compressed cluster descriptor. */
export function entryCompressed(hi: number): boolean {
  return (hi & COMPRESSED_HI) !== 0;
}

/** Bit 0 of a standard L2 entry: the zero flag (not used with extended L2 entries). */
export function entryZeroFlag(lo: number): boolean {
  return (lo & 1) !== 0;
}

/** The entry's words with COPIED cleared (the high word; the low word is unchanged). */
export function withoutCopied(hi: number): number {
  return (hi & ~COPIED_HI) >>> 0;
}

/** The entry's high word with COPIED set or cleared. */
export function withCopied(hi: number, on: boolean): number {
  return (on ? hi | COPIED_HI : hi & ~COPIED_HI) >>> 0;
}

/**
 * Classify an L2 entry's cluster (QEMU's `qcow2_get_cluster_type`). Offset 0 is unallocated,
 * except with an external data file, where every cluster has refcount 1 and COPIED marks an
 * allocated cluster at data-file offset 0. A version 2 image has no zero flag: the caller
 * decides what a `Zero*` result means there (the driver refuses it, the checker counts it).
 */
export function clusterType(fmt: L2Format, hi: number, lo: number): ClusterType {
  if ((hi & COMPRESSED_HI) !== 0) return ClusterType.Compressed;
  const hasOffset = (hi & OFFSET_HI) !== 0 || (lo & OFFSET_LO) !== 0;
  if ((lo & 1) !== 0 && !fmt.extendedL2) {
    return hasOffset ? ClusterType.ZeroAlloc : ClusterType.ZeroPlain;
  }
  if (!hasOffset) {
    return fmt.hasDataFile && (hi & COPIED_HI) !== 0 ? ClusterType.Normal : ClusterType.Unallocated;
  }
  return ClusterType.Normal;
}

/**
 * Whether an extended entry's bitmap contradicts its cluster type: a subcluster both
 * allocated and zero in a normal cluster, or any subcluster allocated in an unallocated one.
 * (Compressed clusters' bitmaps are the checker's business: QEMU reports them separately.)
 */
export function bitmapInvalid(type: ClusterType, bitmapHi: number, bitmapLo: number): boolean {
  if (type === ClusterType.Normal) return (bitmapHi & bitmapLo) !== 0;
  if (type === ClusterType.Unallocated) return bitmapLo !== 0;
  return false;
}

/**
 * Classify subcluster `sc` of an entry (QEMU's `qcow2_get_subcluster_type`). For standard
 * entries `sc` must be 0 and the bitmap words are ignored; with extended L2 entries the
 * bitmap's low word says which subclusters are allocated and its high word which read as zeros.
 */
export function subclusterType(
  fmt: L2Format,
  hi: number,
  lo: number,
  bitmapHi: number,
  bitmapLo: number,
  sc: number,
): SubclusterType {
  const type = clusterType(fmt, hi, lo);
  if (!fmt.extendedL2) {
    switch (type) {
      case ClusterType.Compressed:
        return SubclusterType.Compressed;
      case ClusterType.ZeroPlain:
        return SubclusterType.ZeroPlain;
      case ClusterType.ZeroAlloc:
        return SubclusterType.ZeroAlloc;
      case ClusterType.Normal:
        return SubclusterType.Normal;
      default:
        return SubclusterType.UnallocatedPlain;
    }
  }
  if (type === ClusterType.Compressed) return SubclusterType.Compressed;
  if (bitmapInvalid(type, bitmapHi, bitmapLo)) return SubclusterType.Invalid;
  const zero = (bitmapHi >>> sc) & 1;
  if (type === ClusterType.Normal) {
    if (zero) return SubclusterType.ZeroAlloc;
    return (bitmapLo >>> sc) & 1 ? SubclusterType.Normal : SubclusterType.UnallocatedAlloc;
  }
  return zero ? SubclusterType.ZeroPlain : SubclusterType.UnallocatedPlain;
}

/**
 * What is wrong with a standard L2 entry's own bits: reserved bits (1..8 and 56..61, the
 * bits QEMU's check tests; bit 0 is the zero flag, and with extended L2 entries QEMU ignores
 * it) or a host offset that is not cluster aligned. Compressed descriptors have no reserved
 * bits and byte offsets: `None`.
 */
export function l2EntryProblem(fmt: L2Format, hi: number, lo: number): EntryProblem {
  if ((hi & COMPRESSED_HI) !== 0) return EntryProblem.None;
  if ((hi & L2_RESERVED_MASK.hi) !== 0 || (lo & L2_RESERVED_MASK.lo) !== 0) {
    return EntryProblem.ReservedBits;
  }
  if (entryOffset(hi, lo) % fmt.clusterSize !== 0) return EntryProblem.Unaligned;
  return EntryProblem.None;
}

/** Whether the L2 entry has reserved bits set (1..8 and 56..61), as QEMU's check tests it. */
export function l2ReservedBits(hi: number, lo: number): boolean {
  return (hi & L2_RESERVED_MASK.hi) !== 0 || (lo & L2_RESERVED_MASK.lo) !== 0;
}

/** The compressed descriptor's host byte offset (bits 0..x-1). */
export function compressedOffset(fmt: L2Format, hi: number, lo: number): number {
  return (hi & fmt.compressed.offsetMask.hi) * TWO_32 + (lo >>> 0);
}

/** The byte length a compressed descriptor names (to the end of its last sector). */
export function compressedLength(fmt: L2Format, hi: number, lo: number): number {
  const x = fmt.compressed.offsetBits;
  const sectors = ((hi & 0x3fff_ffff) >>> (x - 32)) & fmt.compressed.sectorsMax;
  return (sectors + 1) * 512 - (compressedOffset(fmt, hi, lo) % 512);
}

/** Word index of entry `j`'s standard u64 in an L2 table view (`j * stride`). */
export function l2Word(fmt: L2Format, j: number): number {
  return j * fmt.stride;
}

/** Classify entry `j` of an L2 table view (convenience over {@link clusterType}). */
export function l2TypeAt(fmt: L2Format, table: U64TableView, j: number): ClusterType {
  const k = j * fmt.stride;
  return clusterType(fmt, table.hi(k), table.lo(k));
}

/** Classify subcluster `sc` of entry `j` of an L2 table view. */
export function subclusterTypeAt(
  fmt: L2Format,
  table: U64TableView,
  j: number,
  sc: number,
): SubclusterType {
  const k = j * fmt.stride;
  if (!fmt.extendedL2) return subclusterType(fmt, table.hi(k), table.lo(k), 0, 0, 0);
  return subclusterType(fmt, table.hi(k), table.lo(k), table.hi(k + 1), table.lo(k + 1), sc);
}

/** The host offset (bits 9..55) of entry `j` of an L2 table view (0 for none). */
export function l2OffsetAt(fmt: L2Format, table: U64TableView, j: number): number {
  const k = j * fmt.stride;
  return entryOffset(table.hi(k), table.lo(k));
}

// L1 entries -----------------------------------------------------------------------------------

/** Whether an L1 entry has reserved bits set (1..8 and 56..62). */
export function l1ReservedBits(hi: number, lo: number): boolean {
  return (hi & L1_RESERVED_MASK.hi) !== 0 || (lo & L1_RESERVED_MASK.lo) !== 0;
}

/** The L2 table offset an L1 entry holds (bits 9..55; 0 for none). */
export const l1Offset = entryOffset;

// Refcount table entries ------------------------------------------------------------------------

/** The refcount block offset a refcount table entry holds (bits 9..63; 0 for none). */
export function reftableOffset(hi: number, lo: number): number {
  return (hi >>> 0) * TWO_32 + ((lo & OFFSET_LO) >>> 0);
}

/** Whether a refcount table entry has any of its reserved bits 0..8 set. */
export function reftableReservedBits(lo: number): boolean {
  return (lo & 0x1ff) !== 0;
}

import { mask64 } from "@qimg/structs";

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

import { U64TableView, mask64 } from "@qimg/structs";

/**
 * A bitmap table: one big-endian u64 per cluster of bitmap data (the "Bitmaps extension"
 * section of QEMU's docs/interop/qcow2.txt).
 *
 * - bits 9..55: host offset of the cluster holding this part of the bitmap, or 0;
 * - bit 0: with offset 0, set means "every bit of this part is 1", clear means "all 0"
 *   (with a non-zero offset it is reserved);
 * - bits 1..8 and 56..63: reserved, zero.
 *
 * Inside a data cluster bit `j` of byte `k` (least significant first) is bitmap bit
 * `k * 8 + j`; bitmap bit `n` covers guest bytes [n * granularity, (n + 1) * granularity).
 */
export const BITMAP_TABLE_ENTRY_SIZE = 8;
export const BITMAP_TABLE_OFFSET_MASK = mask64(0x00ff_ffff_ffff_fe00n);
export const BITMAP_TABLE_RESERVED_MASK = mask64(0xff00_0000_0000_01fen);
export const BITMAP_TABLE_ALL_ONES = mask64(1n);

/** Largest bitmap table QEMU accepts, in entries. */
export const BITMAP_MAX_TABLE_SIZE = 0x800_0000;
/** Largest bitmap QEMU accepts, in bytes of bitmap data. */
export const BITMAP_MAX_DATA_BYTES = 0x2000_0000;
export const BITMAP_MIN_GRANULARITY_BITS = 9;
export const BITMAP_MAX_GRANULARITY_BITS = 31;

/** The three meanings of a bitmap table entry. */
export const BitmapChunk = { zeros: 0, ones: 1, data: 2 } as const;
export type BitmapChunk = (typeof BitmapChunk)[keyof typeof BitmapChunk];

/** Bits in a bitmap covering `virtualSize` bytes at 2^granularityBits bytes per bit. */
export function bitmapBits(virtualSize: number, granularityBits: number): number {
  return Math.ceil(virtualSize / 2 ** granularityBits);
}

/** Bytes of bitmap data (whole bytes) for such a bitmap. */
export function bitmapDataBytes(virtualSize: number, granularityBits: number): number {
  return Math.ceil(bitmapBits(virtualSize, granularityBits) / 8);
}

/** Entries of its bitmap table: one per cluster of bitmap data. */
export function bitmapTableSize(
  virtualSize: number,
  granularityBits: number,
  clusterSize: number,
): number {
  return Math.ceil(bitmapDataBytes(virtualSize, granularityBits) / clusterSize);
}

/**
 * Entry `i` of a bitmap table: what it means, and the data cluster's offset (0 unless
 * `data`). Returns a problem message instead when the entry breaks the spec.
 */
export function classifyBitmapTableEntry(
  table: U64TableView,
  i: number,
  clusterSize: number,
): { kind: BitmapChunk; offset: number } | string {
  const hi = table.hi(i);
  const lo = table.lo(i);
  if ((hi & BITMAP_TABLE_RESERVED_MASK.hi) !== 0 || (lo & BITMAP_TABLE_RESERVED_MASK.lo) !== 0) {
    return `bitmap table entry ${i} has reserved bits set`;
  }
  const offset = table.getMasked(i, BITMAP_TABLE_OFFSET_MASK);
  const ones = (lo & BITMAP_TABLE_ALL_ONES.lo) !== 0;
  if (offset === 0) return { kind: ones ? BitmapChunk.ones : BitmapChunk.zeros, offset: 0 };
  if (ones) return `bitmap table entry ${i} has both an offset and the all-ones bit`;
  if (offset % clusterSize !== 0) {
    return `bitmap table entry ${i} offset ${offset} is not aligned to the cluster size ${clusterSize}`;
  }
  return { kind: BitmapChunk.data, offset };
}

/** A view over bitmap table bytes (big-endian u64 entries). */
export function bitmapTableView(bytes: Uint8Array): U64TableView {
  return new U64TableView(bytes, "big");
}

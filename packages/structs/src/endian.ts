import { RangeFormatError, hex } from "./errors.js";

/** Byte order of an on-disk format: qcow2 is big-endian, QED little-endian. */
export type Endian = "big" | "little";

const TWO_32 = 0x1_0000_0000;
/** The largest hi word whose u64 still fits a safe integer (2^53-1 = hi 0x1fffff). */
const MAX_SAFE_HI = 0x1f_ffff;

/** Wrap any byte array in a DataView without copying. */
export function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** The unsigned byte at `offset`. */
export function readU8(view: DataView, offset: number): number {
  return view.getUint8(offset);
}

/** The unsigned 16-bit integer at `offset`, in the given byte order. */
export function readU16(view: DataView, offset: number, littleEndian: boolean): number {
  return view.getUint16(offset, littleEndian);
}

/** The unsigned 32-bit integer at `offset`, in the given byte order. */
export function readU32(view: DataView, offset: number, littleEndian: boolean): number {
  return view.getUint32(offset, littleEndian);
}

/** High and low 32-bit words of the u64 at `offset`. */
function words(view: DataView, offset: number, littleEndian: boolean): [number, number] {
  const a = view.getUint32(offset, littleEndian);
  const b = view.getUint32(offset + 4, littleEndian);
  return littleEndian ? [b, a] : [a, b];
}

/**
 * Read a u64 as a `number`. Values above 2^53-1 cannot be a real offset or size, so they are
 * reported as a {@link RangeFormatError} naming `what` (e.g. "qcow2 header field size").
 */
export function readU64(
  view: DataView,
  offset: number,
  littleEndian: boolean,
  what = "u64 value",
): number {
  const hi = littleEndian ? view.getUint32(offset + 4, true) : view.getUint32(offset, false);
  const lo = littleEndian ? view.getUint32(offset, true) : view.getUint32(offset + 4, false);
  if (hi > MAX_SAFE_HI) {
    const big = (BigInt(hi) << 32n) | BigInt(lo);
    throw new RangeFormatError(`${what} ${hex(big)} is larger than 2^53-1`, { offset });
  }
  return hi * TWO_32 + lo;
}

/** Read a u64 as a `bigint` (bitmasks: every bit survives). */
export function readU64Bits(view: DataView, offset: number, littleEndian: boolean): bigint {
  const [hi, lo] = words(view, offset, littleEndian);
  return (BigInt(hi) << 32n) | BigInt(lo);
}

/** Store `value` as an unsigned byte at `offset` (range-checked). */
export function writeU8(view: DataView, offset: number, value: number): void {
  checkUint(value, 0xff, "u8");
  view.setUint8(offset, value);
}

/** Store `value` as an unsigned 16-bit integer at `offset`, in the given byte order (range-checked). */
export function writeU16(
  view: DataView,
  offset: number,
  value: number,
  littleEndian: boolean,
): void {
  checkUint(value, 0xffff, "u16");
  view.setUint16(offset, value, littleEndian);
}

/** Store `value` as an unsigned 32-bit integer at `offset`, in the given byte order (range-checked). */
export function writeU32(
  view: DataView,
  offset: number,
  value: number,
  littleEndian: boolean,
): void {
  checkUint(value, 0xffff_ffff, "u32");
  view.setUint32(offset, value, littleEndian);
}

/** Write a safe non-negative integer as a u64. */
export function writeU64(
  view: DataView,
  offset: number,
  value: number,
  littleEndian: boolean,
): void {
  checkUint(value, Number.MAX_SAFE_INTEGER, "u64");
  const hi = Math.floor(value / TWO_32);
  const lo = value >>> 0;
  if (littleEndian) {
    view.setUint32(offset, lo, true);
    view.setUint32(offset + 4, hi, true);
  } else {
    view.setUint32(offset, hi, false);
    view.setUint32(offset + 4, lo, false);
  }
}

/** Write a 64-bit mask from a `bigint` (bits above 63 are refused). */
export function writeU64Bits(
  view: DataView,
  offset: number,
  value: bigint,
  littleEndian: boolean,
): void {
  if (value < 0n || value > 0xffff_ffff_ffff_ffffn) {
    throw new RangeFormatError(`u64 bitmask ${value} does not fit in 64 bits`);
  }
  const hi = Number(value >> 32n);
  const lo = Number(value & 0xffff_ffffn);
  if (littleEndian) {
    view.setUint32(offset, lo, true);
    view.setUint32(offset + 4, hi, true);
  } else {
    view.setUint32(offset, hi, false);
    view.setUint32(offset + 4, lo, false);
  }
}

function checkUint(value: number, max: number, type: string): void {
  if (!Number.isInteger(value) || value < 0 || value > max) {
    throw new RangeFormatError(`${value} does not fit in ${type}`);
  }
}

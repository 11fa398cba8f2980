import { RangeFormatError, hex } from "./errors.js";
import type { Endian } from "./endian.js";

const TWO_32 = 0x1_0000_0000;

/**
 * A 64-bit mask split into two 32-bit words, precomputed once (never per entry) so table
 * accessors can mask without BigInt.
 */
export interface Mask64 {
  /** The high 32 bits of the mask. */
  readonly hi: number;
  /** The low 32 bits of the mask. */
  readonly lo: number;
}

/** Build a {@link Mask64} from a bigint mask; do this at module load, not in a loop. */
export function mask64(mask: bigint): Mask64 {
  if (mask < 0n || mask > 0xffff_ffff_ffff_ffffn) {
    throw new RangeFormatError(`mask ${mask} does not fit in 64 bits`);
  }
  return { hi: Number(mask >> 32n) >>> 0, lo: Number(mask & 0xffff_ffffn) >>> 0 };
}

/**
 * A zero-copy view of a table of u64 entries (L1, L2, refcount table, QED tables) over the
 * cached cluster bytes. Entries are converted on access with two 32-bit reads; nothing is
 * allocated per entry.
 */
export class U64TableView {
  /** Number of u64 entries. */
  readonly length: number;
  /** The bytes the view reads and writes (not a copy). */
  readonly bytes: Uint8Array;
  private readonly view: DataView;
  private readonly le: boolean;
  private readonly hiOff: number;
  private readonly loOff: number;

  constructor(bytes: Uint8Array, endian: Endian) {
    if (bytes.byteLength % 8 !== 0) {
      throw new RangeFormatError(`u64 table of ${bytes.byteLength} bytes is not a multiple of 8`);
    }
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.length = bytes.byteLength / 8;
    this.le = endian === "little";
    this.hiOff = this.le ? 4 : 0;
    this.loOff = this.le ? 0 : 4;
  }

  /** High 32 bits of entry `i`. */
  hi(i: number): number {
    return this.view.getUint32(i * 8 + this.hiOff, this.le);
  }

  /** Low 32 bits of entry `i`. */
  lo(i: number): number {
    return this.view.getUint32(i * 8 + this.loOff, this.le);
  }

  /** True when entry `i` is all zero bits. */
  isZero(i: number): boolean {
    return (this.hi(i) | this.lo(i)) === 0;
  }

  /** Entry `i` as a number; throws when it is above 2^53-1 (use {@link getMasked} for flags). */
  get(i: number): number {
    const hi = this.hi(i);
    if (hi > 0x1f_ffff) {
      throw new RangeFormatError(
        `table entry ${i} value ${hex((BigInt(hi) << 32n) | BigInt(this.lo(i)))} is larger than 2^53-1`,
      );
    }
    return hi * TWO_32 + this.lo(i);
  }

  /** Entry `i` as a bigint (cold paths: messages, debugging). */
  getBigInt(i: number): bigint {
    return (BigInt(this.hi(i)) << 32n) | BigInt(this.lo(i));
  }

  /** The bits of entry `i` under `mask`, as a number (the mask must fit 53 bits). */
  getMasked(i: number, mask: Mask64): number {
    return ((this.hi(i) & mask.hi) >>> 0) * TWO_32 + ((this.lo(i) & mask.lo) >>> 0);
  }

  /** True when any bit of `mask` is set in entry `i`. */
  test(i: number, mask: Mask64): boolean {
    return ((this.hi(i) & mask.hi) | (this.lo(i) & mask.lo)) !== 0;
  }

  /** Set entry `i` to a safe non-negative integer. */
  set(i: number, value: number): void {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw new RangeFormatError(`table entry value ${value} is not a u64 below 2^53`);
    }
    this.setWords(i, Math.floor(value / TWO_32), value >>> 0);
  }

  /** Set entry `i` from its two 32-bit words. */
  setWords(i: number, hi: number, lo: number): void {
    this.view.setUint32(i * 8 + this.hiOff, hi >>> 0, this.le);
    this.view.setUint32(i * 8 + this.loOff, lo >>> 0, this.le);
  }

  /** Replace the bits under `mask` in entry `i` with `value` (which must lie inside the mask). */
  setMasked(i: number, mask: Mask64, value: number): void {
    const vhi = Math.floor(value / TWO_32);
    const vlo = value >>> 0;
    if ((vhi & ~mask.hi) !== 0 || (vlo & ~mask.lo) !== 0 || value < 0) {
      throw new RangeFormatError(`value ${hex(value)} does not fit the field mask`);
    }
    const hi = (this.hi(i) & ~mask.hi) | vhi;
    const lo = (this.lo(i) & ~mask.lo) | vlo;
    this.setWords(i, hi, lo);
  }

  /** Set or clear every bit of `mask` in entry `i`. */
  setFlag(i: number, mask: Mask64, on: boolean): void {
    const hi = on ? this.hi(i) | mask.hi : this.hi(i) & ~mask.hi;
    const lo = on ? this.lo(i) | mask.lo : this.lo(i) & ~mask.lo;
    this.setWords(i, hi, lo);
  }

  /** Set entry `i` from a bigint (cold paths). */
  setBigInt(i: number, value: bigint): void {
    if (value < 0n || value > 0xffff_ffff_ffff_ffffn) {
      throw new RangeFormatError(`table entry value ${value} does not fit in 64 bits`);
    }
    this.setWords(i, Number(value >> 32n), Number(value & 0xffff_ffffn));
  }
}

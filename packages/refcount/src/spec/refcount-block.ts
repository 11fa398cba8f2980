/**
 * qcow2 refcount block: one cluster holding `clusterSize * 8 / refcountBits` unsigned
 * counters, one per host cluster.
 *
 * Layout (qcow2 spec, "Host cluster management"):
 * - widths 8, 16, 32 and 64 are plain big-endian integers, entry `i` at byte `i * width / 8`;
 * - widths 1, 2 and 4 are packed several to a byte, entry `i` in byte `i * width / 8`, and
 *   inside that byte at bit `(i % (8 / width)) * width` counted from the least significant
 *   bit (so entry 0 of a 1-bit block is bit 0 of byte 0, entry 1 of a 4-bit block is the
 *   high nibble of byte 0).
 */
import { InvalidArgumentError, RangeFormatError, hex } from "@qimg/structs";

const TWO_32 = 0x1_0000_0000;
/** Largest high word of a u64 whose value is still a safe integer (2^53-1). */
const MAX_SAFE_HI = 0x1f_ffff;

/** Smallest and largest refcount_order the format allows (widths 1 .. 64 bits). */
export const MIN_REFCOUNT_ORDER = 0;
/** Largest refcount_order (64-bit refcounts). */
export const MAX_REFCOUNT_ORDER = 6;

/** refcount_bits for a refcount_order (`1 << order`), validated. */
export function refcountBitsOf(refcountOrder: number): number {
  if (
    !Number.isInteger(refcountOrder) ||
    refcountOrder < MIN_REFCOUNT_ORDER ||
    refcountOrder > MAX_REFCOUNT_ORDER
  ) {
    throw new InvalidArgumentError(
      `refcount_order ${refcountOrder} is outside ${MIN_REFCOUNT_ORDER}..${MAX_REFCOUNT_ORDER} (refcount widths 1..64 bits)`,
    );
  }
  return 1 << refcountOrder;
}

/**
 * The largest refcount a width can hold: 2^bits-1, except 64-bit entries, which are
 * limited to 2^53-1 so they stay exact as a JavaScript number.
 */
export function maxRefcount(refcountBits: number): number {
  return refcountBits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** refcountBits - 1;
}

/**
 * A zero-copy view of one refcount block. `get`/`set` convert on access; nothing is
 * allocated per entry. Create one view per cached block and keep it as long as the bytes.
 */
export class RefcountBlockView {
  /** Number of entries (clusters described). */
  readonly length: number;
  /** Entry width in bits: 1, 2, 4, 8, 16, 32 or 64. */
  readonly bits: number;
  /** Largest value `set` accepts. */
  readonly max: number;
  /** The block's bytes (a view, not a copy). */
  readonly bytes: Uint8Array;
  private readonly view: DataView;
  /** For sub-byte widths: log2 of entries per byte, and the entry mask. */
  private readonly perByteShift: number;
  private readonly mask: number;

  constructor(bytes: Uint8Array, refcountBits: number) {
    if (![1, 2, 4, 8, 16, 32, 64].includes(refcountBits)) {
      throw new InvalidArgumentError(
        `refcount width ${refcountBits} bits is not one of 1, 2, 4, 8, 16, 32, 64`,
      );
    }
    if ((bytes.byteLength * 8) % refcountBits !== 0) {
      throw new InvalidArgumentError(
        `refcount block of ${bytes.byteLength} bytes does not hold a whole number of ${refcountBits}-bit entries`,
      );
    }
    this.bytes = bytes;
    this.bits = refcountBits;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.length = (bytes.byteLength * 8) / refcountBits;
    this.max = maxRefcount(refcountBits);
    this.perByteShift = refcountBits < 8 ? Math.log2(8 / refcountBits) : 0;
    this.mask = refcountBits < 8 ? (1 << refcountBits) - 1 : 0;
  }

  /** Refcount of entry `i`. A 64-bit entry above 2^53-1 throws a {@link RangeFormatError}. */
  get(i: number): number {
    switch (this.bits) {
      case 8:
        return this.bytes[i] ?? this.outOfRange(i);
      case 16:
        return this.view.getUint16(i * 2, false);
      case 32:
        return this.view.getUint32(i * 4, false);
      case 64: {
        const hi = this.view.getUint32(i * 8, false);
        const lo = this.view.getUint32(i * 8 + 4, false);
        if (hi > MAX_SAFE_HI) {
          throw new RangeFormatError(
            `refcount block entry ${i} holds ${hex((BigInt(hi) << 32n) | BigInt(lo))}, larger than 2^53-1`,
            { offset: i * 8 },
          );
        }
        return hi * TWO_32 + lo;
      }
      default: {
        const byte = this.bytes[i >>> this.perByteShift] ?? this.outOfRange(i);
        const shift = (i & ((1 << this.perByteShift) - 1)) * this.bits;
        return (byte >>> shift) & this.mask;
      }
    }
  }

  /** Set entry `i` to `value` (an integer in 0..{@link max}). */
  set(i: number, value: number): void {
    if (!Number.isInteger(value) || value < 0 || value > this.max) {
      throw new RangeFormatError(
        `refcount ${value} does not fit a ${this.bits}-bit refcount entry (maximum ${this.max})`,
      );
    }
    if (!Number.isInteger(i) || i < 0 || i >= this.length) this.outOfRange(i);
    switch (this.bits) {
      case 8:
        this.bytes[i] = value;
        return;
      case 16:
        this.view.setUint16(i * 2, value, false);
        return;
      case 32:
        this.view.setUint32(i * 4, value, false);
        return;
      case 64:
        this.view.setUint32(i * 8, Math.floor(value / TWO_32), false);
        this.view.setUint32(i * 8 + 4, value >>> 0, false);
        return;
      default: {
        const at = i >>> this.perByteShift;
        const shift = (i & ((1 << this.perByteShift) - 1)) * this.bits;
        const byte = this.bytes[at] ?? 0;
        this.bytes[at] = (byte & ~(this.mask << shift)) | (value << shift);
      }
    }
  }

  /** True when entry `i` is zero (a free cluster). Never throws for wide values. */
  isZero(i: number): boolean {
    if (this.bits === 64)
      return (this.view.getUint32(i * 8, false) | this.view.getUint32(i * 8 + 4, false)) === 0;
    return this.get(i) === 0;
  }

  private outOfRange(i: number): never {
    throw new InvalidArgumentError(`refcount block entry ${i} is outside 0..${this.length - 1}`);
  }
}

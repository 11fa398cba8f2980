import { InvalidArgumentError } from "./errors.js";

/** A decoded 64-bit feature mask: the known names that are set, and every unknown bit kept. */
export interface FeatureBits<N extends string> {
  /** The whole mask as stored. */
  readonly raw: bigint;
  /** Known features that are set, in bit order. */
  readonly names: readonly N[];
  /** Bits set that this definition does not know. */
  readonly unknown: bigint;
  /** Whether the named bit is set. */
  has(name: N): boolean;
}

/** A named set of feature bits (see `defineFeatures`). */
export interface FeatureSet<N extends string> {
  /** Bit number of every known feature. */
  readonly bits: Readonly<Record<N, number>>;
  /** All known bits as a mask. */
  readonly knownMask: bigint;
  /** The names of the bits set in `mask`, and the bits without a name (kept, not dropped). */
  decode(mask: bigint): FeatureBits<N>;
  /** Build a mask from names, plus `unknown` bits kept from a decoded mask. */
  encode(names: Iterable<N>, unknown?: bigint): bigint;
  /** Mask of one feature. */
  maskOf(name: N): bigint;
}

/** Declare a set of named feature bits: `defineFeatures({ dirty: 0, corrupt: 1 } as const)`. */
export function defineFeatures<const B extends Readonly<Record<string, number>>>(
  bits: B,
): FeatureSet<Extract<keyof B, string>> {
  type N = Extract<keyof B, string>;
  let known = 0n;
  const ordered = (Object.entries(bits) as [N, number][]).sort((a, b) => a[1] - b[1]);
  for (const [name, bit] of ordered) {
    if (!Number.isInteger(bit) || bit < 0 || bit > 63) {
      throw new InvalidArgumentError(`feature ${name} has bit ${bit}, outside 0..63`);
    }
    known |= 1n << BigInt(bit);
  }
  const set: FeatureSet<N> = {
    bits: bits as unknown as Record<N, number>,
    knownMask: known,
    decode(mask) {
      const names = ordered.filter(([, bit]) => (mask >> BigInt(bit)) & 1n).map(([n]) => n);
      return Object.freeze({
        raw: mask,
        names: Object.freeze(names),
        unknown: mask & ~known,
        has: (name: N) => names.includes(name),
      });
    },
    encode(names, unknown = 0n) {
      let m = unknown & ~known;
      for (const n of names) m |= set.maskOf(n);
      return m;
    },
    maskOf(name) {
      const bit = (bits as Record<string, number>)[name];
      if (bit === undefined) throw new InvalidArgumentError(`unknown feature name ${name}`);
      return 1n << BigInt(bit);
    },
  };
  return set;
}

/** Bit numbers set in a mask, ascending. */
export function bitsOf(mask: bigint): number[] {
  const out: number[] = [];
  for (let b = 0; b < 64 && mask >> BigInt(b) !== 0n; b++) {
    if ((mask >> BigInt(b)) & 1n) out.push(b);
  }
  return out;
}

/** A mask printed as 16 hex digits, the way QEMU prints unknown feature masks. */
export function formatMask(mask: bigint): string {
  return mask.toString(16).padStart(16, "0");
}

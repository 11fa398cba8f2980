/**
 * Size arguments as qemu-img parses them (qemu_strtosz): a decimal number, optionally with a
 * fraction, and an optional one-letter unit suffix, case-insensitive: B (bytes), K, M, G, T, P,
 * E (powers of 1024). Without a suffix the unit is `defaultUnit` (bytes unless told). A
 * fraction is only allowed together with a unit larger than a byte, and the result must be a
 * whole number of bytes. Hex (`0x200`) is accepted without fraction or suffix.
 */
const UNITS: Readonly<Record<string, number>> = {
  b: 1,
  k: 1024,
  m: 1024 ** 2,
  g: 1024 ** 3,
  t: 1024 ** 4,
  p: 1024 ** 5,
  e: 1024 ** 6,
};

export class SizeParseError extends Error {
  /** "range" when the number is well-formed but too large (or not a safe integer). */
  readonly kind: "syntax" | "range";
  constructor(message: string, kind: "syntax" | "range") {
    super(message);
    this.name = "SizeParseError";
    this.kind = kind;
  }
}

/** Parse `text` into a byte count; throws {@link SizeParseError}. */
export function parseSize(text: string, defaultUnit = 1): number {
  const s = text.trim();
  const hexMatch = /^0x([0-9a-f]+)$/i.exec(s);
  if (hexMatch !== null) {
    const v = Number.parseInt(hexMatch[1] ?? "", 16);
    if (!Number.isSafeInteger(v)) throw new SizeParseError(`size '${text}' is too large`, "range");
    return v;
  }
  const m = /^(\d+)(?:\.(\d*))?([bkmgtpe])?$/i.exec(s);
  if (m === null) throw new SizeParseError(`invalid size '${text}'`, "syntax");
  const intPart = m[1] ?? "0";
  const fracPart = m[2];
  const suffix = m[3];
  const unit = suffix === undefined ? defaultUnit : (UNITS[suffix.toLowerCase()] ?? 1);
  if (fracPart !== undefined && unit === 1) {
    throw new SizeParseError(`invalid size '${text}': a fraction needs a unit suffix`, "syntax");
  }
  // Exact arithmetic: whole part * unit + round(fraction * unit).
  let value = BigInt(intPart) * BigInt(unit);
  if (fracPart !== undefined && fracPart.length > 0) {
    const scale = 10n ** BigInt(fracPart.length);
    const frac = BigInt(fracPart) * BigInt(unit);
    value += frac / scale;
    // qemu truncates the fractional byte count.
  }
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new SizeParseError(`size '${text}' is too large`, "range");
  }
  return Number(value);
}

/** Round `n` up to a multiple of `align`. */
export function roundUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

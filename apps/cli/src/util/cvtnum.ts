/**
 * Numeric option values as qemu-img checks them (its cvtnum()/cvtnum_full() and the strtol
 * parse of `-m`), with its messages: `Invalid <name> specified. ...`.
 */
import { CliError } from "../errors.js";
import { parseSize, SizeParseError } from "./size.js";

/** The text qemu-img appends when a size cannot be parsed (one line here). */
export const SUFFIX_HELP =
  "You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.";

/** qemu-img's cvtnum_full(): a size with suffixes, within `[min, max]`. */
export function cvtnum(name: string, value: string, min: number, max: number): number {
  let n: number;
  try {
    n = parseSize(value);
  } catch (e) {
    if (e instanceof SizeParseError && e.kind === "range") {
      throw new CliError(`Invalid ${name} specified. Must be between ${min} and ${max}.`);
    }
    throw new CliError(`Invalid ${name} specified. ${SUFFIX_HELP}`);
  }
  if (n < min || n > max)
    throw new CliError(`Invalid ${name} specified. Must be between ${min} and ${max}.`);
  return n;
}

/** qemu-img's cvtnum(): a size with suffixes, at least 0 (a bad value names the suffixes). */
export function cvtsize(name: string, value: string): number {
  try {
    return parseSize(value);
  } catch {
    throw new CliError(`Invalid ${name} specified. ${SUFFIX_HELP}`);
  }
}

/**
 * A C `long` the way strtol(text, &end, 0) reads it when the whole text must be the number:
 * leading blanks and a sign allowed, `0x` hexadecimal, a leading `0` octal. Undefined when the
 * text is not one.
 */
export function strtolWhole(text: string): number | undefined {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (m === null) return undefined;
  const digits = m[2]!;
  const v = /^0[xX]/.test(digits)
    ? Number.parseInt(digits.slice(2), 16)
    : digits.length > 1 && digits.startsWith("0")
      ? Number.parseInt(digits.slice(1), 8)
      : Number.parseInt(digits, 10);
  return m[1] === "-" ? -v : v;
}

/**
 * Human-readable numbers exactly as qemu prints them.
 */

/** C's `%0.3g` for a finite, non-negative number. */
export function formatG3(x: number): string {
  if (x === 0) return "0";
  const [mant = "", expText = "0"] = x.toExponential(2).split("e");
  const exp = Number(expText);
  if (exp < -4 || exp >= 3) {
    const m = stripZeros(roundHalfEven(Number(mant), 2));
    return `${m}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  }
  return stripZeros(roundHalfEven(x, 2 - exp));
}

/** `x.toFixed(digits)`, but ties go to even like glibc's printf (for exactly representable ties). */
function roundHalfEven(x: number, digits: number): string {
  const scaled = x * 10 ** digits;
  if (
    Number.isSafeInteger(scaled * 2) &&
    !Number.isInteger(scaled) &&
    Number.isInteger(scaled * 2)
  ) {
    const down = Math.floor(scaled);
    const even = down % 2 === 0 ? down : down + 1;
    return (even / 10 ** digits).toFixed(digits);
  }
  return x.toFixed(digits);
}

function stripZeros(s: string): string {
  if (!s.includes(".")) return s;
  return s.replace(/0+$/, "").replace(/\.$/, "");
}

const SUFFIXES = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"] as const;

/** qemu's size_to_str(): "0 B", "152 KiB", "1.02 MiB", "4 GiB". */
export function sizeToStr(val: number): string {
  // frexp(val / (1000/1024)) exponent: the smallest e with 2^e > x (0 for x = 0).
  const x = val / (1000 / 1024);
  let e = 0;
  while (x > 0 && 2 ** e <= x) e++;
  const i = Math.trunc((e - 1) / 10);
  const div = 2 ** (i * 10);
  return `${formatG3(val / div)} ${SUFFIXES[i] ?? ""}B`;
}

/** Zeros to compare against (Buffer.compare is a native memcmp, which stops at the first difference). */
const ZEROS = new Uint8Array(64 * 1024);

/**
 * True when every byte of `buf[start, end)` is zero. Data blocks are rejected at their first
 * non-zero byte and zero blocks are scanned at memcmp speed, both in native code.
 */
export function isZero(buf: Uint8Array, start = 0, end = buf.length): boolean {
  if (start >= end) return true;
  if (buf[start] !== 0 || buf[end - 1] !== 0) return false;
  for (let i = start; i < end; i += ZEROS.length) {
    const n = Math.min(ZEROS.length, end - i);
    if (Buffer.compare(buf.subarray(i, i + n), ZEROS.subarray(0, n)) !== 0) return false;
  }
  return true;
}

/** Index of the first non-zero byte of `buf[start, end)`, or -1. */
export function firstNonZero(buf: Uint8Array, start = 0, end = buf.length): number {
  for (let i = start; i < end; i++) if (buf[i] !== 0) return i;
  return -1;
}

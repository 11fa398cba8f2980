/** True when every byte of `buf[start, end)` is zero (word-at-a-time where aligned). */
export function isZero(buf: Uint8Array, start = 0, end = buf.length): boolean {
  let i = start;
  while (i < end && (buf.byteOffset + i) % 4 !== 0) {
    if (buf[i] !== 0) return false;
    i++;
  }
  const words = Math.floor((end - i) / 4);
  if (words > 0) {
    // 32-bit words: no BigInt per word (that made this scan the slowest part of convert).
    const view = new Int32Array(buf.buffer, buf.byteOffset + i, words);
    for (let w = 0; w < words; w++) if (view[w] !== 0) return false;
    i += words * 4;
  }
  for (; i < end; i++) if (buf[i] !== 0) return false;
  return true;
}

/** Index of the first non-zero byte of `buf[start, end)`, or -1. */
export function firstNonZero(buf: Uint8Array, start = 0, end = buf.length): number {
  for (let i = start; i < end; i++) if (buf[i] !== 0) return i;
  return -1;
}

/** The byte a browser write run puts at guest offset `at` for its operation number `op`. */
export function patternByte(op: number, at: number): number {
  return (at * 7 + op * 13 + 1) & 0xff;
}

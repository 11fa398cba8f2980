/**
 * mulberry32: a small, fast, seeded PRNG returning floats in [0, 1). Used by the
 * fault-injection backend to tear writes reproducibly, and by every package's randomized tests
 * (operation sequences, crash points, mutations) so a printed seed replays a failure exactly.
 */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

import { describe, expect, it } from "vitest";
import { compressedLayout, decodeCompressed, encodeCompressed } from "./l2.js";

describe("compressed cluster descriptors", () => {
  it.each([9, 12, 16, 21])("round-trip for cluster_bits %i", (bits) => {
    const layout = compressedLayout(bits);
    expect(layout.offsetBits).toBe(62 - (bits - 8));
    for (const [host, sectors] of [
      [0x50000 + 123, 0],
      [0x7_0000_0200, layout.sectorsMax],
      [2 ** 40 + 511, 1],
    ] as const) {
      const { hi, lo } = encodeCompressed(host, sectors, layout);
      expect(hi & 0x4000_0000).not.toBe(0);
      const d = decodeCompressed(hi, lo, layout);
      expect(d.hostOffset).toBe(host);
      expect(d.sectors).toBe(sectors);
      expect(d.length).toBe((sectors + 1) * 512 - (host % 512));
    }
  });

  it("matches the spec's bit layout for 64 KiB clusters", () => {
    // x = 54: offset in bits 0..53, sector count in bits 54..61.
    const layout = compressedLayout(16);
    const d = decodeCompressed(0x4000_0000 | (3 << 22), 0x12345, layout);
    expect(d).toEqual({ hostOffset: 0x12345, sectors: 3, length: 4 * 512 - (0x12345 % 512) });
  });
});

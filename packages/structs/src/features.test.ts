import { describe, expect, it } from "vitest";
import { bitsOf, defineFeatures, formatMask } from "./features.js";

const Incompat = defineFeatures({ dirty: 0, corrupt: 1, externalData: 2 } as const);

describe("defineFeatures", () => {
  it("decodes known names and keeps unknown bits", () => {
    const f = Incompat.decode(0b101n | (1n << 40n) | (1n << 63n));
    expect(f.names).toEqual(["dirty", "externalData"]);
    expect(f.has("corrupt")).toBe(false);
    expect(f.unknown).toBe((1n << 40n) | (1n << 63n));
    expect(Incompat.encode(f.names, f.unknown)).toBe(f.raw);
  });

  it("has a known mask and per-feature masks", () => {
    expect(Incompat.knownMask).toBe(7n);
    expect(Incompat.maskOf("corrupt")).toBe(2n);
  });

  it("lists bits and prints masks as QEMU does", () => {
    expect(bitsOf(0xe000_0000_0000_0000n)).toEqual([61, 62, 63]);
    expect(formatMask(0xe000_0000_0000_0000n)).toBe("e000000000000000");
    expect(formatMask(4n)).toBe("0000000000000004");
  });
});

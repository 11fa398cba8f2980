import { describe, expect, it } from "vitest";
import { firstNonZero, isZero } from "./zero.js";

describe("isZero", () => {
  it("finds a single non-zero byte anywhere, at any alignment", () => {
    const buf = new Uint8Array(200_000);
    expect(isZero(buf)).toBe(true);
    for (const at of [0, 1, 7, 4095, 65535, 65536, 131073, 199_999]) {
      buf[at] = 1;
      expect(isZero(buf), `byte ${at}`).toBe(false);
      expect(isZero(buf, 0, at)).toBe(true);
      expect(isZero(buf, at + 1)).toBe(true);
      expect(firstNonZero(buf)).toBe(at);
      buf[at] = 0;
    }
    expect(isZero(buf, 10, 10)).toBe(true);
  });

  it("works on subarrays with an odd byteOffset", () => {
    const base = new Uint8Array(70_000);
    base[3] = 9;
    const view = base.subarray(5);
    expect(isZero(view)).toBe(true);
    base[69_999] = 1;
    expect(isZero(view)).toBe(false);
  });
});

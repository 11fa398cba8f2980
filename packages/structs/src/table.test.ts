import { describe, expect, it } from "vitest";
import { U64TableView, mask64 } from "./table.js";
import { RangeFormatError } from "./errors.js";

const OFFSET = mask64(0x00ff_ffff_ffff_fe00n);
const COPIED = mask64(1n << 63n);

describe("U64TableView", () => {
  it("reads and writes big-endian entries in place", () => {
    const bytes = new Uint8Array(32);
    const t = new U64TableView(bytes, "big");
    expect(t.length).toBe(4);
    t.set(1, 0x1_2345_6789);
    expect(Array.from(bytes.subarray(8, 16))).toEqual([0, 0, 0, 1, 0x23, 0x45, 0x67, 0x89]);
    expect(t.get(1)).toBe(0x1_2345_6789);
    expect(t.isZero(0)).toBe(true);
    expect(t.isZero(1)).toBe(false);
  });

  it("reads little-endian entries", () => {
    const bytes = new Uint8Array([0x89, 0x67, 0x45, 0x23, 1, 0, 0, 0]);
    expect(new U64TableView(bytes, "little").get(0)).toBe(0x1_2345_6789);
  });

  it("masks fields and flags without BigInt", () => {
    const t = new U64TableView(new Uint8Array(16), "big");
    t.setBigInt(0, (1n << 63n) | 0x5_0000_0000n | 0x1ffn);
    expect(t.getMasked(0, OFFSET)).toBe(0x5_0000_0000);
    expect(t.test(0, COPIED)).toBe(true);
    expect(() => t.get(0)).toThrow(RangeFormatError);
    t.setFlag(0, COPIED, false);
    expect(t.test(0, COPIED)).toBe(false);
    t.setMasked(0, OFFSET, 0x7_0001_0000);
    expect(t.getBigInt(0)).toBe(0x7_0001_0000n | 0x1ffn);
    expect(() => t.setMasked(0, OFFSET, 0x100)).toThrow(/does not fit the field mask/);
  });

  it("refuses a byte length that is not a multiple of 8", () => {
    expect(() => new U64TableView(new Uint8Array(12), "big")).toThrow(/not a multiple of 8/);
  });

  it("sees writes through another view of the same bytes (zero-copy)", () => {
    const bytes = new Uint8Array(64);
    const a = new U64TableView(bytes.subarray(8), "big");
    const b = new U64TableView(bytes, "big");
    a.set(0, 42);
    expect(b.get(1)).toBe(42);
  });
});

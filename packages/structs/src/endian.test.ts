import { describe, expect, it } from "vitest";
import {
  readU16,
  readU32,
  readU64,
  readU64Bits,
  viewOf,
  writeU16,
  writeU32,
  writeU64,
  writeU64Bits,
} from "./endian.js";
import { RangeFormatError } from "./errors.js";

describe("endian helpers", () => {
  it("reads big- and little-endian integers with explicit byte order", () => {
    const b = new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]);
    const v = viewOf(b);
    const small = viewOf(new Uint8Array([0, 0x1f, 3, 4, 5, 6, 7, 0]));
    expect(readU16(v, 0, false)).toBe(0x0102);
    expect(readU16(v, 0, true)).toBe(0x0201);
    expect(readU32(v, 0, false)).toBe(0x01020304);
    expect(readU32(v, 0, true)).toBe(0x04030201);
    expect(readU64(small, 0, false)).toBe(0x1f030405060700);
    expect(readU64(small, 0, true)).toBe(0x07060504031f00);
    expect(() => readU64(v, 0, false)).toThrow(/0x102030405060708 is larger than 2\^53-1/);
  });

  it("respects the byteOffset of a subarray", () => {
    const b = new Uint8Array([0xff, 0, 0, 0, 0, 0, 0, 0x10, 0x20]);
    expect(readU64(viewOf(b.subarray(1)), 0, false)).toBe(0x1020);
  });

  it("refuses a u64 above 2^53-1 with a typed error naming the field", () => {
    const b = new Uint8Array(8);
    writeU64Bits(viewOf(b), 0, 1n << 53n, false);
    expect(() => readU64(viewOf(b), 0, false, "qcow2 header field size")).toThrow(RangeFormatError);
    expect(() => readU64(viewOf(b), 0, false, "qcow2 header field size")).toThrow(
      /qcow2 header field size 0x20000000000000 is larger than 2\^53-1/,
    );
    writeU64(viewOf(b), 0, Number.MAX_SAFE_INTEGER, false);
    expect(readU64(viewOf(b), 0, false)).toBe(Number.MAX_SAFE_INTEGER);
  });

  it("round-trips 64-bit masks with every bit", () => {
    const b = new Uint8Array(8);
    for (const m of [0n, 1n, 1n << 63n, 0xe000_0000_0000_0000n, 0xffff_ffff_ffff_ffffn]) {
      writeU64Bits(viewOf(b), 0, m, true);
      expect(readU64Bits(viewOf(b), 0, true)).toBe(m);
      writeU64Bits(viewOf(b), 0, m, false);
      expect(readU64Bits(viewOf(b), 0, false)).toBe(m);
    }
    expect(() => writeU64Bits(viewOf(b), 0, 1n << 64n, false)).toThrow(RangeFormatError);
  });

  it("refuses values that do not fit the field width", () => {
    const v = viewOf(new Uint8Array(8));
    expect(() => writeU16(v, 0, 0x10000, false)).toThrow(/does not fit in u16/);
    expect(() => writeU32(v, 0, -1, false)).toThrow(/does not fit in u32/);
    expect(() => writeU64(v, 0, 1.5, false)).toThrow(/does not fit in u64/);
  });
});

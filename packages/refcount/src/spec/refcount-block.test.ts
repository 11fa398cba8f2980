import { describe, expect, it } from "vitest";
import { InvalidArgumentError, RangeFormatError } from "@qimg/structs";
import { RefcountBlockView, maxRefcount, refcountBitsOf } from "./refcount-block.js";
import { prng } from "../image.testkit.js";

const WIDTHS = [1, 2, 4, 8, 16, 32, 64] as const;

describe("RefcountBlockView packing", () => {
  it("width 1: entry 0 is bit 0 of byte 0, entry 9 is bit 1 of byte 1", () => {
    const b = new Uint8Array(4);
    const v = new RefcountBlockView(b, 1);
    expect(v.length).toBe(32);
    v.set(0, 1);
    expect(Array.from(b)).toEqual([0x01, 0, 0, 0]);
    v.set(9, 1);
    v.set(7, 1);
    expect(Array.from(b)).toEqual([0x81, 0x02, 0, 0]);
    expect([v.get(0), v.get(1), v.get(7), v.get(8), v.get(9)]).toEqual([1, 0, 1, 0, 1]);
    v.set(0, 0);
    expect(b[0]).toBe(0x80);
  });

  it("width 2: four entries per byte, entry 0 in bits 0-1", () => {
    const b = new Uint8Array(2);
    const v = new RefcountBlockView(b, 2);
    v.set(1, 3);
    expect(b[0]).toBe(0b0000_1100);
    v.set(3, 2);
    expect(b[0]).toBe(0b1000_1100);
    v.set(4, 1);
    expect(Array.from(b)).toEqual([0x8c, 0x01]);
    expect([v.get(0), v.get(1), v.get(2), v.get(3), v.get(4)]).toEqual([0, 3, 0, 2, 1]);
  });

  it("width 4: entry 0 is the low nibble, entry 1 the high nibble of byte 0", () => {
    const b = new Uint8Array(2);
    const v = new RefcountBlockView(b, 4);
    v.set(1, 0xa);
    expect(b[0]).toBe(0xa0);
    v.set(0, 0x5);
    expect(b[0]).toBe(0xa5);
    v.set(3, 0xf);
    expect(Array.from(b)).toEqual([0xa5, 0xf0]);
    expect([v.get(0), v.get(1), v.get(2), v.get(3)]).toEqual([5, 0xa, 0, 0xf]);
  });

  it("width 8: one byte per entry", () => {
    const b = new Uint8Array(4);
    const v = new RefcountBlockView(b, 8);
    v.set(2, 0xfe);
    expect(Array.from(b)).toEqual([0, 0, 0xfe, 0]);
    expect(v.get(2)).toBe(0xfe);
  });

  it("width 16: big-endian u16", () => {
    const b = new Uint8Array(6);
    const v = new RefcountBlockView(b, 16);
    v.set(1, 0x1234);
    expect(Array.from(b)).toEqual([0, 0, 0x12, 0x34, 0, 0]);
    expect(v.get(1)).toBe(0x1234);
  });

  it("width 32: big-endian u32", () => {
    const b = new Uint8Array(8);
    const v = new RefcountBlockView(b, 32);
    v.set(1, 0x89abcdef);
    expect(Array.from(b)).toEqual([0, 0, 0, 0, 0x89, 0xab, 0xcd, 0xef]);
    expect(v.get(1)).toBe(0x89abcdef);
  });

  it("width 64: big-endian u64, limited to 2^53-1", () => {
    const b = new Uint8Array(16);
    const v = new RefcountBlockView(b, 64);
    v.set(1, Number.MAX_SAFE_INTEGER);
    expect(Array.from(b.subarray(8))).toEqual([0, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    expect(v.get(1)).toBe(Number.MAX_SAFE_INTEGER);
    v.set(0, 0x1_0000_0002);
    expect(Array.from(b.subarray(0, 8))).toEqual([0, 0, 0, 1, 0, 0, 0, 2]);
    expect(() => v.set(0, 2 ** 53)).toThrow(RangeFormatError);
    b[0] = 0x10; // entry 0 is now about 2^60
    expect(() => v.get(0)).toThrow(/larger than 2\^53-1/);
    expect(v.isZero(0)).toBe(false);
  });

  it("every width holds its maximum and rejects one more with a message naming the width", () => {
    for (const w of WIDTHS) {
      const v = new RefcountBlockView(new Uint8Array(16), w);
      expect(v.length).toBe(128 / w);
      const max = maxRefcount(w);
      expect(v.max).toBe(max);
      v.set(v.length - 1, max);
      expect(v.get(v.length - 1)).toBe(max);
      expect(() => v.set(0, max + 1)).toThrow(
        new RegExp(`${w}-bit refcount entry \\(maximum ${max}\\)`),
      );
      expect(() => v.set(0, -1)).toThrow(RangeFormatError);
      expect(() => v.set(0, 1.5)).toThrow(RangeFormatError);
    }
    expect(() => new RefcountBlockView(new Uint8Array(16), 3)).toThrow(InvalidArgumentError);
    expect(() => new RefcountBlockView(new Uint8Array(1), 16)).toThrow(InvalidArgumentError);
  });

  it("random writes never disturb neighbours (every width, against a model)", () => {
    const rand = prng(0xc0ffee);
    for (const w of WIDTHS) {
      const v = new RefcountBlockView(new Uint8Array(64), w);
      const model = new Array<number>(v.length).fill(0);
      const max = Math.min(v.max, 2 ** 40);
      for (let k = 0; k < 2000; k++) {
        const i = Math.floor(rand() * v.length);
        const val = Math.floor(rand() * (max + 1));
        v.set(i, val);
        model[i] = val;
      }
      for (let i = 0; i < v.length; i++) expect(v.get(i)).toBe(model[i]);
    }
  });

  it("refcountBitsOf maps order to width and rejects orders outside 0..6", () => {
    expect([0, 1, 2, 3, 4, 5, 6].map(refcountBitsOf)).toEqual([1, 2, 4, 8, 16, 32, 64]);
    expect(() => refcountBitsOf(7)).toThrow(/refcount_order 7 is outside 0..6/);
  });
});

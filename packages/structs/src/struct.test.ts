import { describe, expect, it } from "vitest";
import { defineStruct, tilingProblems } from "./struct.js";
import { FormatError, RangeFormatError } from "./errors.js";

const Demo = defineStruct("demo header", "big", 32, {
  magic: { offset: 0, type: "u32", doc: "magic" },
  version: { offset: 4, type: "u16", doc: "version" },
  kind: { offset: 6, type: "u8", doc: "kind" },
  pad: { offset: 7, type: "bytes", length: 1, doc: "reserved" },
  size: { offset: 8, type: "u64", unit: "bytes", doc: "virtual size" },
  features: { offset: 16, type: "bits64", doc: "feature bits" },
  flags: { offset: 24, type: "bits32", doc: "flags" },
  tail: { offset: 28, type: "bytes", length: 4, doc: "opaque" },
} as const);

const LeDemo = defineStruct("le demo", "little", 12, {
  a: { offset: 0, type: "u32" },
  b: { offset: 4, type: "u64" },
} as const);

describe("defineStruct", () => {
  it("tiles its size exactly", () => {
    expect(tilingProblems(Demo)).toEqual([]);
    expect(tilingProblems(LeDemo)).toEqual([]);
  });

  it("finds gaps and overlaps", () => {
    const p = tilingProblems({
      name: "bad",
      size: 16,
      fields: {
        a: { offset: 0, type: "u32" },
        b: { offset: 2, type: "u32" },
        c: { offset: 8, type: "u32" },
      },
    });
    expect(p).toEqual([
      "bad: b at 2 overlaps a (ends at 4)",
      "bad: gap [6, 8) between b and c",
      "bad: gap [12, 16) after c",
    ]);
  });

  it("decodes and re-encodes byte-exactly, keeping unknown bits", () => {
    const bytes = new Uint8Array(32);
    for (let i = 0; i < 32; i++) bytes[i] = (i * 37 + 11) & 0xff;
    bytes.fill(0, 8, 10); // keep size below 2^53
    const d = Demo.decode(bytes);
    expect(d.magic).toBe(0x0b30557a);
    expect(typeof d.features).toBe("bigint");
    expect(Demo.encode(d)).toEqual(bytes);
  });

  it("decodes at an offset and encodes into a buffer", () => {
    const buf = new Uint8Array(20);
    buf.set([1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0], 8);
    const d = LeDemo.decode(buf, 8);
    expect(d).toEqual({ a: 1, b: 2 });
    const out = new Uint8Array(20);
    LeDemo.encode(d, out, 8);
    expect(out).toEqual(buf);
  });

  it("reports short input with the structure's name", () => {
    expect(() => Demo.decode(new Uint8Array(10), 0, 0x400)).toThrow(FormatError);
    expect(() => Demo.decode(new Uint8Array(10))).toThrow(/demo header needs 32 bytes but only 10/);
  });

  it("reports an oversized u64 with the field and file offset", () => {
    const bytes = new Uint8Array(32);
    bytes[8] = 0xff;
    try {
      Demo.decode(bytes, 0, 0x1000);
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(RangeFormatError);
      expect((e as RangeFormatError).offset).toBe(0x1008);
      expect((e as Error).message).toMatch(/demo header field size 0xff00000000000000/);
    }
  });

  it("refuses field declarations outside the size", () => {
    expect(() => defineStruct("x", "big", 4, { a: { offset: 2, type: "u32" } })).toThrow(
      /outside 4 bytes/,
    );
  });
});

import { describe, expect, it } from "vitest";
import {
  encodeBlockStatusPayload,
  encodeInfoString,
  encodeLengthPrefixed,
  encodeMetaContext,
  parseInfoRequest,
  parseMetaContextRequest,
} from "./payloads.js";

const u32 = (n: number): number[] => [n >>> 24, (n >> 16) & 255, (n >> 8) & 255, n & 255];
const str = (s: string): number[] => [...u32(s.length), ...new TextEncoder().encode(s)];

describe("option data parsers", () => {
  it("parse NBD_OPT_GO data: name and info requests", () => {
    const r = parseInfoRequest(new Uint8Array([...str("disk"), 0, 2, 0, 3, 0, 1]));
    expect(r).toEqual({ ok: true, value: { name: "disk", infos: [3, 1] } });
  });

  it.each([
    ["empty", []],
    ["name past the end", [0, 0, 0, 9, 1, 2]],
    ["count without requests", [...str(""), 0, 2, 0, 3]],
    ["bytes after the requests", [...str(""), 0, 0, 7]],
    ["invalid UTF-8 name", [0, 0, 0, 1, 0xff, 0, 0]],
    ["name over 4096 bytes", [0, 0, 0x10, 1, 0, 0]],
  ])("refuse malformed GO data (%s) without throwing", (_what, bytes) => {
    const r = parseInfoRequest(new Uint8Array(bytes));
    expect(r.ok).toBe(false);
  });

  it("parse and refuse meta context requests", () => {
    expect(
      parseMetaContextRequest(
        new Uint8Array([...str(""), ...u32(2), ...str("base:allocation"), ...str("qemu:")]),
      ),
    ).toEqual({ ok: true, value: { exportName: "", queries: ["base:allocation", "qemu:"] } });
    expect(parseMetaContextRequest(new Uint8Array([...str(""), ...u32(0xffffffff)])).ok).toBe(
      false,
    );
    expect(
      parseMetaContextRequest(new Uint8Array([...str(""), ...u32(1), ...str("x"), 0])).ok,
    ).toBe(false);
  });

  it("build length-prefixed strings and block status payloads", () => {
    expect(Array.from(encodeLengthPrefixed("ab", "cd"))).toEqual([0, 0, 0, 2, 97, 98, 99, 100]);
    expect(Array.from(encodeLengthPrefixed("é"))).toEqual([0, 0, 0, 2, 0xc3, 0xa9]);
    expect(Array.from(encodeBlockStatusPayload(7, [{ length: 512, flags: 3 }]))).toEqual([
      0, 0, 0, 7, 0, 0, 2, 0, 0, 0, 0, 3,
    ]);
  });

  it("build meta context and string info items: a big-endian id, then the UTF-8 name", () => {
    expect(Array.from(encodeMetaContext(0x01020304, "a:é"))).toEqual([
      1, 2, 3, 4, 97, 58, 0xc3, 0xa9,
    ]);
    expect(Array.from(encodeInfoString(0x0102, "dé"))).toEqual([1, 2, 100, 0xc3, 0xa9]);
  });
});

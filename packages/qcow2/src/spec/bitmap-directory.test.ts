import { describe, expect, it } from "vitest";
import { FormatError } from "@qimg/structs";
import {
  BitmapDirEntry,
  bitmapDirectorySlots,
  decodeBitmapDirectory,
  encodeBitmapDirectory,
} from "./bitmap-directory.js";

const enc = new TextEncoder();

/** A directory of entries with the given names and extra data sizes, each padded to 8. */
function directory(entries: { name: string; extra?: number }[]): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const [i, e] of entries.entries()) {
    const name = enc.encode(e.name);
    const extra = e.extra ?? 0;
    const b = new Uint8Array(Math.ceil((24 + extra + name.length) / 8) * 8);
    BitmapDirEntry.encode(
      {
        bitmapTableOffset: 0x10000 * (i + 1),
        bitmapTableSize: i + 1,
        flags: 2n,
        type: 1,
        granularityBits: 16,
        nameSize: name.length,
        extraDataSize: extra,
      },
      b,
      0,
    );
    b.set(name, 24 + extra);
    parts.push(b);
  }
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

describe("bitmap directory walk", () => {
  it("decodes entries at the slots' positions (extra data skipped, padding to 8)", () => {
    const dir = directory([
      { name: "a" },
      { name: "bitmap-two", extra: 13 },
      { name: "c".repeat(21) },
    ]);
    const slots = bitmapDirectorySlots(dir, 3, 0x5000);
    expect(slots).toEqual([
      { position: 0, size: 32, extraDataSize: 0 },
      { position: 32, size: 48, extraDataSize: 13 },
      { position: 80, size: 48, extraDataSize: 0 },
    ]);
    const entries = decodeBitmapDirectory(dir, 3, 0x5000);
    expect(entries.map((e) => [e.name, e.bitmapTableOffset, e.bitmapTableSize])).toEqual([
      ["a", 0x10000, 1],
      ["bitmap-two", 0x20000, 2],
      ["c".repeat(21), 0x30000, 3],
    ]);
  });

  it("both refuse an entry past the directory or an invalid name, with the same error", () => {
    const dir = directory([{ name: "a" }, { name: "b" }]);
    for (const f of [decodeBitmapDirectory, bitmapDirectorySlots]) {
      expect(() => f(dir, 3, 0x5000)).toThrow(/entry 2 at 0x5040 runs past the directory/);
      const noName = dir.slice();
      noName[32 + 19] = 0; // second entry: name size 0
      expect(() => f(noName, 2, 0x5000)).toThrow(FormatError);
      expect(() => f(noName, 2, 0x5000)).toThrow(/entry 1 at 0x5020: name of 0 bytes is invalid/);
      const longName = dir.slice();
      longName[18] = 0x04; // first entry: name size 1025
      longName[19] = 0x01;
      expect(() => f(longName, 2, 0x5000)).toThrow(/name of 1025 bytes is invalid/);
    }
  });

  it("the decoder tolerates a last entry whose padding runs past the directory; slots do not", () => {
    const dir = directory([{ name: "abc" }]).subarray(0, 27);
    expect(decodeBitmapDirectory(dir, 1, 0).map((e) => e.name)).toEqual(["abc"]);
    expect(() => bitmapDirectorySlots(dir, 1, 0)).toThrow(/runs past the directory/);
  });
});

describe("encodeBitmapDirectory", () => {
  it("round-trips: encode(decode(bytes)) is the bytes, for names of every padding", () => {
    for (const names of [
      ["a"],
      ["bitmap-two", "c".repeat(21), "é".repeat(100)],
      ["x".repeat(1023)],
    ]) {
      const dir = directory(names.map((name) => ({ name })));
      const decoded = decodeBitmapDirectory(dir, names.length, 0x1000);
      expect(encodeBitmapDirectory(decoded)).toEqual(dir);
      expect(decodeBitmapDirectory(encodeBitmapDirectory(decoded), names.length, 0)).toEqual(
        decoded,
      );
    }
  });

  it("refuses names of 0 or more than 1023 bytes", () => {
    const e = { granularityBits: 16, flags: 0, type: 1, bitmapTableOffset: 0, bitmapTableSize: 0 };
    expect(() => encodeBitmapDirectory([{ ...e, name: "" }])).toThrow(FormatError);
    expect(() => encodeBitmapDirectory([{ ...e, name: "é".repeat(512) }])).toThrow(FormatError);
  });
});

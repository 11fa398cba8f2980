import { describe, expect, it } from "vitest";
import fs from "node:fs";
import { fixturePath } from "@qimg/fixtures";
import {
  BitmapChunk,
  bitmapTableSize,
  bitmapTableView,
  classifyBitmapTableEntry,
} from "./bitmap-table.js";
import {
  BitmapDirEntry,
  bitmapDirectorySlots,
  decodeBitmapDirectory,
  patchBitmapDirEntry,
} from "./bitmap-directory.js";
import { decodeHeader } from "./header.js";
import { BitmapsExtension, ExtensionType, decodeExtensions } from "./extensions.js";

function table(entries: bigint[]) {
  const t = bitmapTableView(new Uint8Array(entries.length * 8));
  entries.forEach((e, i) => t.setBigInt(i, e));
  return t;
}

describe("bitmap tables", () => {
  it("classify entries as the spec says", () => {
    const t = table([0n, 1n, 0x30000n, 0x30001n, 0x30002n, 0x30200n, 1n << 56n]);
    expect(classifyBitmapTableEntry(t, 0, 65536)).toEqual({ kind: BitmapChunk.zeros, offset: 0 });
    expect(classifyBitmapTableEntry(t, 1, 65536)).toEqual({ kind: BitmapChunk.ones, offset: 0 });
    expect(classifyBitmapTableEntry(t, 2, 65536)).toEqual({
      kind: BitmapChunk.data,
      offset: 0x30000,
    });
    expect(classifyBitmapTableEntry(t, 3, 65536)).toMatch(/offset and the all-ones bit/);
    expect(classifyBitmapTableEntry(t, 4, 65536)).toMatch(/reserved bits/);
    expect(classifyBitmapTableEntry(t, 5, 65536)).toMatch(/not aligned/);
    expect(classifyBitmapTableEntry(t, 6, 65536)).toMatch(/reserved bits/);
  });

  it("size tables by bits of the whole disk, one entry per cluster of bitmap data", () => {
    // 1 GiB at 64 KiB per bit: 16384 bits = 2048 bytes = one 64 KiB cluster.
    expect(bitmapTableSize(2 ** 30, 16, 65536)).toBe(1);
    // 1 GiB at 512 bytes per bit: 2 Mi bits = 256 KiB = four 64 KiB clusters.
    expect(bitmapTableSize(2 ** 30, 9, 65536)).toBe(4);
    // A partial last bit still needs its bit: 4097 bits of 512-byte clusters' worth.
    expect(bitmapTableSize(512 * 4096 * 8 + 1, 0, 512)).toBe(4097);
  });
});

describe("bitmap directory slots", () => {
  it("find every entry of QEMU's directory and patch one in place, keeping the rest", () => {
    const file = new Uint8Array(fs.readFileSync(fixturePath("qcow2-bitmaps")));
    const h = decodeHeader(file);
    const ext = decodeExtensions(file, h.headerLength, 2 ** h.clusterBits).find(
      (e) => e.type === ExtensionType.bitmaps,
    )!;
    const { nbBitmaps, directoryOffset, directorySize } = BitmapsExtension.decode(ext.data);
    const dir = file.slice(directoryOffset, directoryOffset + directorySize);
    const entries = decodeBitmapDirectory(dir, nbBitmaps, directoryOffset);
    const slots = bitmapDirectorySlots(dir, nbBitmaps, directoryOffset);
    expect(slots.reduce((n, s) => n + s.size, 0)).toBe(directorySize);
    const patched = dir.slice();
    patchBitmapDirEntry(patched, slots[1]!.position, {
      bitmapTableOffset: 0x12340000,
      bitmapTableSize: 9,
      flags: 3,
    });
    const again = decodeBitmapDirectory(patched, nbBitmaps, directoryOffset);
    expect(again[0]).toEqual(entries[0]);
    expect(again[1]).toEqual({
      ...entries[1],
      bitmapTableOffset: 0x12340000,
      bitmapTableSize: 9,
      flags: 3,
    });
    // Only the 16 bytes of offset, size and flags changed.
    const at = slots[1]!.position;
    for (let i = 0; i < dir.length; i++) {
      if (i >= at && i < at + 16) continue;
      expect(patched[i]).toBe(dir[i]);
    }
    expect(BitmapDirEntry.size).toBe(24);
  });
});

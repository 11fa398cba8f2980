import path from "node:path";
import { describe, expect, it } from "vitest";
import { fixturePath, listFixtures, normalizeMap } from "@qimg/fixtures";
import type { MapEntry } from "@qimg/fixtures";
import type { DiskImage } from "@qimg/io";
import { openFile } from "./open.js";

/** Walk the disk with blockStatus and merge extents the way qemu-img map does. */
async function map(image: DiskImage): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  let pos = 0;
  while (pos < image.virtualSize) {
    const s = await image.blockStatus(pos, Math.min(image.virtualSize - pos, 1 << 30));
    expect(s.length).toBeGreaterThan(0);
    const e: MapEntry = {
      start: pos,
      length: s.length,
      depth: s.depth,
      present: s.present,
      zero: s.zero,
      data: s.data,
      ...(s.hostOffset !== undefined ? { offset: s.hostOffset } : {}),
    };
    out.push(e);
    pos += s.length;
  }
  return normalizeMap(out);
}

function strip(entries: readonly MapEntry[]): MapEntry[] {
  // Compare the facts qemu-img map prints; file names are checked separately.
  return normalizeMap(entries).map(({ filename: _f, ...rest }) => rest as MapEntry);
}

describe("blockStatus describes the same extents as qemu-img map", () => {
  const fixtures = listFixtures({ format: "qcow2" }).filter((f) => f.map !== null);
  it.each(fixtures.map((f) => [f.name, f] as const))("%s", async (name, f) => {
    const image = await openFile(fixturePath(name));
    try {
      expect(strip(await map(image))).toEqual(strip(f.map!));
    } finally {
      await image.close();
    }
  });

  it("names the file that holds the data in a backing chain", async () => {
    const image = await openFile(fixturePath("qcow2-backing-chain"));
    try {
      const s = await image.blockStatus(0, 65536);
      expect(s.depth).toBe(2);
      expect(path.basename(s.file ?? "")).toBe("base.raw");
    } finally {
      await image.close();
    }
  });
});

/**
 * readQcow2Metadata (layout.ts) reads what opening the image reads, and refuses what opening
 * refuses with the same error: every qcow2 fixture (good and hostile) both ways.
 */
import { describe, expect, it } from "vitest";
import { fixturePath, listFixtures } from "@qimg/fixtures";
import { FileBackend } from "@qimg/io/node";
import { openQcow2 } from "../src/index.js";
import { readQcow2Metadata } from "../src/layout.js";

async function outcome<T>(f: () => Promise<T>): Promise<{ value?: T; error?: string }> {
  try {
    return { value: await f() };
  } catch (e) {
    return { error: `${(e as Error).constructor.name}: ${(e as Error).message}` };
  }
}

describe("readQcow2Metadata agrees with openQcow2", () => {
  const fixtures = listFixtures({ format: "qcow2" });
  it.each(fixtures.map((f) => [f.name] as const))("%s", async (name) => {
    const backend = await FileBackend.open(fixturePath(name), { readOnly: true });
    try {
      const m = await outcome(() => readQcow2Metadata(backend, { noBacking: true }));
      const o = await outcome(() => openQcow2(backend, { readOnly: true, noBacking: true }));
      expect(m.error).toBe(o.error);
      if (m.value !== undefined && o.value !== undefined) {
        const img = o.value;
        expect(m.value.header).toEqual(img.header);
        expect(m.value.snapshots).toEqual(img.snapshots);
        expect(m.value.bitmaps).toEqual(img.bitmaps);
        expect(m.value.bitmapDirectory).toEqual(img.bitmapDirectory);
        expect(m.value.extensions).toEqual(img.extensions);
        expect(m.value.backingFilename).toBe(img.backingFilename);
        expect(m.value.l2.clusterSize).toBe(img.clusterSize);
      }
    } finally {
      await backend.close();
    }
  });
});

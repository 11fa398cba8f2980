import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { fixturePath, listFixtures } from "@qimg/fixtures";
import { openFile } from "./open.js";

const CHUNK = 1024 * 1024;

describe("every qcow2 fixture reads exactly what qemu-img reads", () => {
  const fixtures = listFixtures({ format: "qcow2" }).filter((f) => f.sha256 !== null);
  it.each(fixtures.map((f) => [f.name, f] as const))("%s", async (name, f) => {
    const image = await openFile(fixturePath(name));
    try {
      expect(image.virtualSize).toBe(f.virtualSize);
      const hash = createHash("sha256");
      const buf = new Uint8Array(CHUNK);
      for (let pos = 0; pos < image.virtualSize; pos += CHUNK) {
        const n = Math.min(CHUNK, image.virtualSize - pos);
        await image.read(pos, buf.subarray(0, n));
        hash.update(buf.subarray(0, n));
      }
      expect(hash.digest("hex")).toBe(f.sha256);
    } finally {
      await image.close();
    }
  });
});

/**
 * RawImage.blockStatus answers concurrent calls correctly. It scans the file through a scratch
 * buffer; two calls in flight on one image used to share it, so one call could classify the
 * other's bytes: `qimg convert -o backing_file=B` (which asks the new image's raw backing file
 * B where it has data, several requests in flight) then left B's data visible where the source
 * reads zeros (differential finding F7).
 */
import { describe, expect, it } from "vitest";
import { MemoryBackend } from "./memory.js";
import { RawImage } from "./raw.js";
import { seededRandom } from "./random.js";

describe("RawImage.blockStatus", () => {
  it("gives each of many concurrent calls the answer a lone call gives", async () => {
    const seed = Number(process.env.QIMG_SEED ?? Date.now() % 100000);
    const rnd = seededRandom(seed);
    const size = 3 * 1024 * 1024 + 1234;
    const bytes = new Uint8Array(size);
    // Alternating data and zero runs of 4 KiB blocks.
    for (let pos = 0, data = rnd() < 0.5; pos < size; data = !data) {
      const len = 4096 * (1 + Math.floor(rnd() * 40));
      if (data) for (let i = pos; i < Math.min(size, pos + len); i++) bytes[i] = 1 + (i % 251);
      pos += len;
    }
    const image = await RawImage.open(MemoryBackend.from(bytes));
    const queries: [number, number][] = [];
    for (let i = 0; i < 64; i++) {
      const offset = 4096 * Math.floor((rnd() * size) / 4096);
      queries.push([
        offset,
        Math.min(image.virtualSize - offset, 4096 * (1 + Math.floor(rnd() * 300))),
      ]);
    }
    const alone: string[] = [];
    for (const [o, l] of queries) alone.push(JSON.stringify(await image.blockStatus(o, l)));
    const together = await Promise.all(queries.map(([o, l]) => image.blockStatus(o, l)));
    expect(
      together.map((s) => JSON.stringify(s)),
      `seed ${seed}`,
    ).toEqual(alone);
  });
});

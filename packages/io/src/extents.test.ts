import { describe, expect, it } from "vitest";
import type { BlockStatus } from "./image.js";
import { ExtentIterator, StatusCursor, type StatusSource } from "./extents.js";
import { MemoryBackend } from "./memory.js";
import { seededRandom } from "./random.js";
import { RawImage } from "./raw.js";

/**
 * An image whose block status is a list of runs (like a driver's L2 walk, each run answered in
 * pieces no longer than `grain`), counting calls.
 */
function scripted(runs: readonly [length: number, zero: boolean][], grain = Infinity) {
  const starts: number[] = [];
  let size = 0;
  for (const [length] of runs) {
    starts.push(size);
    size += length;
  }
  const calls: [number, number][] = [];
  const image: StatusSource = {
    virtualSize: size,
    blockStatus(offset: number, length: number): Promise<BlockStatus> {
      calls.push([offset, length]);
      if (offset < 0 || length <= 0 || offset + length > size) throw new Error("bad request");
      let i = starts.length - 1;
      while (starts[i]! > offset) i--;
      const [runLength, zero] = runs[i]!;
      const end = Math.min(offset + length, starts[i]! + runLength, offset + grain);
      return Promise.resolve({
        offset,
        length: end - offset,
        present: !zero,
        zero,
        data: !zero,
        depth: 0,
      });
    },
  };
  return { image, calls, size };
}

async function runsOf(it: ExtentIterator): Promise<[number, number, boolean][]> {
  const out: [number, number, boolean][] = [];
  while (await it.next()) out.push([it.offset, it.length, it.zero]);
  expect(it.length).toBe(0);
  return out;
}

describe("ExtentIterator", () => {
  it("merges adjacent extents of one kind and cuts runs at maxLength", async () => {
    const { image } = scripted(
      [
        [1000, false],
        [24, false],
        [4096, true],
        [513, true],
        [70000, false],
      ],
      300,
    );
    expect(await runsOf(new ExtentIterator(image))).toEqual([
      [0, 1024, false],
      [1024, 4609, true],
      [5633, 70000, false],
    ]);
    expect(await runsOf(new ExtentIterator(image, { maxLength: 30000 }))).toEqual([
      [0, 1024, false],
      [1024, 4609, true],
      [5633, 30000, false],
      [35633, 30000, false],
      [65633, 10000, false],
    ]);
    // A window that starts and ends inside extents.
    expect(await runsOf(new ExtentIterator(image, { from: 1000, to: 6000 }))).toEqual([
      [1000, 24, false],
      [1024, 4609, true],
      [5633, 367, false],
    ]);
  });

  it("asks the driver once per extent however small the runs it hands out", async () => {
    const { image, calls } = scripted([
      [3 << 20, false],
      [5 << 20, true],
      [1 << 20, false],
    ]);
    const runs = await runsOf(new ExtentIterator(image, { maxLength: 1 << 19 }));
    expect(runs.length).toBe(6 + 10 + 2);
    // One call per extent plus the look-ahead that ends a run (never one per piece).
    expect(calls.length).toBeLessThanOrEqual(4);
  });

  it("assumeData hands out data runs without asking for status", async () => {
    const { image, calls } = scripted([[10000, true]]);
    expect(await runsOf(new ExtentIterator(image, { assumeData: true, maxLength: 4096 }))).toEqual([
      [0, 4096, false],
      [4096, 4096, false],
      [8192, 1808, false],
    ]);
    expect(calls).toEqual([]);
  });

  it("covers a raw image's bytes exactly: zero runs read as zeros, data runs do not (seeded)", async () => {
    const seed = Number(process.env.QIMG_SEED ?? Date.now() % 1e9);
    const rnd = seededRandom(seed);
    for (let round = 0; round < 20; round++) {
      const size = 4096 * (1 + Math.floor(rnd() * 40)) + Math.floor(rnd() * 4096);
      const bytes = new Uint8Array(size);
      for (let pos = 0; pos < size;) {
        const n = 1 + Math.floor(rnd() * 20000);
        if (rnd() < 0.5)
          for (let i = pos; i < Math.min(size, pos + n); i++) bytes[i] = 1 + (i % 251);
        pos += n;
      }
      const backend = new MemoryBackend();
      await backend.write(0, bytes);
      const image = await RawImage.open(backend);
      const max = 1 + Math.floor(rnd() * 20000);
      const from = Math.floor(rnd() * size);
      const to = from + Math.floor(rnd() * (image.virtualSize - from));
      const runs = await runsOf(new ExtentIterator(image, { from, to, maxLength: max }));
      let pos = from;
      for (const [offset, length, zero] of runs) {
        expect(offset, `seed ${seed}`).toBe(pos);
        expect(length, `seed ${seed}`).toBeLessThanOrEqual(max);
        const slice = new Uint8Array(image.virtualSize);
        slice.set(bytes);
        const run = slice.subarray(offset, offset + length);
        if (zero)
          expect(
            run.every((b) => b === 0),
            `seed ${seed}`,
          ).toBe(true);
        pos += length;
      }
      expect(pos, `seed ${seed}`).toBe(to);
    }
  });

  it("refuses a driver answer that does not cover the offset asked about", async () => {
    const image: StatusSource = {
      virtualSize: 4096,
      blockStatus: (offset) =>
        Promise.resolve({ offset, length: 0, present: true, zero: false, data: true, depth: 0 }),
    };
    await expect(new ExtentIterator(image).next()).rejects.toThrow(/does not cover/);
    expect(() => new ExtentIterator(image, { from: 5000 })).toThrow(/outside/);
    expect(() => new ExtentIterator(image, { maxLength: 0 })).toThrow(/limit/);
  });
});

describe("StatusCursor", () => {
  it("answers repeated and increasing offsets inside an extent from one call", async () => {
    const { image, calls } = scripted([
      [8192, true],
      [4096, false],
    ]);
    const c = new StatusCursor(image, 10000);
    expect((await c.at(0)).zero).toBe(true);
    expect((await c.at(4000)).zero).toBe(true);
    expect(c.end).toBe(8192);
    const s = await c.at(9000);
    expect([s.zero, c.end]).toEqual([false, 10000]);
    expect(calls).toEqual([
      [0, 10000],
      [9000, 1000],
    ]);
    expect(await c.allZero(100, 8192)).toBe(true);
    expect(await c.allZero(100, 8193)).toBe(false);
    await expect(c.at(10000)).rejects.toThrow(/outside/);
  });

  it("asks at most `probe` bytes at a time", async () => {
    const { image, calls } = scripted([[10 << 20, false]]);
    const c = new StatusCursor(image, image.virtualSize, 1 << 20);
    await c.at(0);
    await c.at(1 << 20);
    expect(calls).toEqual([
      [0, 1 << 20],
      [1 << 20, 1 << 20],
    ]);
  });
});

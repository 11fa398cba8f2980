import { ErrorCode, InvalidArgumentError } from "@qimg/structs";
import { describe, expect, it } from "vitest";
import type { WritableDiskImage } from "./image.js";
import { MemoryBackend } from "./memory.js";
import { RawImage } from "./raw.js";
import { seededRandom } from "./random.js";

describe("RawImage: the writable image contract", () => {
  it("opens read-only unless asked, and then refuses every write with READ_ONLY", async () => {
    const m = MemoryBackend.from(new Uint8Array(1000).fill(7));
    const ro: WritableDiskImage = await RawImage.open(m);
    expect(ro.readOnly).toBe(true);
    expect(ro.clusterSize).toBe(512);
    expect(ro.virtualSize).toBe(1024);
    for (const p of [ro.write(0, new Uint8Array(1)), ro.writeZeroes(0, 1), ro.discard(0, 1)]) {
      await expect(p).rejects.toMatchObject({ code: ErrorCode.READ_ONLY });
    }
    expect(m.snapshot()).toEqual(new Uint8Array(1000).fill(7));
    await expect(
      RawImage.open(MemoryBackend.from(new Uint8Array(1), { readOnly: true }), {
        readOnly: false,
      }),
    ).rejects.toMatchObject({ code: ErrorCode.READ_ONLY });
  });

  it("writes, zero-writes and discards (as zeros) inside the image; refuses ranges outside", async () => {
    const seed = Number(process.env.QIMG_SEED ?? Date.now() % 100000);
    const rnd = seededRandom(seed);
    const size = 3 * 1024 * 1024 + 777;
    const model = new Uint8Array(Math.ceil(size / 512) * 512);
    for (let i = 0; i < size; i += 89) model[i] = 1 + Math.floor(rnd() * 255);
    const m = MemoryBackend.from(model.slice(0, size));
    const img = await RawImage.open(m, { readOnly: false });
    for (let n = 0; n < 30; n++) {
      const off = Math.floor(rnd() * size);
      const len = Math.floor(rnd() * Math.min(size - off, 2.5 * 1024 * 1024));
      const k = rnd();
      if (k < 0.4) {
        const data = new Uint8Array(len);
        for (let i = 0; i < len; i += 97) data[i] = 1 + Math.floor(rnd() * 255);
        await img.write(off, data);
        model.set(data, off);
      } else if (k < 0.7) {
        await img.writeZeroes(off, len, { mayUnmap: rnd() < 0.5 });
        model.fill(0, off, off + len);
      } else {
        await img.discard(off, len);
        model.fill(0, off, off + len);
      }
    }
    const got = new Uint8Array(img.virtualSize);
    await img.read(0, got);
    expect(firstDifference(got, model), `seed ${seed}`).toBe(-1);
    const v = img.virtualSize;
    await expect(img.read(v - 1, new Uint8Array(2))).rejects.toThrow(
      new InvalidArgumentError(`request [${v - 1}, +2) is past the end of the ${v}-byte image`),
    );
    await expect(img.writeZeroes(-1, 1)).rejects.toThrow(/^invalid request: offset -1, length 1$/);
    await expect(img.discard(0, v + 1)).rejects.toBeInstanceOf(InvalidArgumentError);
    await img.flush();
    await img.close();
  });

  it("resizes by truncating the file: grows with zeros, shrinks, virtual size rounded to a sector", async () => {
    const m = MemoryBackend.from(new Uint8Array(3000).fill(5));
    const ro = await RawImage.open(MemoryBackend.from(new Uint8Array(10)));
    await expect(ro.resize(4096)).rejects.toMatchObject({ code: ErrorCode.READ_ONLY });
    const img = await RawImage.open(m, { readOnly: false });
    await img.resize(5001);
    expect(m.length).toBe(5001);
    expect(img.virtualSize).toBe(5120);
    const got = new Uint8Array(img.virtualSize);
    await img.read(0, got);
    expect(firstDifference(got.subarray(0, 3000), new Uint8Array(3000).fill(5))).toBe(-1);
    expect(firstDifference(got.subarray(3000), new Uint8Array(5120 - 3000))).toBe(-1);
    await img.resize(700);
    expect(m.length).toBe(700);
    expect(img.virtualSize).toBe(1024);
    await expect(img.read(1000, new Uint8Array(25))).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(img.resize(-1)).rejects.toBeInstanceOf(InvalidArgumentError);
    await img.close();
  });

  it("fails every call after close with CLOSED; close twice is fine", async () => {
    const img = await RawImage.open(MemoryBackend.from(new Uint8Array(4096)), { readOnly: false });
    await img.close();
    await img.close();
    for (const p of [
      img.read(0, new Uint8Array(1)),
      img.write(0, new Uint8Array(1)),
      img.writeZeroes(0, 1),
      img.discard(0, 1),
      img.flush(),
      img.blockStatus(0, 1),
      img.resize(0),
    ]) {
      await expect(p).rejects.toMatchObject({ code: ErrorCode.CLOSED });
    }
  });
});

/** Index of the first byte where `a` and `b` differ, or -1. */
function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

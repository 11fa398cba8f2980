/**
 * The writable image contract every format driver shares (`WritableDiskImage` in @qimg/io):
 * the same open defaults, the same refusal of a missing backing file, and the same typed
 * errors for read-only and closed images as raw (and qcow2).
 */
import { describe, expect, it } from "vitest";
import { MemoryBackend, RawImage } from "@qimg/io";
import type { WritableDiskImage } from "@qimg/io";
import { ErrorCode, InvalidArgumentError } from "@qimg/structs";
import { createQed } from "./create.js";
import { openQed } from "./image.js";
import { pattern } from "./testing/util.js";

const M = 1024 * 1024;

async function made(size: number, backingFile?: string): Promise<MemoryBackend> {
  const m = new MemoryBackend({ name: "top.qed" });
  await createQed(m, { size, clusterSize: 4096, ...(backingFile ? { backingFile } : {}) });
  return m;
}

describe("QedImage: the writable image contract", () => {
  it("opens read-only by default and refuses every write with READ_ONLY, file untouched", async () => {
    const m = await made(M + 1000);
    const before = m.snapshot();
    const img: WritableDiskImage = await openQed(m);
    expect(img.readOnly).toBe(true);
    expect(img.clusterSize).toBe(4096);
    expect("writeCompressed" in img).toBe(false);
    for (const p of [
      img.write(0, pattern(100, 1)),
      img.writeZeroes(0, 4096, { mayUnmap: true }),
      img.discard(0, 4096),
    ]) {
      await expect(p).rejects.toMatchObject({ code: ErrorCode.READ_ONLY });
    }
    await img.flush();
    await img.close();
    expect(m.snapshot()).toEqual(before);
  });

  it("refuses a read-write open of a read-only backend", async () => {
    const m = await made(M);
    const ro = MemoryBackend.from(m.snapshot(), { readOnly: true });
    await expect(openQed(ro, { readOnly: false })).rejects.toMatchObject({
      code: ErrorCode.READ_ONLY,
    });
  });

  it("a backing file that is not opened: read-only opens fail reads that reach it, read-write opens are refused, noBacking reads zeros", async () => {
    const base = pattern(2 * M, 9);
    const m = await made(2 * M + 512, "base.raw");
    const before = m.snapshot();
    await expect(openQed(m, { readOnly: false })).rejects.toThrow(
      new InvalidArgumentError(
        "image has the backing file 'base.raw' but no backing opener was given",
      ),
    );
    expect(m.snapshot()).toEqual(before);

    const copy = (): MemoryBackend => MemoryBackend.from(before, { name: "top.qed" });
    const ro = await openQed(copy());
    await expect(ro.read(0, new Uint8Array(10))).rejects.toBeInstanceOf(InvalidArgumentError);
    await ro.close();

    const none = await openQed(copy(), { noBacking: true, readOnly: false });
    expect(none.backing).toBeUndefined();
    const got = new Uint8Array(5000);
    await none.read(100, got);
    expect(got).toEqual(new Uint8Array(5000));
    await none.close();

    const opened = await openQed(copy(), {
      openBacking: async () => await RawImage.open(MemoryBackend.from(base, { readOnly: true })),
    });
    await opened.read(100, got);
    expect(got).toEqual(base.subarray(100, 5100));
    await opened.close();
  });

  it("fails every call after close with CLOSED; close twice is fine", async () => {
    const img = await openQed(await made(M), { readOnly: false });
    await img.write(0, pattern(5000, 3));
    await img.close();
    await img.close();
    for (const p of [
      img.read(0, new Uint8Array(1)),
      img.write(0, new Uint8Array(1)),
      img.writeZeroes(0, 1),
      img.discard(0, 1),
      img.flush(),
      img.blockStatus(0, 1),
      img.resize(2 * M),
    ]) {
      await expect(p).rejects.toMatchObject({ code: ErrorCode.CLOSED });
    }
  });

  it("refuses requests outside the image with the shared range check", async () => {
    const img = await openQed(await made(M + 1000), { readOnly: false });
    const v = img.virtualSize;
    await expect(img.write(v - 1, new Uint8Array(2))).rejects.toThrow(
      new InvalidArgumentError(`request [${v - 1}, +2) is past the end of the ${v}-byte QED image`),
    );
    await expect(img.discard(-1, 1)).rejects.toThrow(
      new InvalidArgumentError("invalid request: offset -1, length 1"),
    );
    await img.close();
  });
});

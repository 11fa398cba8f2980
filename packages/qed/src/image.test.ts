import { describe, expect, it } from "vitest";
import { MemoryBackend, RawImage } from "@qimg/io";
import type { BlockBackend } from "@qimg/io";
import { CorruptImageError, ErrorCode, UnsupportedFeatureError } from "@qimg/structs";
import { createQed } from "./create.js";
import { openQed } from "./image.js";
import { decodeQedHeader, encodeQedHeader } from "./spec/header.js";
import { QedTable } from "./spec/table.js";
import { LONG, firstDiff, pattern, prng } from "./testing/util.js";
import type { BackingOpener } from "./types.js";

const K = 1024;
const M = 1024 * 1024;

async function fresh(size = 4 * M, opts: { clusterSize?: number; tableSize?: number } = {}) {
  const m = new MemoryBackend();
  await createQed(m, { size, ...opts });
  return { m, img: await openQed(m, { readOnly: false }) };
}

async function readAll(
  img: { read(o: number, b: Uint8Array): Promise<void> },
  offset: number,
  length: number,
) {
  const b = new Uint8Array(length);
  await img.read(offset, b);
  return b;
}

function rawBacking(bytes: Uint8Array): { opener: BackingOpener; requests: unknown[] } {
  const requests: unknown[] = [];
  return {
    requests,
    opener: async (req) => {
      requests.push(req);
      return await RawImage.open(MemoryBackend.from(bytes, { readOnly: true, name: req.filename }));
    },
  };
}

describe("createQed", () => {
  it("lays out the file like qemu-img (header cluster, then L1)", async () => {
    const m = new MemoryBackend();
    await createQed(m, { size: 4 * M });
    expect(m.length).toBe(64 * K + 256 * K);
    const h = decodeQedHeader(m.snapshot());
    expect(h).toMatchObject({
      clusterSize: 65536,
      tableSize: 4,
      headerSize: 1,
      l1TableOffset: 65536,
      imageSize: 4 * M,
      features: 0n,
    });
  });

  it("rounds the size up to 512 and accepts 0", async () => {
    const m = new MemoryBackend();
    await createQed(m, { size: 1000 });
    expect((await openQed(m)).virtualSize).toBe(1024);
    await createQed(m, { size: 0 });
    expect((await openQed(m)).virtualSize).toBe(0);
  });

  it("validates options like qemu-img", async () => {
    const m = new MemoryBackend();
    await expect(createQed(m, { size: M, clusterSize: 3000 })).rejects.toThrow(
      /cluster size 3000 must be a power of two within \[4096, 67108864\]/,
    );
    await expect(createQed(m, { size: M, tableSize: 3 })).rejects.toThrow(
      /table size 3 must be a power of two within \[1, 16\]/,
    );
    await expect(createQed(m, { size: 2 ** 31, clusterSize: 4096, tableSize: 1 })).rejects.toThrow(
      /larger than 1073741824/,
    );
    await expect(createQed(m, { size: M, backingFormat: "raw" })).rejects.toThrow(
      /needs a backing file/,
    );
    await expect(
      createQed(m, { size: M, clusterSize: 4096, backingFile: "x".repeat(5000) }),
    ).rejects.toThrow(/does not fit/);
  });

  it("refuses block devices", async () => {
    const m = new MemoryBackend();
    const dev = new Proxy(m, {
      get: (t, p) => (p === "kind" ? "block-device" : (Reflect.get(t, p, t) as unknown)),
    }) as BlockBackend;
    await expect(createQed(dev, { size: M })).rejects.toThrow(
      /cannot create a QED image on the block device/,
    );
  });

  it("records the backing file and the raw flag", async () => {
    const m = new MemoryBackend({ name: "top.qed" });
    await createQed(m, { size: 2 * M, backingFile: "base.raw", backingFormat: "raw" });
    const { opener, requests } = rawBacking(new Uint8Array(2 * M));
    const img = await openQed(m, { openBacking: opener });
    expect(img.info()).toMatchObject({
      backingFilename: "base.raw",
      backingFormat: "raw",
      needCheck: false,
    });
    expect(requests).toEqual([
      {
        filename: "base.raw",
        format: "raw",
        relativeTo: "top.qed",
        readOnly: true,
        depth: 1,
        chain: ["top.qed"],
      },
    ]);
    await createQed(m, { size: 2 * M, backingFile: "base.qcow2", backingFormat: "qcow2" });
    const img2 = await openQed(m);
    expect(img2.info().backingFilename).toBe("base.qcow2");
    expect(img2.info().backingFormat).toBeUndefined();
  });
});

describe("openQed", () => {
  it("refuses unknown features and clears unknown autoclear bits only read-write", async () => {
    const m = new MemoryBackend();
    await createQed(m, { size: M });
    const h = decodeQedHeader(m.snapshot());
    await m.write(0, encodeQedHeader({ ...h, features: 1n << 40n }));
    const e = await openQed(m).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(UnsupportedFeatureError);
    expect((e as Error).message).toMatch(
      /^Unsupported QED features: 10000000000\n.*0x0000010000000000/,
    );

    await m.write(0, encodeQedHeader({ ...h, autoclearFeatures: 0x3n, compatFeatures: 0x10n }));
    const ro = await openQed(m, { readOnly: true });
    expect(ro.info().autoclearFeatures).toBe(3n);
    expect(decodeQedHeader(m.snapshot()).autoclearFeatures).toBe(3n);
    const rw = await openQed(m, { readOnly: false });
    expect(rw.info().autoclearFeatures).toBe(0n);
    const after = decodeQedHeader(m.snapshot());
    expect(after.autoclearFeatures).toBe(0n);
    expect(after.compatFeatures).toBe(0x10n);
  });

  it("refuses writes when read-only and I/O after close", async () => {
    const m = new MemoryBackend();
    await createQed(m, { size: M });
    const ro = await openQed(m, { readOnly: true });
    await expect(ro.write(0, new Uint8Array(512))).rejects.toMatchObject({
      code: ErrorCode.READ_ONLY,
    });
    const rw = await openQed(MemoryBackend.from(m.snapshot()), { readOnly: false });
    await rw.close();
    await expect(rw.read(0, new Uint8Array(1))).rejects.toMatchObject({ code: ErrorCode.CLOSED });
  });

  it("refuses requests past the end", async () => {
    const { img } = await fresh(M);
    await expect(img.read(M - 1, new Uint8Array(2))).rejects.toThrow(
      /past the end of the 1048576-byte QED image/,
    );
  });
});

describe("QedImage read/write", () => {
  it("reads zeros from a new image and maps nothing", async () => {
    const { img } = await fresh();
    expect(await readAll(img, 0, 128 * K)).toEqual(new Uint8Array(128 * K));
    expect(await img.blockStatus(0, 4 * M)).toEqual({
      offset: 0,
      length: 4 * M,
      present: false,
      zero: true,
      data: false,
      depth: 0,
    });
  });

  it("allocates data then L2 at the end of the file, like QEMU", async () => {
    const { m, img } = await fresh();
    await img.write(0, pattern(64 * K, 0x11));
    await img.write(M, pattern(4 * K, 0x22));
    await img.write(3 * M, pattern(128 * K, 0x33));
    // Same host offsets qemu-io gave in the qed-basic fixture.
    expect(await img.blockStatus(0, 4 * M)).toMatchObject({
      length: 64 * K,
      data: true,
      hostOffset: 327680,
    });
    expect(await img.blockStatus(M, 3 * M)).toMatchObject({
      length: 64 * K,
      data: true,
      hostOffset: 655360,
    });
    expect(await img.blockStatus(3 * M, M)).toMatchObject({
      length: 128 * K,
      data: true,
      hostOffset: 720896,
    });
    expect(await img.blockStatus(64 * K, 4 * M - 64 * K)).toMatchObject({
      length: M - 64 * K,
      present: false,
    });
    const c = await readAll(img, M, 64 * K);
    expect(c.subarray(0, 4 * K)).toEqual(pattern(4 * K, 0x22));
    expect(c.subarray(4 * K)).toEqual(new Uint8Array(60 * K));
    await img.close();
    expect(m.length).toBe(720896 + 128 * K);
    expect(decodeQedHeader(m.snapshot()).features).toBe(0n);
  });

  it("writes in place once allocated", async () => {
    const { m, img } = await fresh();
    await img.write(0, pattern(8 * K, 1));
    const size = m.length;
    await img.write(4 * K, pattern(8 * K, 2));
    expect(m.length).toBe(size);
    const b = await readAll(img, 0, 16 * K);
    expect(b.subarray(0, 4 * K)).toEqual(pattern(4 * K, 1));
    expect(b.subarray(4 * K, 12 * K)).toEqual(pattern(8 * K, 2));
    expect(b.subarray(12 * K)).toEqual(new Uint8Array(4 * K));
  });

  it("spans L2 tables (4 KiB clusters, 1-cluster tables)", async () => {
    const { img } = await fresh(8 * M, { clusterSize: 4096, tableSize: 1 });
    const span = 4096 * 512;
    const data = new Uint8Array(3 * 4096).map((_, i) => i & 0xff);
    await img.write(span - 4096 - 100, data);
    expect(await readAll(img, span - 4096 - 100, data.length)).toEqual(data);
    expect(await img.check()).toMatchObject({ corruptions: 0, leaks: 0, allocatedClusters: 4 });
  });

  it("writes zero clusters for whole clusters and data for the rest", async () => {
    const { m, img } = await fresh();
    await img.writeZeroes(0, 4 * 64 * K);
    const size = m.length;
    expect(size).toBe(320 * K + 256 * K); // only an L2 table was added
    expect(await img.blockStatus(0, 4 * M)).toEqual({
      offset: 0,
      length: 256 * K,
      present: true,
      zero: true,
      data: false,
      depth: 0,
    });
    await img.writeZeroes(M + 100, 200);
    expect(await img.blockStatus(M, 64 * K)).toMatchObject({ data: true });
    // Unaligned range with a whole cluster inside.
    await img.write(2 * M, pattern(3 * 64 * K, 9));
    await img.writeZeroes(2 * M + 1000, 2 * 64 * K);
    const b = await readAll(img, 2 * M, 3 * 64 * K);
    expect(b.subarray(0, 1000)).toEqual(pattern(1000, 9));
    expect(b.subarray(1000, 1000 + 128 * K)).toEqual(new Uint8Array(128 * K));
    expect(b.subarray(1000 + 128 * K)).toEqual(pattern(64 * K - 1000, 9));
    // A partial write into a zero cluster keeps the rest zero.
    await img.write(100, pattern(10, 7));
    const z = await readAll(img, 0, 64 * K);
    expect(z.subarray(100, 110)).toEqual(pattern(10, 7));
    expect(z.subarray(110)).toEqual(new Uint8Array(64 * K - 110));
  });

  it("discard is accepted and changes nothing (QEMU's QED has no discard)", async () => {
    const { img } = await fresh();
    await img.write(0, pattern(4 * K, 5));
    await img.discard(0, 64 * K);
    expect(await readAll(img, 0, 4 * K)).toEqual(pattern(4 * K, 5));
  });

  it("grows but never shrinks", async () => {
    const { m, img } = await fresh(M);
    await img.resize(2 * M);
    expect(img.virtualSize).toBe(2 * M);
    expect(decodeQedHeader(m.snapshot()).imageSize).toBe(2 * M);
    await expect(img.resize(M)).rejects.toThrow(/shrinking QED images is not supported/);
    await expect(img.resize(2 * M + 1)).rejects.toThrow(/multiple of 512/);
    await img.write(2 * M - 512, pattern(512, 3));
    expect(await readAll(img, 2 * M - 512, 512)).toEqual(pattern(512, 3));
  });

  it("runs non-overlapping writes in parallel and reads them back", async () => {
    const { img } = await fresh(16 * M);
    const rand = prng(42);
    const model = new Uint8Array(16 * M);
    const ops: Promise<void>[] = [];
    for (let i = 0; i < 64; i++) {
      const off = i * 256 * K + Math.floor(rand() * 100) * 512;
      const len = 512 * (1 + Math.floor(rand() * 200));
      const d = pattern(len, 1 + (i % 250));
      model.set(d, off);
      ops.push(img.write(off, d));
    }
    await Promise.all(ops);
    expect(firstDiff(await readAll(img, 0, 16 * M), model)).toBe(-1);
    expect(await img.check()).toMatchObject({ corruptions: 0, leaks: 0 });
  });

  it("matches a reference model over random operations", async () => {
    const seeds = LONG ? 40 : 4;
    for (let s = 1; s <= seeds; s++) {
      const rand = prng(s);
      const size = 8 * M;
      const m = new MemoryBackend();
      await createQed(m, {
        size,
        clusterSize: rand() < 0.5 ? 4096 : 65536,
        tableSize: rand() < 0.5 ? 1 : 4,
      });
      let backend = m;
      let img = await openQed(backend, { readOnly: false });
      const model = new Uint8Array(size);
      const steps = LONG ? 400 : 60;
      for (let i = 0; i < steps; i++) {
        const off = Math.floor(rand() * (size - 1));
        const len = Math.min(size - off, 1 + Math.floor(rand() * 300 * K));
        const r = rand();
        try {
          if (r < 0.55) {
            const d = pattern(len, Math.floor(rand() * 256));
            model.set(d, off);
            await img.write(off, d);
          } else if (r < 0.75) {
            model.fill(0, off, off + len);
            await img.writeZeroes(off, len);
          } else if (r < 0.95) {
            expect(firstDiff(await readAll(img, off, len), model.subarray(off, off + len))).toBe(
              -1,
            );
          } else {
            await img.close();
            backend = MemoryBackend.from(backend.snapshot());
            img = await openQed(backend, { readOnly: false });
          }
        } catch (e) {
          throw new Error(`seed ${s} step ${i}: ${(e as Error).message}`, { cause: e });
        }
      }
      expect(firstDiff(await readAll(img, 0, size), model)).toBe(-1);
      expect(await img.check()).toMatchObject({ corruptions: 0, leaks: 0 });
    }
  });
});

describe("QedImage over a backing file", () => {
  async function overBacking(baseSize = 2 * M, topSize = 2 * M) {
    const base = new Uint8Array(baseSize).map((_, i) => (i >> 9) & 0xff);
    const m = new MemoryBackend({ name: "top.qed" });
    await createQed(m, { size: topSize, backingFile: "base.raw", backingFormat: "raw" });
    const img = await openQed(m, { readOnly: false, openBacking: rawBacking(base).opener });
    return { m, img, base };
  }

  it("reads through to the backing file and copies on write", async () => {
    const { m, img, base } = await overBacking();
    expect(await readAll(img, 1000, 5000)).toEqual(base.subarray(1000, 6000));
    await img.write(64 * K + 4096, pattern(4096, 0xee));
    const b = await readAll(img, 64 * K, 64 * K);
    const want = base.slice(64 * K, 128 * K);
    want.fill(0xee, 4096, 8192);
    expect(b).toEqual(want);
    // Backing images never set need-check (QEMU flushes before table updates instead).
    expect(img.needCheck).toBe(false);
    expect(decodeQedHeader(m.snapshot()).features & 2n).toBe(0n);
    expect(await img.blockStatus(0, 2 * M)).toMatchObject({
      offset: 0,
      length: 64 * K,
      depth: 1,
      present: true,
      data: true,
      hostOffset: 0,
    });
    expect(await img.blockStatus(64 * K, 2 * M - 64 * K)).toMatchObject({
      length: 64 * K,
      depth: 0,
      data: true,
    });
  });

  it("reads zeros past a shorter backing file", async () => {
    const { img, base } = await overBacking(M + 512, 2 * M);
    const b = await readAll(img, M - 512, 2048);
    expect(b.subarray(0, 1024)).toEqual(base.subarray(M - 512, M + 512));
    expect(b.subarray(1024)).toEqual(new Uint8Array(1024));
    await img.write(M + 100, pattern(10, 4));
    const c = await readAll(img, M, 64 * K);
    expect(c.subarray(0, 100)).toEqual(base.subarray(M, M + 100));
    expect(c.subarray(512)).toEqual(new Uint8Array(64 * K - 512));
    expect(await img.blockStatus(M + 64 * K, 64 * K)).toEqual({
      offset: M + 64 * K,
      length: 64 * K,
      present: false,
      zero: true,
      data: false,
      depth: 0,
    });
  });

  it("zero clusters hide the backing file, also after a partial write", async () => {
    const { img, base } = await overBacking();
    await img.writeZeroes(0, 64 * K);
    expect(await readAll(img, 0, 64 * K)).toEqual(new Uint8Array(64 * K));
    await img.write(0, pattern(4096, 0xbb));
    const b = await readAll(img, 0, 64 * K);
    expect(b.subarray(0, 4096)).toEqual(pattern(4096, 0xbb));
    expect(b.subarray(4096)).toEqual(new Uint8Array(60 * K)); // QEMU 7.2 shows backing data here
    expect(await readAll(img, 64 * K, 100)).toEqual(base.subarray(64 * K, 64 * K + 100));
  });

  it("fails reads of unallocated ranges when the backing file was not opened", async () => {
    const m = new MemoryBackend();
    await createQed(m, { size: M, backingFile: "base.raw" });
    const img = await openQed(m);
    await expect(img.read(0, new Uint8Array(10))).rejects.toThrow(
      /backing file "base.raw" but it was not opened/,
    );
  });
});

describe("corruption handling", () => {
  it("refuses to follow an L2 entry past the end of the file, and check repairs it", async () => {
    const made = await fresh();
    const img = made.img;
    let m = made.m;
    await img.write(0, pattern(64 * K, 1));
    await img.write(64 * K, pattern(64 * K, 2));
    await img.close();
    const bytes = m.snapshot();
    const h = decodeQedHeader(bytes);
    m = new MemoryBackend();
    const l1 = new QedTable(bytes.subarray(h.l1TableOffset, h.l1TableOffset + 8));
    const l2off = l1.get(0);
    const l2 = new QedTable(bytes.subarray(l2off, l2off + 16));
    l2.set(1, 100 * M);
    await m.write(0, bytes);
    const ro = await openQed(m, { readOnly: true });
    await expect(ro.read(64 * K, new Uint8Array(10))).rejects.toBeInstanceOf(CorruptImageError);
    const r = await ro.check();
    expect(r).toMatchObject({ corruptions: 1, corruptionsFixed: 0, leaks: 1 });
    expect(r.problems[0]?.message).toMatch(/entry 1 points to a data cluster at 0x6400000/);
    // Mark need-check: a read-write open repairs.
    await m.write(0, encodeQedHeader({ ...h, features: 2n }));
    const rw = await openQed(m, { readOnly: false });
    expect(rw.needCheck).toBe(false);
    expect(await readAll(rw, 64 * K, 10)).toEqual(new Uint8Array(10));
    expect(await readAll(rw, 0, 10)).toEqual(pattern(10, 1));
    expect(await rw.check()).toMatchObject({ corruptions: 0, leaks: 1 });
  });
});

describe("overlapping requests in flight", () => {
  it("take effect in the order they were issued (a later write never lands under an earlier one)", async () => {
    const { img } = await fresh(4 * M, { clusterSize: 4 * K });
    // Cluster 0 allocated, cluster 1 not: A spans both (an in-place run, then an allocation);
    // B, issued after A, covers cluster 1 only and could otherwise allocate it first.
    await img.write(0, new Uint8Array(4 * K).fill(1));
    const a = img.write(0, new Uint8Array(8 * K).fill(0xaa));
    const b = img.write(4 * K, new Uint8Array(4 * K).fill(0xbb));
    const z = img.writeZeroes(6 * K, 2 * K); // issued last: zeros win over B there
    await Promise.all([a, b, z]);
    const got = await readAll(img, 0, 8 * K);
    const want = new Uint8Array(8 * K).fill(0xaa);
    want.fill(0xbb, 4 * K, 8 * K);
    want.fill(0, 6 * K, 8 * K);
    expect(firstDiff(got, want)).toBe(-1);
    await img.close();
  });

  it("a random mix of concurrent overlapping writes matches a model applied in issue order", async () => {
    const seed = Number(process.env.QIMG_SEED ?? 97531) >>> 0;
    const rnd = prng(seed);
    const size = 1 * M;
    const { img } = await fresh(size, { clusterSize: 4 * K });
    const model = new Uint8Array(size);
    for (let round = 0; round < 20; round++) {
      const pending: Promise<void>[] = [];
      for (let i = 0; i < 16; i++) {
        const off = Math.floor(rnd() * (size - 64 * K));
        const len = 1 + Math.floor(rnd() * 40 * K);
        const p = 1 + Math.floor(rnd() * 255);
        if (rnd() < 0.8) {
          pending.push(img.write(off, new Uint8Array(len).fill(p)));
          model.fill(p, off, off + len);
        } else {
          pending.push(img.writeZeroes(off, len));
          model.fill(0, off, off + len);
        }
      }
      await Promise.all(pending);
    }
    expect(firstDiff(await readAll(img, 0, size), model), `seed ${seed}`).toBe(-1);
    await img.close();
  });
});

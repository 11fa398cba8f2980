import { describe, expect, it } from "vitest";
import { MemoryBackend } from "@qimg/io";
import { createQcow2, openQcow2 } from "../src/index.js";
import type { Qcow2CreateOptions } from "../src/index.js";
import { consistency } from "./consistency.js";
import { prng } from "./prng.js";

const LONG = process.env.QIMG_LONG === "1";

const CONFIGS: [string, Qcow2CreateOptions][] = [
  ["64k", { size: 8 << 20 }],
  ["4k", { size: 4 << 20, clusterSize: 4096 }],
  ["512-rb1", { size: 1 << 20, clusterSize: 512, refcountBits: 1 }],
  ["extl2-lazy", { size: 8 << 20, extendedL2: true, lazyRefcounts: true }],
];

describe("64 requests in flight", () => {
  it.each(CONFIGS)(
    "%s: overlapping and unrelated requests match a sequential model",
    async (name, cfg) => {
      const rounds = LONG ? 200 : 12;
      const seed = Number(process.env.QIMG_SEED ?? 4242) + name.length;
      const r = prng(seed);
      const mem = new MemoryBackend();
      await createQcow2(mem, cfg);
      const image = await openQcow2(mem, { readOnly: false });
      const size = image.virtualSize;
      const cs = image.clusterSize;
      const model = new Uint8Array(size);
      for (let round = 0; round < rounds; round++) {
        const pending: Promise<void>[] = [];
        for (let k = 0; k < 64; k++) {
          // Cluster the requests in a small area half of the time so many overlap.
          const area = r() < 0.5 ? Math.min(size, 8 * cs) : size;
          const off = Math.floor(r() * area);
          const len = Math.min(size - off, 1 + Math.floor(r() * (r() < 0.5 ? 2 * cs : 4096)));
          const x = r();
          if (x < 0.75) {
            const d = new Uint8Array(len).fill(((round * 64 + k) % 251) + 1);
            pending.push(image.write(off, d));
            model.set(d, off);
          } else if (x < 0.9) {
            pending.push(image.writeZeroes(off, len, { mayUnmap: x < 0.85 }));
            model.fill(0, off, off + len);
          } else {
            pending.push(image.discard(off, len));
            const a = Math.ceil(off / cs) * cs;
            const e = off + len === size ? size : Math.floor((off + len) / cs) * cs;
            if (e > a) model.fill(0, a, e);
          }
        }
        if (r() < 0.3) pending.push(image.flush());
        await Promise.all(pending);
      }
      const back = new Uint8Array(size);
      await image.read(0, back);
      const bad = back.findIndex((b, i) => b !== model[i]);
      expect(bad, `seed ${seed}: first difference at byte ${bad}`).toBe(-1);
      await image.close();
      const c = await consistency(MemoryBackend.from(mem.bytes()));
      expect(
        c.corruptions,
        `seed ${seed}: a cluster was referenced more often than counted`,
      ).toEqual([]);
      expect(c.leaks, `seed ${seed}: leaks after a clean close`).toBe(0);
    },
    120_000,
  );
});

describe("concurrent reads", () => {
  it("return the right bytes when many are in flight (no shared scratch state)", async () => {
    const mem = new MemoryBackend();
    await createQcow2(mem, { size: 8 << 20, clusterSize: 4096 });
    const image = await openQcow2(mem, { readOnly: false, l2CacheBytes: 4096 * 4 });
    const model = new Uint8Array(8 << 20);
    const r = prng(77);
    for (let i = 0; i < 300; i++) {
      const off = Math.floor(r() * (model.length - 70000));
      const d = new Uint8Array(1 + Math.floor(r() * 65536)).fill(1 + (i % 250));
      await image.write(off, d);
      model.set(d, off);
    }
    // A tiny L2 cache forces misses, so reads suspend inside the lookup and interleave.
    const reads = Array.from({ length: 64 }, (_, k) => {
      const off = Math.floor(r() * (model.length - 300000));
      const buf = new Uint8Array(1 + Math.floor(r() * 300000));
      return image.read(off, buf).then(() => ({ off, buf, k }));
    });
    for (const { off, buf, k } of await Promise.all(reads)) {
      const bad = buf.findIndex((b, i) => b !== model[off + i]);
      expect(bad, `read ${k} at ${off}`).toBe(-1);
    }
    await image.close();
  });
});

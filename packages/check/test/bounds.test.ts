import { describe, expect, it } from "vitest";
import { MemoryBackend } from "@qimg/io";
import { createQcow2, openQcow2 } from "@qimg/qcow2";
import { checkQcow2 } from "../src/index.js";

describe("bounded memory", () => {
  it("checks a sparse 1 TiB image without allocating per virtual cluster", async () => {
    const mem = new MemoryBackend();
    await createQcow2(mem, { size: 2 ** 40 });
    const image = await openQcow2(mem, { readOnly: false });
    // A few clusters spread over the whole disk: 16 Mi virtual clusters, a handful allocated.
    for (let i = 0; i < 16; i++)
      await image.write(i * 2 ** 36 + 12345, new Uint8Array(4096).fill(i + 1));
    await image.close();
    const bytes = mem.bytes();
    global.gc?.();
    const before = process.memoryUsage().rss;
    const t = performance.now();
    const r = await checkQcow2(MemoryBackend.from(bytes));
    const grown = process.memoryUsage().rss - before;
    expect(r.corruptions).toBe(0);
    expect(r.leaks).toBe(0);
    expect(r.totalClusters).toBe(2 ** 24);
    expect(r.allocatedClusters).toBe(16);
    // Counting per virtual cluster would need 16 Mi entries; per host cluster it is tiny.
    expect(grown).toBeLessThan(128 * 1024 * 1024);
    expect(performance.now() - t).toBeLessThan(10_000);
  });
});

describe("a million clusters", () => {
  it("checks a fully written image of 2^20 clusters within a few hundred MiB", async () => {
    const mem = new MemoryBackend();
    // 4 KiB clusters: 4 GiB would be a million; 512-byte clusters keep the file at 512 MiB.
    await createQcow2(mem, { size: 2 ** 29, clusterSize: 512 });
    const image = await openQcow2(mem, { readOnly: false });
    const chunk = new Uint8Array(4 << 20).fill(0x5a);
    for (let off = 0; off < 2 ** 29; off += chunk.length) await image.write(off, chunk);
    await image.close();
    const backend = MemoryBackend.from(mem.bytes());
    const before = process.memoryUsage().rss;
    const r = await checkQcow2(backend);
    const grown = process.memoryUsage().rss - before;
    expect(r.corruptions).toBe(0);
    expect(r.leaks).toBe(0);
    expect(r.allocatedClusters).toBe(2 ** 20);
    expect(grown).toBeLessThan(300 * 1024 * 1024);
  }, 120_000);
});

describe("references far past the end of the file", () => {
  it("a dirty lazy-refcounts image whose entries point ~2^50 bytes away is repaired within bounded memory", async () => {
    const mem = new MemoryBackend();
    await createQcow2(mem, { size: 64 * 1024 * 1024 + 512, clusterSize: 512, lazyRefcounts: true });
    const image = await openQcow2(mem, { readOnly: false });
    await image.write(12345, new Uint8Array(300_000).fill(0x5a));
    await image.close();
    const bytes = mem.bytes();
    const dv = new DataView(bytes.buffer, bytes.byteOffset);
    const l1 = Number(dv.getBigUint64(40, false));
    const rt = Number(dv.getBigUint64(48, false));
    const l2 = Number(dv.getBigUint64(l1, false) & 0x00ff_ffff_ffff_fe00n);
    const far = 2n ** 50n;
    // One changed entry each: a data cluster, a compressed cluster, a refcount block, all ~1 PiB away.
    dv.setBigUint64(l2 + 8 * 40, 0x8000_0000_0000_0000n | far, false);
    dv.setBigUint64(l2 + 8 * 41, (1n << 62n) | ((far >> 9n) << 9n), false);
    dv.setBigUint64(rt + 8 * 5, far, false);
    dv.setBigUint64(72, dv.getBigUint64(72, false) | 1n, false); // dirty
    for (const repair of ["leaks", "all"] as const) {
      global.gc?.();
      const before = process.memoryUsage().arrayBuffers;
      let peak = before;
      const timer = setInterval(() => {
        peak = Math.max(peak, process.memoryUsage().arrayBuffers);
      }, 1);
      const t = performance.now();
      const r = await checkQcow2(MemoryBackend.from(bytes.slice()), { repair });
      clearInterval(timer);
      peak = Math.max(peak, process.memoryUsage().arrayBuffers);
      expect(r.failure === undefined || repair === "leaks").toBe(true);
      if (repair === "all") expect(r.corruptions).toBe(0);
      // The file is under 1 MiB; a count per referenced cluster would need terabytes.
      expect(peak - before).toBeLessThan(64 * 1024 * 1024);
      expect(performance.now() - t).toBeLessThan(10_000);
    }
  });
});

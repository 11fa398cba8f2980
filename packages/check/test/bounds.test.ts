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

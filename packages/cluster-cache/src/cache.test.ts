import { describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend } from "@qimg/io";
import type { BlockBackend } from "@qimg/io";
import { ClusterCache } from "./cache.js";

/** Wraps a backend and records every write and flush in order. */
function traced(inner: BlockBackend): { backend: BlockBackend; log: string[] } {
  const log: string[] = [];
  const backend: BlockBackend = {
    get readOnly() {
      return inner.readOnly;
    },
    kind: inner.kind,
    name: inner.name,
    read: (o, b, opt) => inner.read(o, b, opt),
    write: async (o, d) => {
      log.push(`write ${o}`);
      await inner.write(o, d);
    },
    flush: async () => {
      log.push("flush");
      await inner.flush();
    },
    size: () => inner.size(),
    truncate: (s) => inner.truncate(s),
    close: () => inner.close(),
  };
  return { backend, log };
}

function memWithPattern(size: number): MemoryBackend {
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i++) bytes[i] = (i >> 9) & 0xff;
  return MemoryBackend.from(bytes);
}

describe("ClusterCache", () => {
  it("reads a table once and serves hits from memory", async () => {
    const mem = memWithPattern(8192);
    const c = new ClusterCache({ backend: mem, tableSize: 512, capacity: 4, name: "L2" });
    const t = await c.get(1024);
    expect(t.bytes[0]).toBe(2);
    c.release(t);
    const again = await c.get(1024);
    expect(again).toBe(t);
    c.release(again);
    expect(c.peek(1024)).toBe(t);
    expect(c.stats).toMatchObject({ hits: 2, misses: 1 });
  });

  it("shares one read between concurrent loads of the same table", async () => {
    const { backend } = traced(memWithPattern(4096));
    let reads = 0;
    const counting: BlockBackend = {
      ...backend,
      read: (o, b, opt) => (reads++, backend.read(o, b, opt)),
    };
    const c = new ClusterCache({ backend: counting, tableSize: 512, capacity: 4 });
    const [a, b] = await Promise.all([c.get(512), c.get(512)]);
    expect(a).toBe(b);
    expect(reads).toBe(1);
  });

  it("evicts the least recently used unpinned table and never a pinned one", async () => {
    const c = new ClusterCache({ backend: memWithPattern(8192), tableSize: 512, capacity: 2 });
    const a = await c.get(0);
    const b = await c.get(512);
    c.release(b);
    const d = await c.get(1024); // a is pinned, so b goes
    expect(c.peek(0)).toBe(a);
    expect(c.peek(512)).toBeUndefined();
    c.release(a);
    c.release(d);
    expect(c.size).toBe(2);
    expect(c.stats.evictions).toBe(1);
  });

  it("writes back dirty tables on eviction and on flush", async () => {
    const mem = MemoryBackend.from(new Uint8Array(4096));
    const c = new ClusterCache({ backend: mem, tableSize: 512, capacity: 1 });
    const t = await c.getEmpty(512);
    t.bytes.fill(7);
    await c.markDirty(t);
    c.release(t);
    const probe = new Uint8Array(512);
    await mem.read(512, probe);
    expect(probe[0]).toBe(0); // writeback: not yet on disk
    const u = await c.get(1024); // evicts the dirty table
    await mem.read(512, probe);
    expect(probe.every((x) => x === 7)).toBe(true);
    u.bytes[0] = 9;
    await c.markDirty(u);
    c.release(u);
    await c.flush();
    await mem.read(1024, probe);
    expect(probe[0]).toBe(9);
    expect(c.dirtyCount).toBe(0);
  });

  it("writethrough writes each change at once", async () => {
    const mem = MemoryBackend.from(new Uint8Array(2048));
    const c = new ClusterCache({ backend: mem, tableSize: 512, capacity: 4, writethrough: true });
    const t = await c.get(0);
    t.bytes[5] = 1;
    await c.markDirty(t);
    const probe = new Uint8Array(512);
    await mem.read(0, probe);
    expect(probe[5]).toBe(1);
  });

  it("flushes the refcount cache and syncs before writing any L2 table", async () => {
    const { backend, log } = traced(MemoryBackend.from(new Uint8Array(8192)));
    const refcounts = new ClusterCache({ backend, tableSize: 512, capacity: 4, name: "refcount" });
    const l2 = new ClusterCache({ backend, tableSize: 512, capacity: 4, name: "L2" });
    l2.dependOn(refcounts);
    const r = await refcounts.get(4096);
    const t = await l2.get(1024);
    t.bytes[0] = 1;
    await l2.markDirty(t);
    r.bytes[0] = 1;
    await refcounts.markDirty(r);
    await l2.flush();
    expect(log).toEqual(["write 4096", "flush", "write 1024", "flush"]);
  });

  it("refuses dependency cycles", () => {
    const m = new MemoryBackend();
    const a = new ClusterCache({ backend: m, tableSize: 512, capacity: 1, name: "a" });
    const b = new ClusterCache({ backend: m, tableSize: 512, capacity: 1, name: "b" });
    a.dependOn(b);
    expect(() => b.dependOn(a)).toThrow(/cycle/);
  });

  it("keeps the ordering invariant across a power loss", async () => {
    // Refcount block at 4096, L2 table at 1024. Power is lost after the Nth write/flush:
    // whatever survives, an L2 entry on disk implies its refcount is on disk too.
    for (let failAfter = 0; failAfter <= 4; failAfter++) {
      let ops = 0;
      const fault = await FaultBackend.wrap(MemoryBackend.from(new Uint8Array(8192)), {
        failWhen: (op) => (op === "write" || op === "flush") && ++ops > failAfter,
      });
      const refcounts = new ClusterCache({
        backend: fault,
        tableSize: 512,
        capacity: 4,
        name: "refcount",
      });
      const l2 = new ClusterCache({ backend: fault, tableSize: 512, capacity: 4, name: "L2" });
      l2.dependOn(refcounts);
      const r = await refcounts.get(4096);
      r.bytes[0] = 1;
      await refcounts.markDirty(r);
      const t = await l2.get(1024);
      t.bytes[0] = 1;
      await l2.markDirty(t);
      const flushed = await l2.flush().then(
        () => true,
        () => false,
      );
      expect(flushed).toBe(failAfter >= 4);
      {
        const survivor = fault.powerLoss({ tearLastWrite: failAfter % 2 === 1, seed: failAfter });
        const b = new Uint8Array(1);
        await survivor.read(1024, b);
        const l2Entry = b[0];
        await survivor.read(4096, b);
        if (l2Entry === 1) expect(b[0]).toBe(1);
        if (flushed) expect(l2Entry).toBe(1);
      }
    }
  });
});

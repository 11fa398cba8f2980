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
  describe("dependOnFlush (QEMU's qcow2_cache_depends_on_flush)", () => {
    it("syncs the file before the next table write at flush, once, and only when asked", async () => {
      const { backend, log } = traced(MemoryBackend.from(new Uint8Array(8192)));
      const l2 = new ClusterCache({ backend, tableSize: 512, capacity: 4, name: "L2" });
      // Copy-on-write data went to 4096 without a sync; the L2 entry pointing at it follows.
      await backend.write(4096, new Uint8Array(512).fill(3));
      l2.dependOnFlush();
      l2.dependOnFlush(); // one sync however often it is asked for
      expect(l2.dependsOnFlush).toBe(true);
      const t = await l2.get(1024);
      t.bytes[0] = 1;
      await l2.markDirty(t);
      l2.release(t);
      await l2.flush();
      expect(log).toEqual(["write 4096", "flush", "write 1024", "flush"]);
      expect(l2.dependsOnFlush).toBe(false);
      // One-shot: the next flush does not sync first again.
      log.length = 0;
      t.bytes[0] = 2;
      await l2.markDirty(t);
      await l2.flush();
      expect(log).toEqual(["write 1024", "flush"]);
    });

    it("syncs before an evicted dirty table is written", async () => {
      const { backend, log } = traced(MemoryBackend.from(new Uint8Array(8192)));
      const l2 = new ClusterCache({ backend, tableSize: 512, capacity: 1, name: "L2" });
      const t = await l2.get(1024);
      t.bytes[0] = 1;
      await backend.write(4096, new Uint8Array(512).fill(3));
      l2.dependOnFlush();
      await l2.markDirty(t);
      l2.release(t);
      const u = await l2.get(2048); // evicts the dirty table at 1024
      l2.release(u);
      expect(log).toEqual(["write 4096", "flush", "write 1024"]);
    });

    it("also holds with a cache dependency (the dependency flushed first), and in writethrough", async () => {
      const { backend, log } = traced(MemoryBackend.from(new Uint8Array(8192)));
      const refcounts = new ClusterCache({ backend, tableSize: 512, capacity: 4, name: "rc" });
      const l2 = new ClusterCache({ backend, tableSize: 512, capacity: 4, name: "L2" });
      l2.dependOn(refcounts);
      l2.writethrough = true;
      const t = await l2.get(1024);
      await backend.write(4096, new Uint8Array(512).fill(3));
      l2.dependOnFlush();
      t.bytes[0] = 1;
      await l2.markDirty(t); // writethrough: written at once, after a sync
      expect(log).toEqual(["write 4096", "flush", "write 1024", "flush"]);
    });

    it("a sync that began after the request settles it: no second sync (as QEMU)", async () => {
      const { backend, log } = traced(MemoryBackend.from(new Uint8Array(8192)));
      const refcounts = new ClusterCache({ backend, tableSize: 512, capacity: 4, name: "rc" });
      const l2 = new ClusterCache({ backend, tableSize: 512, capacity: 4, name: "L2" });
      l2.dependOn(refcounts);
      const r = await refcounts.get(4096);
      await backend.write(6144, new Uint8Array(512).fill(3)); // the data
      l2.dependOnFlush();
      const t = await l2.get(1024);
      t.bytes[0] = 1;
      await l2.markDirty(t);
      r.bytes[0] = 1;
      await refcounts.markDirty(r);
      // The refcount flush's sync covers the data too: the L2 table follows it directly.
      await l2.flush();
      expect(log).toEqual(["write 6144", "write 4096", "flush", "write 1024", "flush"]);
      // So does the cache's own flush with nothing to write.
      l2.dependOnFlush();
      await l2.flush();
      expect(l2.dependsOnFlush).toBe(false);
    });

    it("a sync already under way when the data was written does not settle it", async () => {
      const mem = MemoryBackend.from(new Uint8Array(8192));
      const { backend: inner, log } = traced(mem);
      let release: (() => void) | undefined;
      const gated: BlockBackend = {
        ...inner,
        flush: async () => {
          if (release === undefined) {
            await new Promise<void>((ok) => (release = ok));
          }
          await inner.flush();
        },
      };
      const l2 = new ClusterCache({ backend: gated, tableSize: 512, capacity: 4, name: "L2" });
      const early = l2.flush(); // a sync starts (nothing dirty), and waits
      await new Promise((ok) => setTimeout(ok, 1));
      await gated.write(4096, new Uint8Array(512).fill(3)); // data written during it
      l2.dependOnFlush();
      release!();
      await early;
      expect(l2.dependsOnFlush).toBe(true);
      const t = await l2.get(1024);
      t.bytes[0] = 1;
      await l2.markDirty(t);
      await l2.flush();
      // (The log shows a sync when it reaches the file: the early one after the data write.)
      expect(log).toEqual(["write 4096", "flush", "flush", "write 1024", "flush"]);
    });

    it("syncs a different file when told (an external data file)", async () => {
      const data = traced(MemoryBackend.from(new Uint8Array(8192)));
      const meta = traced(MemoryBackend.from(new Uint8Array(8192)));
      const l2 = new ClusterCache({ backend: meta.backend, tableSize: 512, capacity: 4 });
      await data.backend.write(0, new Uint8Array(512).fill(3));
      l2.dependOnFlush(data.backend);
      const t = await l2.get(1024);
      t.bytes[0] = 1;
      await l2.markDirty(t);
      await l2.flush();
      expect(data.log).toEqual(["write 0", "flush"]);
      expect(meta.log).toEqual(["write 1024", "flush"]);
    });

    it("keeps the sync owed when it fails, and never writes the table before it", async () => {
      const mem = MemoryBackend.from(new Uint8Array(8192));
      const fault = await FaultBackend.wrap(mem, { failOn: { flush: 1 } });
      const l2 = new ClusterCache({ backend: fault, tableSize: 512, capacity: 4, name: "L2" });
      await fault.write(4096, new Uint8Array(512).fill(3));
      l2.dependOnFlush();
      const t = await l2.get(1024);
      t.bytes[0] = 1;
      await l2.markDirty(t);
      await expect(l2.flush()).rejects.toThrow(/injected flush/);
      expect(fault.writes).toBe(1); // the table was not written
      expect(l2.dependsOnFlush).toBe(true);
      await l2.flush();
      expect(fault.flushes).toBe(3); // the owed sync, then the flush's own
      const survivor = fault.powerLoss();
      const b = new Uint8Array(1);
      await survivor.read(1024, b);
      expect(b[0]).toBe(1);
    });

    it("after a power loss at any point, an L2 entry on disk implies its data is on disk", async () => {
      for (let failAfter = 0; failAfter <= 4; failAfter++) {
        for (const tear of [false, true]) {
          let ops = 0;
          const fault = await FaultBackend.wrap(MemoryBackend.from(new Uint8Array(8192)), {
            failWhen: (op) => (op === "write" || op === "flush") && ++ops > failAfter,
          });
          const l2 = new ClusterCache({ backend: fault, tableSize: 512, capacity: 1, name: "L2" });
          const written = await (async () => {
            await fault.write(4096, new Uint8Array(512).fill(3)); // the data
            l2.dependOnFlush();
            const t = await l2.get(1024);
            t.bytes[0] = 1; // the entry that points at it
            await l2.markDirty(t);
            l2.release(t);
            l2.release(await l2.get(2048)); // eviction writes the entry
            await l2.flush();
          })().then(
            () => true,
            () => false,
          );
          const survivor = fault.powerLoss({ tearLastWrite: tear, seed: failAfter });
          const b = new Uint8Array(1);
          await survivor.read(1024, b);
          const entry = b[0];
          await survivor.read(4096, b);
          const label = `crash after ${failAfter} ops (tear ${tear})`;
          if (entry === 1) expect(b[0], label).toBe(3);
          if (written) expect(entry, label).toBe(1);
        }
      }
    });
  });
});

import { describe, expect, it } from "vitest";
import { ErrorCode } from "@qimg/structs";
import { FaultBackend } from "./fault.js";
import type { FaultOp } from "./fault.js";
import { MemoryBackend } from "./memory.js";
import { backendContract, rejectsWith } from "./contract.testkit.js";

backendContract("FaultBackend(MemoryBackend) without faults", {
  empty: () => FaultBackend.wrap(new MemoryBackend()),
  readOnlyWith: (bytes) => FaultBackend.wrap(MemoryBackend.from(bytes, { readOnly: true })),
});

const fill = (n: number, v: number): Uint8Array => new Uint8Array(n).fill(v);
/** True when every byte of `b` is `v` (fast; toEqual on large arrays is slow). */
const all = (b: Uint8Array, v: number): boolean => b.every((x) => x === v);

describe("FaultBackend: injected failures", () => {
  it("fails exactly the Nth read; earlier and later reads succeed", async () => {
    const f = await FaultBackend.wrap(MemoryBackend.from(fill(64, 1)), { failOn: { read: 2 } });
    const buf = new Uint8Array(8);
    await f.read(0, buf);
    const e = await rejectsWith(f.read(8, buf), ErrorCode.IO);
    expect(e.message).toMatch(/injected read failure/);
    expect(e.message).toMatch(/read #2/);
    await f.read(16, buf);
    await f.read(24, buf);
    expect(f.reads).toBe(4);
    expect(f.counters.injected).toBe(1);
  });

  it("fails exactly the Nth write, which then has no effect; later writes land", async () => {
    const inner = new MemoryBackend();
    const f = await FaultBackend.wrap(inner, { failOn: { write: 3 } });
    await f.write(0, fill(1, 1));
    await f.write(1, fill(1, 2));
    await rejectsWith(f.write(2, fill(1, 3)), ErrorCode.IO);
    await f.write(3, fill(1, 4));
    expect([...inner.snapshot()]).toEqual([1, 2, 0, 4]);
    expect(f.writes).toBe(4);
  });

  it("fails the Nth flush (listed occurrences), later flushes succeed", async () => {
    const f = await FaultBackend.wrap(new MemoryBackend(), { failOn: { flush: [1, 3] } });
    const e = await rejectsWith(f.flush(), ErrorCode.IO);
    expect(e.message).toMatch(/injected flush failure/);
    await f.flush();
    await rejectsWith(f.flush(), ErrorCode.IO);
    await f.flush();
    expect(f.flushes).toBe(4);
  });

  it("failOn() adds occurrences at runtime; clearFaults() removes them", async () => {
    const f = await FaultBackend.wrap(new MemoryBackend());
    f.failOn("write", 2);
    await f.write(0, fill(1, 1));
    await rejectsWith(f.write(0, fill(1, 1)), ErrorCode.IO);
    f.failOn("write", 3).clearFaults();
    await f.write(0, fill(1, 1));
    expect(() => f.failOn("read", 0)).toThrow(/>= 1/);
  });

  it("failWhen predicate sees op, offset, length and the per-op count", async () => {
    const seen: [FaultOp, number, number, number][] = [];
    const f = await FaultBackend.wrap(new MemoryBackend(), {
      failWhen: (op, offset, length, count) => {
        seen.push([op, offset, length, count]);
        return op === "write" && offset >= 4096;
      },
    });
    await f.write(0, fill(10, 1));
    await rejectsWith(f.write(4096, fill(10, 1)), ErrorCode.IO);
    await f.write(100, fill(5, 1));
    await f.flush();
    await f.read(0, new Uint8Array(3));
    await f.truncate(50);
    expect(seen).toEqual([
      ["write", 0, 10, 1],
      ["write", 4096, 10, 2],
      ["write", 100, 5, 3],
      ["flush", 0, 0, 1],
      ["read", 0, 3, 1],
      ["truncate", 50, 0, 1],
    ]);
    f.failWhen(undefined);
    await f.write(4096, fill(1, 1));
  });

  it("forwards kind, name and readOnly of the inner backend", async () => {
    const f = await FaultBackend.wrap(new MemoryBackend({ name: "inner", readOnly: true }));
    expect(f.kind).toBe("memory");
    expect(f.name).toBe("inner");
    expect(f.readOnly).toBe(true);
  });
});

describe("FaultBackend: power loss", () => {
  it("keeps flushed writes and discards unflushed ones", async () => {
    const inner = MemoryBackend.from(fill(1024, 0xee));
    const f = await FaultBackend.wrap(inner);
    await f.write(0, fill(100, 1)); // flushed below
    await f.flush();
    await f.write(100, fill(100, 2)); // lost
    await f.write(2000, fill(10, 3)); // lost, and so is the growth it caused
    expect(f.pendingCount).toBe(2);
    const after = f.powerLoss();
    const bytes = after.snapshot();
    expect(bytes.length).toBe(1024);
    expect(bytes.subarray(0, 100)).toEqual(fill(100, 1));
    expect(bytes.subarray(100, 1024)).toEqual(fill(924, 0xee));
    expect(f.lastPowerLoss?.discarded).toBe(2);
    expect(f.lastPowerLoss?.torn).toBeUndefined();
    // the inner backend still has everything (the page cache view)
    expect(inner.length).toBe(2010);
  });

  it("the state at wrap time counts as durable", async () => {
    const f = await FaultBackend.wrap(MemoryBackend.from(new Uint8Array([9, 8, 7])));
    await f.write(0, new Uint8Array([1]));
    expect([...f.powerLoss().snapshot()]).toEqual([9, 8, 7]);
  });

  it("unflushed truncates are lost; flushed ones stick", async () => {
    const f = await FaultBackend.wrap(MemoryBackend.from(fill(100, 5)));
    await f.truncate(10);
    await f.flush();
    await f.truncate(0);
    await f.write(0, fill(4, 6));
    const after = f.powerLoss();
    expect(after.snapshot()).toEqual(fill(10, 5));
  });

  it("a failed flush makes nothing durable", async () => {
    const f = await FaultBackend.wrap(new MemoryBackend(), { failOn: { flush: 1 } });
    await f.write(0, fill(8, 1));
    await rejectsWith(f.flush(), ErrorCode.IO);
    expect(f.powerLoss().snapshot().length).toBe(0);
  });

  it("refuses further I/O after power loss (but close works)", async () => {
    const f = await FaultBackend.wrap(new MemoryBackend());
    f.powerLoss();
    for (const p of [
      f.read(0, new Uint8Array(0)),
      f.write(0, fill(1, 1)),
      f.flush(),
      f.size(),
      f.truncate(0),
    ]) {
      const e = await rejectsWith(p, ErrorCode.IO);
      expect(e.message).toMatch(/power lost/);
    }
    expect(() => f.powerLoss()).toThrow(/power lost/);
    await f.close();
  });

  it("the returned backend is independent and writable", async () => {
    const f = await FaultBackend.wrap(MemoryBackend.from(fill(4, 1)));
    const a = f.powerLoss();
    await a.write(0, fill(1, 9));
    expect(a.kind).toBe("memory");
    expect([...a.snapshot()]).toEqual([9, 1, 1, 1]);
  });

  it("tearing keeps a sector-aligned prefix, never more than the write", async () => {
    const base = fill(8192, 0xaa);
    const ends = new Set<number>();
    for (let seed = 0; seed < 200; seed++) {
      const f = await FaultBackend.wrap(MemoryBackend.from(base));
      await f.write(0, fill(100, 1)); // unflushed and not last: always lost
      const offset = 300; // unaligned start
      const len = 2000; // ends at 2300, unaligned
      await f.write(offset, fill(len, 2));
      const after = f.powerLoss({ tearLastWrite: true, seed });
      const bytes = after.snapshot();
      expect(bytes.length).toBe(8192);
      expect(all(bytes.subarray(0, 100), 0xaa)).toBe(true);
      const torn = f.lastPowerLoss?.torn;
      expect(torn).toBeDefined();
      const kept = torn?.kept ?? -1;
      expect(kept).toBeGreaterThanOrEqual(0);
      expect(kept).toBeLessThanOrEqual(len);
      const end = offset + kept;
      // the cut is the write's start, its end, or an absolute sector boundary
      expect(kept === 0 || kept === len || end % 512 === 0).toBe(true);
      expect(all(bytes.subarray(100, offset), 0xaa)).toBe(true);
      expect(all(bytes.subarray(offset, end), 2)).toBe(true);
      expect(all(bytes.subarray(end), 0xaa)).toBe(true);
      ends.add(end);
    }
    // over 200 seeds every candidate cut shows up: 300, 512, 1024, 1536, 2048, 2300
    expect([...ends].sort((a, b) => a - b)).toEqual([300, 512, 1024, 1536, 2048, 2300]);
  });

  it("tearing honours sectorSize and can extend the file by at most the write", async () => {
    for (let seed = 0; seed < 50; seed++) {
      const f = await FaultBackend.wrap(new MemoryBackend());
      await f.write(0, fill(10_000, 3));
      const after = f.powerLoss({ tearLastWrite: true, sectorSize: 4096, seed });
      expect([0, 4096, 8192, 10_000]).toContain(after.length);
      expect(all(after.snapshot(), 3)).toBe(true);
    }
  });

  it("tearing is deterministic for a seed and reports the seed", async () => {
    const run = async (seed?: number): Promise<[number, number]> => {
      const f = await FaultBackend.wrap(new MemoryBackend());
      await f.write(0, fill(64 * 512, 1));
      f.powerLoss({ tearLastWrite: true, ...(seed === undefined ? {} : { seed }) });
      return [f.lastPowerLoss?.torn?.kept ?? -1, f.lastPowerLoss?.seed ?? -1];
    };
    for (const seed of [1, 42, 0xdeadbeef]) {
      expect(await run(seed)).toEqual(await run(seed));
    }
    const [kept, seed] = await run();
    expect(await run(seed)).toEqual([kept, seed]);
  });

  it("only tears when the last pending op is a write", async () => {
    const f = await FaultBackend.wrap(new MemoryBackend());
    await f.write(0, fill(4096, 1));
    await f.truncate(10);
    const after = f.powerLoss({ tearLastWrite: true, seed: 1 });
    expect(after.length).toBe(0);
    expect(f.lastPowerLoss?.torn).toBeUndefined();
  });

  it("a flush covers only writes completed before it started", async () => {
    const f = await FaultBackend.wrap(new MemoryBackend());
    await f.write(0, fill(1, 1));
    const flushing = f.flush();
    const writing = f.write(1, fill(1, 2));
    await Promise.all([flushing, writing]);
    // write #2 started before the flush settled but after it started: not durable
    expect([...f.powerLoss().snapshot()]).toEqual([1]);
  });

  it("powerLoss requires trackDurability", async () => {
    const f = await FaultBackend.wrap(new MemoryBackend(), { trackDurability: false });
    await f.write(0, fill(1, 1));
    expect(() => f.powerLoss()).toThrow(/trackDurability/);
  });
});

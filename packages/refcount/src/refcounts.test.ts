import { describe, expect, it } from "vitest";
import { ClusterCache } from "@qimg/cluster-cache";
import {
  CorruptImageError,
  ErrorCode,
  InvalidArgumentError,
  RangeFormatError,
} from "@qimg/structs";
import { Refcounts } from "./refcounts.js";
import { makeImage, openImage, prng, readHeaderTable, walk } from "./image.testkit.js";

const CB = 9; // 512-byte clusters
const CS = 512;

describe("Refcounts.open", () => {
  it("reports a bad table location with clear corruption errors", async () => {
    const backend = await makeImage(CB, 4);
    const cache = new ClusterCache({ backend, tableSize: CS, capacity: 4 });
    const base = { backend, cache, clusterBits: CB, refcountOrder: 4, tableClusters: 1 };
    await expect(Refcounts.open({ ...base, tableOffset: 0x300 })).rejects.toThrow(
      /refcount table offset 0x300 is not aligned to the cluster size 512/,
    );
    await expect(Refcounts.open({ ...base, tableOffset: 0x10000 })).rejects.toThrow(
      /refcount table at 0x10000 \(1 clusters\) extends past the end of the file \(size 0x600\)/,
    );
    await expect(Refcounts.open({ ...base, tableOffset: 0 })).rejects.toThrow(CorruptImageError);
    await expect(
      Refcounts.open({
        ...base,
        tableOffset: CS,
        cache: new ClusterCache({ backend, tableSize: 4096, capacity: 4 }),
      }),
    ).rejects.toThrow(InvalidArgumentError);
    // Corrupt the table: entry 0 gets a reserved bit.
    await backend.write(CS + 7, Uint8Array.of(0x01));
    await expect(Refcounts.open({ ...base, tableOffset: CS })).rejects.toThrow(
      /reserved bits 0-8 must be zero/,
    );
  });

  it("sees the header, table and first block of a fresh image", async () => {
    for (let order = 0; order <= 6; order++) {
      const backend = await makeImage(CB, order);
      const rc = await openImage(backend, CB, order);
      expect(rc.refcountBits).toBe(1 << order);
      expect(rc.entriesPerBlock).toBe((CS * 8) >> order);
      expect([
        await rc.get(0),
        await rc.get(1),
        await rc.get(2),
        await rc.get(3),
        await rc.get(1e6),
      ]).toEqual([1, 1, 1, 0, 0]);
    }
  });
});

describe("allocation", () => {
  it("sequential allocations land contiguously and the hint advances", async () => {
    const rc = await openImage(await makeImage(CB, 4), CB, 4);
    const a = await rc.allocate(1);
    const b = await rc.allocate(1);
    const c = await rc.allocate(3);
    const d = await rc.allocate(1);
    expect(a).toBe(3 * CS);
    expect([b - a, c - b, d - c]).toEqual([CS, CS, 3 * CS]);
    expect(rc.freeHint).toBe(d / CS + 1);
    for (let i = a / CS; i <= d / CS; i++) expect(await rc.get(i)).toBe(1);
  });

  it("is first fit: freed holes are reused, holes too small are skipped and filled later", async () => {
    const rc = await openImage(await makeImage(CB, 4), CB, 4);
    const offs: number[] = [];
    for (let i = 0; i < 10; i++) offs.push(await rc.allocate(1));
    await rc.free(offs[3]!, 2); // hole of 2 clusters
    expect(rc.freeHint).toBe(offs[3]! / CS);
    expect(await rc.get(offs[3]! / CS)).toBe(0);
    const big = await rc.allocate(3); // does not fit the hole
    expect(big).toBe(offs[9]! + CS);
    expect(await rc.allocate(2)).toBe(offs[3]); // fills it
    expect(await rc.allocate(1)).toBe(big + 3 * CS);
  });

  it("concurrent allocations get distinct clusters", async () => {
    const rc = await openImage(await makeImage(CB, 6), CB, 6);
    const offs = await Promise.all(Array.from({ length: 200 }, (_, i) => rc.allocate((i % 3) + 1)));
    const seen = new Set<number>();
    offs.forEach((o, i) => {
      for (let k = 0; k < (i % 3) + 1; k++) {
        expect(seen.has(o + k * CS)).toBe(false);
        seen.add(o + k * CS);
      }
    });
    const { counts } = await walk(rc);
    for (const o of seen) expect(counts.get(o / CS)).toBe(1);
  });

  it("allocateAt takes free clusters and refuses used ones without changing anything", async () => {
    const rc = await openImage(await makeImage(CB, 4), CB, 4);
    await rc.allocateAt(10 * CS, 2);
    expect([await rc.get(9), await rc.get(10), await rc.get(11), await rc.get(12)]).toEqual([
      0, 1, 1, 0,
    ]);
    await expect(rc.allocateAt(8 * CS, 3)).rejects.toThrow(
      /cannot allocate cluster 0x1400: it is already in use \(refcount 1\)/,
    );
    expect(await rc.get(8)).toBe(0);
    await expect(rc.allocateAt(100, 1)).rejects.toThrow(/not aligned to the cluster size 512/);
    // Far away, in a range no block describes yet: the block is created outside the range.
    await rc.allocateAt(5000 * CS, 4);
    for (let i = 5000; i < 5004; i++) expect(await rc.get(i)).toBe(1);
    const blk = rc.blockOffset(Math.floor(5000 / rc.entriesPerBlock)) / CS;
    expect(blk < 5000 || blk >= 5004).toBe(true);
  });

  it("free calls onDiscard with the ranges that reached zero", async () => {
    const calls: [number, number][] = [];
    const backend = await makeImage(CB, 4);
    const rc = await openImage(backend, CB, 4, { onDiscard: (o, l) => void calls.push([o, l]) });
    const a = await rc.allocate(6);
    await rc.update(a / CS + 2, +1); // shared cluster: survives one free
    await rc.free(a, 6, { discard: true });
    expect(calls).toEqual([
      [a, 2 * CS],
      [a + 3 * CS, 3 * CS],
    ]);
    expect(await rc.get(a / CS + 2)).toBe(1);
    await rc.free(a + 2 * CS, 1);
    expect(calls.length).toBe(2); // no discard asked
  });
});

describe("update and set", () => {
  it("width 1 cannot hold 2: a range error that suggests a wider refcount_bits", async () => {
    const rc = await openImage(await makeImage(CB, 0), CB, 0);
    const a = await rc.allocate(1);
    const err = await rc.update(a / CS, 1).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RangeFormatError);
    expect((err as RangeFormatError).code).toBe(ErrorCode.RANGE);
    expect((err as RangeFormatError).offset).toBe(a);
    expect((err as Error).message).toBe(
      `refcount of cluster 0x${a.toString(16)} would become 2, above the maximum 1 of refcount_bits=1; ` +
        `convert the image to a wider refcount width (e.g. qemu-img amend -o refcount_bits=16)`,
    );
    expect(await rc.get(a / CS)).toBe(1);
  });

  it("overflow is detected for every width, and a failing range changes nothing", async () => {
    for (let order = 0; order <= 5; order++) {
      const rc = await openImage(await makeImage(CB, order), CB, order);
      const max = 2 ** (1 << order) - 1;
      const a = (await rc.allocate(4)) / CS;
      await rc.set(a + 2, max);
      await expect(rc.update(a, 1, 4)).rejects.toThrow(
        new RegExp(
          `would become ${max + 1}, above the maximum ${max} of refcount_bits=${1 << order}`,
        ),
      );
      expect([await rc.get(a), await rc.get(a + 2)]).toEqual([1, max]);
      await expect(rc.set(a, max + 1)).rejects.toThrow(RangeFormatError);
    }
    const rc64 = await openImage(await makeImage(CB, 6), CB, 6);
    await rc64.set(20, Number.MAX_SAFE_INTEGER);
    await expect(rc64.update(20, 1)).rejects.toThrow(
      /above the maximum 9007199254740991 of refcount_bits=64/,
    );
  });

  it("underflow is a corruption error and changes nothing", async () => {
    const rc = await openImage(await makeImage(CB, 4), CB, 4);
    const a = await rc.allocate(2);
    await rc.free(a + CS, 1);
    const err = await rc.free(a, 2).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CorruptImageError);
    expect((err as Error).message).toBe(
      `refcount of cluster 0x${(a + CS).toString(16)} is 0; dropping 1 reference(s) would make it negative`,
    );
    expect(await rc.get(a / CS)).toBe(1);
    await expect(rc.update(99999, -1)).rejects.toThrow(CorruptImageError);
  });

  it("read-only refcounts refuse changes", async () => {
    const rc = await openImage(await makeImage(CB, 4), CB, 4, { readOnly: true });
    await expect(rc.allocate(1)).rejects.toMatchObject({ code: ErrorCode.READ_ONLY });
    expect(await rc.get(0)).toBe(1);
  });
});

describe("growth", () => {
  it("creates refcount blocks across a block boundary, self-consistently", async () => {
    for (const order of [4, 6]) {
      const backend = await makeImage(CB, order);
      const rc = await openImage(backend, CB, order);
      const E = rc.entriesPerBlock;
      const allocated = new Set<number>();
      while (allocated.size < 3 * E) allocated.add((await rc.allocate(1)) / CS);
      await rc.flush();
      const fresh = await openImage(backend, CB, order);
      const { counts, metadata } = await walk(fresh);
      expect(metadata.size).toBe(2 + 4); // header, table, 4 blocks
      for (const c of allocated) expect(counts.get(c)).toBe(1);
      expect(counts.size).toBe(allocated.size + metadata.size);
      // Every new block lies in the range it describes (self-describing): no gaps in use.
      expect(Math.max(...counts.keys())).toBe(counts.size - 1);
    }
  });

  it("grows the table across a table-cluster boundary for every width", async () => {
    for (let order = 0; order <= 6; order++) {
      const backend = await makeImage(CB, order);
      const moves: [number, number][] = [];
      const rc = await openImage(backend, CB, order, {
        onTableMoved: async (o, n) => {
          moves.push([o, n]);
          const { writeHeaderTable } = await import("./image.testkit.js");
          await writeHeaderTable(backend, o, n);
        },
      });
      const E = rc.entriesPerBlock;
      const span = 64 * E; // one table cluster's worth
      const first = await rc.allocate(span - 3);
      const second = await rc.allocate(10); // needs entry 64: the table grows
      expect(moves.length).toBe(1);
      expect(rc.tableClusters).toBeGreaterThanOrEqual(2);
      expect(rc.tableOffset).toBe(moves[0]![0]);
      await rc.flush();
      expect(await readHeaderTable(backend)).toEqual({
        tableOffset: rc.tableOffset,
        tableClusters: rc.tableClusters,
      });
      const fresh = await openImage(backend, CB, order);
      const { counts, metadata } = await walk(fresh);
      // The old table (cluster 1) was freed; growth itself may have reused it for a block.
      const oldReused = metadata.has(1);
      expect(await fresh.get(1)).toBe(oldReused ? 1 : 0);
      let data = 0;
      let notOne = 0;
      for (const [c, v] of counts) {
        if (v !== 1) notOne++;
        if (!metadata.has(c)) data++;
      }
      expect(notOne).toBe(0);
      expect(data).toBe(span - 3 + 10);
      expect(await fresh.get(first / CS)).toBe(1);
      expect(await fresh.get(second / CS + 9)).toBe(1);
      if (!oldReused) expect(await rc.allocate(1)).toBe(CS); // first fit finds the freed cluster
    }
  });

  it("refuses to grow the table without an onTableMoved callback", async () => {
    const backend = await makeImage(CB, 6);
    const { tableOffset, tableClusters } = await readHeaderTable(backend);
    const rc = await Refcounts.open({
      backend,
      cache: new ClusterCache({ backend, tableSize: CS, capacity: 4 }),
      clusterBits: CB,
      refcountOrder: 6,
      tableOffset,
      tableClusters,
    });
    await expect(rc.allocate(64 * 64 + 1)).rejects.toThrow(
      /is full and must grow .* no onTableMoved callback/,
    );
  });
});

describe("randomized operations against a model", () => {
  const seeds = process.env.QIMG_LONG === "1" ? 40 : 6;
  for (let k = 0; k < seeds; k++) {
    const seed = 1000 + k;
    it(`seed ${seed}`, async () => {
      const rand = prng(seed);
      const order = Math.floor(rand() * 7);
      const backend = await makeImage(CB, order);
      const rc = await openImage(backend, CB, order);
      const max = Math.min(rc.maxRefcount, 5);
      const model = new Map<number, number>();
      try {
        for (let step = 0; step < 300; step++) {
          const r = rand();
          if (r < 0.5) {
            const n = 1 + Math.floor(rand() * 40);
            const at = (await rc.allocate(n)) / CS;
            for (let i = 0; i < n; i++) {
              expect(model.has(at + i)).toBe(false);
              model.set(at + i, 1);
            }
          } else if (r < 0.8 && model.size > 0) {
            const keys = [...model.keys()];
            const c = keys[Math.floor(rand() * keys.length)]!;
            await rc.free(c * CS, 1);
            const v = model.get(c)! - 1;
            if (v === 0) model.delete(c);
            else model.set(c, v);
          } else if (model.size > 0) {
            const keys = [...model.keys()];
            const c = keys[Math.floor(rand() * keys.length)]!;
            if (model.get(c)! < max) {
              await rc.update(c, 1);
              model.set(c, model.get(c)! + 1);
            }
          }
        }
        await rc.flush();
        const fresh = await openImage(backend, CB, order);
        const { counts, metadata } = await walk(fresh);
        for (const [c, v] of model) expect(counts.get(c)).toBe(v);
        for (const [c] of counts) expect(model.has(c) || metadata.has(c)).toBe(true);
      } catch (e) {
        console.error(
          `randomized refcount test failed with seed ${seed} (refcount_order ${order})`,
        );
        throw e;
      }
    });
  }
});

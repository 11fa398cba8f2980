import { describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend } from "@qimg/io";
import { CorruptImageError, InvalidArgumentError, RangeFormatError } from "@qimg/structs";
import { countReferences, createClusterCounts, rebuildRefcounts } from "./rebuild.js";
import {
  makeImage,
  openImage,
  prng,
  readHeaderTable,
  walk,
  writeHeaderTable,
} from "./image.testkit.js";

const CB = 9;
const CS = 512;

async function imageOf(clusters: number): Promise<MemoryBackend> {
  const backend = new MemoryBackend();
  await backend.truncate(clusters * CS);
  return backend;
}

describe("rebuildRefcounts", () => {
  it("produces exactly the given counts, plus 1 for its own table and blocks, for every width", async () => {
    for (let order = 0; order <= 6; order++) {
      const rand = prng(77 + order);
      const N = 3000;
      const max = Math.min(2 ** (1 << order) - 1, 1000);
      const counts = createClusterCounts(1 << order, N);
      for (let c = 0; c < N; c++) if (rand() < 0.4) counts[c] = 1 + Math.floor(rand() * max);
      counts[0] = 1; // the header
      counts.fill(0, 1024, 2048); // whole refcount blocks with nothing in use are not written
      const backend = await imageOf(N);
      const res = await rebuildRefcounts({
        backend,
        clusterBits: CB,
        refcountOrder: order,
        counts,
        onTableMoved: (o, n) => writeHeaderTable(backend, o, n),
      });
      expect(res.tableOffset).toBe(N * CS); // right after the data
      expect(res.areaClusters).toBe(res.tableClusters + res.blockCount);
      const rc = await openImage(backend, CB, order);
      const { metadata } = await walk(rc);
      if (rc.entriesPerBlock <= 1024) expect(rc.blockOffset(1024 / rc.entriesPerBlock)).toBe(0);
      const got = new Float64Array(N + res.areaClusters + 10);
      await rc.readRange(0, got);
      for (let c = 0; c < N; c++)
        if (got[c] !== counts[c])
          expect.fail(`order ${order} cluster ${c}: ${got[c]} != ${counts[c]}`);
      for (let c = N; c < N + res.areaClusters; c++) expect(got[c]).toBe(1);
      expect(got[N + res.areaClusters]).toBe(0);
      expect(metadata.size - 2 - res.tableClusters + 1).toBe(res.blockCount); // header + table clusters + blocks
    }
  });

  it("counts references from a sync or async iterable of [hostOffset, clusterCount]", async () => {
    const refs: [number, number][] = [
      [0, 1],
      [3 * CS, 4],
      [5 * CS, 1],
      [5 * CS + 100, 1], // unaligned offsets count their cluster (compressed data)
    ];
    const counts = await countReferences(refs, {
      clusterBits: CB,
      refcountOrder: 4,
      hostClusters: 10,
    });
    expect(Array.from(counts.subarray(0, 8))).toEqual([1, 0, 0, 1, 1, 3, 1, 0]);
    expect(counts.length).toBe(10);
    async function* gen(): AsyncGenerator<readonly [number, number]> {
      yield* refs.slice(0, 4);
    }
    const backend = await imageOf(8);
    await rebuildRefcounts({
      backend,
      clusterBits: CB,
      refcountOrder: 4,
      references: gen(),
      onTableMoved: (o, n) => writeHeaderTable(backend, o, n),
    });
    const rc = await openImage(backend, CB, 4);
    const got = new Float64Array(8);
    await rc.readRange(0, got);
    expect(Array.from(got)).toEqual([1, 0, 0, 1, 1, 3, 1, 0]);
  });

  it("never sizes the counts by a reference: runs past the file are corruption or dropped", async () => {
    const refs: [number, number][] = [
      [0, 1],
      [2 ** 40 * CS, 1], // a poked offset far past the file: no array that large is made
      [9 * CS, 2], // ends one cluster past the 10 the file holds
      [3 * CS, 1],
    ];
    const err = await countReferences(refs, {
      clusterBits: CB,
      refcountOrder: 4,
      hostClusters: 10,
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CorruptImageError);
    expect((err as Error).message).toMatch(/reaches past the end of the file \(10 clusters\)/);
    const dropped: number[] = [];
    const counts = await countReferences(refs, {
      clusterBits: CB,
      refcountOrder: 4,
      hostClusters: 10,
      onPastEnd: ([off]) => dropped.push(off),
    });
    expect(counts.length).toBe(10);
    expect(dropped).toEqual([2 ** 40 * CS, 9 * CS]);
    expect(Array.from(counts)).toEqual([1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
  });

  it("refuses counts the width cannot hold before writing anything", async () => {
    const backend = await imageOf(4);
    const err = await rebuildRefcounts({
      backend,
      clusterBits: CB,
      refcountOrder: 0,
      counts: [1, 2, 1],
      onTableMoved: () => expect.fail("must not move the header"),
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RangeFormatError);
    expect((err as Error).message).toMatch(
      /cluster 0x200 would be 2, above the maximum 1 of refcount_bits=1; use a wider refcount width/,
    );
    expect(await backend.size()).toBe(4 * CS);
    await expect(
      countReferences(
        [
          [0, 1],
          [0, 1],
        ],
        { clusterBits: CB, refcountOrder: 0, hostClusters: 1 },
      ),
    ).rejects.toThrow(RangeFormatError);
  });

  it("refuses a placement over used clusters", async () => {
    const backend = await imageOf(8);
    await expect(
      rebuildRefcounts({
        backend,
        clusterBits: CB,
        refcountOrder: 4,
        counts: [1, 0, 1],
        placeAt: CS,
        onTableMoved: () => {},
      }),
    ).rejects.toThrow(InvalidArgumentError);
  });

  it("moves the header only after the new structures are durable", async () => {
    const fault = await FaultBackend.wrap(await imageOf(16));
    let pendingAtMove = -1;
    const res = await rebuildRefcounts({
      backend: fault,
      clusterBits: CB,
      refcountOrder: 4,
      counts: new Uint16Array(16).fill(1),
      onTableMoved: async (o, n) => {
        pendingAtMove = fault.pendingCount;
        await writeHeaderTable(fault, o, n);
      },
    });
    expect(pendingAtMove).toBe(0);
    const survivor = fault.powerLoss();
    expect(await readHeaderTable(survivor)).toEqual({
      tableOffset: res.tableOffset,
      tableClusters: res.tableClusters,
    });
  });

  it("rebuilds a grown image to the same counts", async () => {
    const backend = await makeImage(CB, 6);
    const rc = await openImage(backend, CB, 6);
    const data: number[] = [];
    for (let i = 0; i < 300; i++) data.push((await rc.allocate(1 + (i % 20))) / CS);
    await rc.flush();
    const before = await walk(rc);
    // The caller enumerates the references: everything but the old refcount structures.
    const refs: [number, number][] = [];
    for (const [c, v] of before.counts)
      if (!before.metadata.has(c) || c === 0) for (let k = 0; k < v; k++) refs.push([c * CS, 1]);
    const res = await rebuildRefcounts({
      backend,
      clusterBits: CB,
      refcountOrder: 6,
      references: refs,
      onTableMoved: (o, n) => writeHeaderTable(backend, o, n),
    });
    const after = await walk(await openImage(backend, CB, 6));
    for (const [c, v] of before.counts)
      if (!before.metadata.has(c)) expect(after.counts.get(c)).toBe(v);
    for (const [c] of after.counts)
      expect(
        (before.counts.has(c) && !before.metadata.has(c)) || after.metadata.has(c) || c === 0,
      ).toBe(true);
    expect(after.metadata.has(res.tableOffset / CS)).toBe(true);
  });
});

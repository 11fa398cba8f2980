/**
 * Power loss during refcount table growth: whatever write or flush fails, the durable image
 * has either the old layout or the new one, each self-consistent, and the header keeps
 * pointing at the old table until the onTableMoved callback ran.
 */
import { describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend } from "@qimg/io";
import type { FaultOp } from "@qimg/io";
import {
  makeImage,
  openImage,
  readHeaderTable,
  walk,
  writeHeaderTable,
} from "../src/image.testkit.js";

const CB = 9;
const CS = 512;
const ORDER = 6; // 64 entries per block: one table cluster covers 4096 clusters

async function baseImage(): Promise<{ bytes: Uint8Array; used: number[] }> {
  const backend = await makeImage(CB, ORDER);
  const rc = await openImage(backend, CB, ORDER);
  const used: number[] = [];
  while (rc.freeHint < 4096 - 40) used.push((await rc.allocate(1)) / CS);
  await rc.flush();
  expect(rc.tableClusters).toBe(1);
  return { bytes: backend.snapshot(), used };
}

/** The operation under test: an allocation that forces the table to grow, then a flush. */
async function grow(
  backend: FaultBackend,
  onMove?: () => void,
): Promise<{ tableOffset: number; tableClusters: number }> {
  const rc = await openImage(backend, CB, ORDER, {
    onTableMoved: async (o, n) => {
      onMove?.();
      await writeHeaderTable(backend, o, n);
    },
  });
  await rc.allocate(100);
  await rc.flush();
  return { tableOffset: rc.tableOffset, tableClusters: rc.tableClusters };
}

describe("crash during refcount table growth", async () => {
  const base = await baseImage();
  const clean = await FaultBackend.wrap(MemoryBackend.from(base.bytes));
  const newLayout = await grow(clean, () => {
    // Everything the new table needs is durable before the header moves.
    expect(clean.pendingCount).toBe(0);
  });
  const oldLayout = { tableOffset: CS, tableClusters: 1 };
  const { writes, flushes } = clean.counters;

  it("the clean run moved the table", () => {
    expect(newLayout.tableOffset).not.toBe(oldLayout.tableOffset);
    expect(writes).toBeGreaterThan(3);
  });

  const cases: [FaultOp, number][] = [];
  for (let k = 1; k <= writes; k++) cases.push(["write", k]);
  for (let k = 1; k <= flushes; k++) cases.push(["flush", k]);

  it.each(cases)("%s #%i fails, then power is lost", async (op, k) => {
    const fault = await FaultBackend.wrap(MemoryBackend.from(base.bytes), { failOn: { [op]: k } });
    let moved = false;
    await grow(fault, () => (moved = true)).catch(() => undefined);
    const survivor = fault.powerLoss({ tearLastWrite: true, seed: k });
    const header = await readHeaderTable(survivor);
    if (!moved) expect(header).toEqual(oldLayout);
    else expect([oldLayout, newLayout]).toContainEqual(header);
    const rc = await openImage(survivor, CB, ORDER);
    const { counts } = await walk(rc); // every block and table cluster has refcount 1
    for (const c of base.used) expect(counts.get(c)).toBe(1);
    if (header.tableOffset === newLayout.tableOffset) {
      // New layout: every entry up to the new blocks is present.
      for (let s = 0; s < 64; s++) expect(rc.blockOffset(s)).not.toBe(0);
    }
  });
});

describe("crash while adding a refcount block inside the table", async () => {
  // Fresh image: only block 0 exists; allocating past cluster 64 needs block 1.
  const bytes = (await makeImage(CB, ORDER)).snapshot();
  const op = async (backend: FaultBackend): Promise<void> => {
    const rc = await openImage(backend, CB, ORDER);
    for (let i = 0; i < 8; i++) await rc.allocate(10);
    await rc.flush();
  };
  const clean = await FaultBackend.wrap(MemoryBackend.from(bytes));
  await op(clean);
  const cases: [FaultOp, number][] = [];
  for (let k = 1; k <= clean.counters.writes; k++) cases.push(["write", k]);
  for (let k = 1; k <= clean.counters.flushes; k++) cases.push(["flush", k]);

  it.each(cases)("%s #%i fails, then power is lost", async (faultOp, k) => {
    const fault = await FaultBackend.wrap(MemoryBackend.from(bytes), { failOn: { [faultOp]: k } });
    await op(fault).catch(() => undefined);
    const survivor = fault.powerLoss({ tearLastWrite: true, seed: k });
    expect(await readHeaderTable(survivor)).toEqual({ tableOffset: CS, tableClusters: 1 });
    const rc = await openImage(survivor, CB, ORDER);
    await walk(rc); // any block the table names exists and counts itself
    if (rc.blockOffset(1) !== 0) expect(await rc.get(rc.blockOffset(1) / CS)).toBe(1);
  });
});

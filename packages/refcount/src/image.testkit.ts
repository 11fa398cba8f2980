/**
 * Test helpers (not exported): a tiny qcow2-shaped image in memory whose header keeps the
 * refcount table location where qcow2 does (offset 48: u64 table offset, 56: u32 clusters).
 */
import { ClusterCache } from "@qimg/cluster-cache";
import type { BlockBackend } from "@qimg/io";
import { MemoryBackend } from "@qimg/io";
import { Refcounts } from "./refcounts.js";
import type { RefcountsOptions } from "./refcounts.js";
import { rebuildRefcounts } from "./rebuild.js";
import { seededRandom } from "@qimg/io";

export const HDR_TABLE_OFFSET = 48;
export const HDR_TABLE_CLUSTERS = 56;

export async function writeHeaderTable(
  backend: BlockBackend,
  tableOffset: number,
  tableClusters: number,
): Promise<void> {
  const b = new Uint8Array(12);
  const v = new DataView(b.buffer);
  v.setUint32(0, Math.floor(tableOffset / 0x1_0000_0000), false);
  v.setUint32(4, tableOffset >>> 0, false);
  v.setUint32(8, tableClusters, false);
  await backend.write(HDR_TABLE_OFFSET, b);
  await backend.flush();
}

export async function readHeaderTable(
  backend: BlockBackend,
): Promise<{ tableOffset: number; tableClusters: number }> {
  const b = new Uint8Array(12);
  await backend.read(HDR_TABLE_OFFSET, b);
  const v = new DataView(b.buffer);
  return {
    tableOffset: v.getUint32(0, false) * 0x1_0000_0000 + v.getUint32(4, false),
    tableClusters: v.getUint32(8, false),
  };
}

/** Header cluster at 0, table at cluster 1, first block at cluster 2 (like qemu-img create). */
export async function makeImage(
  clusterBits: number,
  refcountOrder: number,
): Promise<MemoryBackend> {
  const cs = 2 ** clusterBits;
  const backend = new MemoryBackend();
  await backend.write(0, new Uint8Array(cs));
  await rebuildRefcounts({
    backend,
    clusterBits,
    refcountOrder,
    counts: [1],
    placeAt: cs,
    onTableMoved: (o, n) => writeHeaderTable(backend, o, n),
  });
  return backend;
}

export async function openImage(
  backend: BlockBackend,
  clusterBits: number,
  refcountOrder: number,
  extra: Partial<RefcountsOptions> = {},
): Promise<Refcounts> {
  const { tableOffset, tableClusters } = await readHeaderTable(backend);
  const cache = new ClusterCache({
    backend,
    tableSize: 2 ** clusterBits,
    capacity: 8,
    name: "refcount",
  });
  return Refcounts.open({
    backend,
    cache,
    clusterBits,
    refcountOrder,
    tableOffset,
    tableClusters,
    onTableMoved: (o, n) => writeHeaderTable(backend, o, n),
    ...extra,
  });
}

/**
 * Walk the structure as a checker would: every refcount block and every table cluster must
 * have refcount exactly 1, the header cluster 1. Returns every non-zero refcount by cluster
 * index, and the set of metadata clusters (header, table, blocks).
 */
export async function walk(
  rc: Refcounts,
): Promise<{ counts: Map<number, number>; metadata: Set<number> }> {
  const cs = rc.clusterSize;
  const metadata = new Set<number>([0]);
  for (let i = 0; i < rc.tableClusters; i++) metadata.add(rc.tableOffset / cs + i);
  for (let s = 0; s < rc.tableEntries; s++) {
    const off = rc.blockOffset(s);
    if (off !== 0) metadata.add(off / cs);
  }
  for (const m of metadata) {
    const v = await rc.get(m);
    if (v !== 1)
      throw new Error(
        `metadata cluster ${m} (0x${(m * cs).toString(16)}) has refcount ${v}, expected 1`,
      );
  }
  const counts = new Map<number, number>();
  let lastSlot = -1;
  for (let s = 0; s < rc.tableEntries; s++) if (rc.blockOffset(s) !== 0) lastSlot = s;
  const buf = new Float64Array((lastSlot + 1) * rc.entriesPerBlock);
  await rc.readRange(0, buf);
  buf.forEach((v, i) => {
    if (v !== 0) counts.set(i, v);
  });
  return { counts, metadata };
}

export const prng = seededRandom;

/**
 * The consistency walk behind `checkQed` and the repair run when a need-check image is opened
 * read-write. A port of the facts of QEMU's qed-check.c: every L1 and L2 entry must be 0, 1
 * (L2 only) or a cluster-aligned offset past the header and inside the file; every cluster may
 * be referenced once; clusters referenced by nothing are leaks. Repair clears invalid entries
 * (what they pointed to is lost anyway); duplicates and leaks are only reported.
 */
import { hex } from "@qimg/structs";
import type { BlockBackend } from "@qimg/io";
import { QedTable, classifyL1Entry, classifyL2Entry, QED_ENTRY_TOO_LARGE } from "./spec/table.js";
import type { QedGeometry } from "./spec/table.js";
import type { QedCheckProblem } from "./types.js";

export interface WalkContext {
  readonly backend: BlockBackend;
  readonly geometry: QedGeometry;
  readonly l1TableOffset: number;
  readonly imageSize: number;
  /** The live L1 table (fixed in place when repairing). */
  readonly l1: QedTable;
  /** Bytes of the L2 table at `offset` (the live cached copy when there is one). */
  readL2(offset: number): Promise<Uint8Array>;
  /** Called after an L2 table was rewritten with fixes. */
  l2Fixed?(offset: number): void;
}

export interface WalkResult {
  corruptions: number;
  corruptionsFixed: number;
  leaks: number;
  checkErrors: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  totalClusters: number;
  problems: QedCheckProblem[];
}

function describe(value: number): string {
  return value === QED_ENTRY_TOO_LARGE ? "a value above 2^53-1" : hex(value);
}

/**
 * Whether any table entry points into the torn last cluster of the file: the cluster at
 * `g.fileSize` when the file really ends inside it (`bytes` is the real file size). QEMU
 * treats such entries as invalid (the cluster is not inside its `file_size`); a repair that
 * grows the file to the cluster's end keeps the bytes still there, and an allocation must
 * start past that cluster instead of on top of it.
 */
export async function referencesTornCluster(
  g: QedGeometry,
  bytes: number,
  l1: QedTable,
  readL2: (offset: number) => Promise<Uint8Array>,
): Promise<boolean> {
  return (await tornClusterReferences(g, bytes, l1, readL2)) > 0;
}

/**
 * How many table entries point into the torn last cluster (see
 * {@link referencesTornCluster}), counting up to 2 (an L2 table reaching into it counts 2).
 * A repair grows the cluster only for exactly one data cluster: growing the file makes every
 * entry pointing there valid, and several of them are garbage (or a cluster referenced
 * twice), which a grown file would turn into more corruption.
 */
export async function tornClusterReferences(
  g: QedGeometry,
  bytes: number,
  l1: QedTable,
  readL2: (offset: number) => Promise<Uint8Array>,
): Promise<number> {
  const cs = g.clusterSize;
  const torn = g.fileSize;
  const end = Math.ceil(bytes / cs) * cs;
  if (end <= torn) return 0;
  const grown: QedGeometry = { ...g, fileSize: end };
  const span = g.tableSize * cs;
  let n = 0;
  for (let i = 0; i < l1.length && n < 2; i++) {
    const v = l1.get(i);
    if (classifyL1Entry(v, grown) !== "offset") continue;
    if (v <= torn && torn < v + span) {
      // A table in the torn cluster counts double: growing would make its other clusters,
      // which other entries may claim, part of a valid table (a repair keeps it invalid).
      n += 2;
      continue;
    }
    const l2 = new QedTable(await readL2(v));
    for (let j = 0; j < l2.length && n < 2; j++) if (l2.get(j) === torn) n++;
  }
  return n;
}

/**
 * How many references (L1 table, L2 tables, data clusters; saturating at 2) each cluster of
 * the file has, from a read-only pass over the tables. A repair never writes into an L2 table
 * whose clusters something else also claims (the L1 table, another table, a data cluster).
 */
async function countReferences(ctx: WalkContext): Promise<Uint8Array> {
  const g = ctx.geometry;
  const cs = g.clusterSize;
  const refs = new Uint8Array(Math.floor(g.fileSize / cs));
  const add = (offset: number, n: number): void => {
    for (let c = offset / cs, i = 0; i < n && c < refs.length; i++, c++) {
      if (refs[c]! < 2) refs[c] = refs[c]! + 1;
    }
  };
  add(ctx.l1TableOffset, g.tableSize);
  const l1 = ctx.l1;
  for (let i = 0; i < l1.length; i++) {
    const value = l1.get(i);
    if (classifyL1Entry(value, g) !== "offset") continue;
    add(value, g.tableSize);
    let l2: QedTable;
    try {
      l2 = new QedTable(await ctx.readL2(value));
    } catch {
      continue;
    }
    for (let j = 0; j < l2.length; j++) {
      const v = l2.get(j);
      if (classifyL2Entry(v, g) === "offset") add(v, 1);
    }
  }
  return refs;
}

/** The fixed problem a repair reports after growing a torn last cluster to its end. */
export function tornClusterGrown(offset: number, size: number): QedCheckProblem {
  return {
    kind: "corruption",
    fixed: true,
    offset,
    message: `the file ends at ${hex(size)}, inside the cluster at ${hex(offset)} that a table points into: grown to the cluster's end`,
  };
}

export async function walkQed(ctx: WalkContext, repair: boolean): Promise<WalkResult> {
  const g = ctx.geometry;
  const cs = g.clusterSize;
  const nclusters = Math.floor(g.fileSize / cs);
  const used = new Uint8Array(nclusters);
  const refs = repair ? await countReferences(ctx) : undefined;
  /** Whether the table at `offset` is claimed by nothing else (a repair may write into it). */
  const ownTable = (offset: number): boolean => {
    if (refs === undefined) return true;
    for (let c = offset / cs, i = 0; i < g.tableSize && c < refs.length; i++, c++) {
      if (refs[c]! > 1) return false;
    }
    return true;
  };
  const r: WalkResult = {
    corruptions: 0,
    corruptionsFixed: 0,
    leaks: 0,
    checkErrors: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    totalClusters: Math.ceil(ctx.imageSize / cs),
    problems: [],
  };

  const markUsed = (offset: number, n: number, what: string): boolean => {
    let dup = 0;
    for (let c = offset / cs, i = 0; i < n; i++, c++) {
      if (c >= nclusters) continue;
      if (used[c] === 1) {
        dup++;
        r.problems.push({
          kind: "corruption",
          fixed: false,
          offset: c * cs,
          message: `cluster at ${hex(c * cs)} is referenced more than once (again by ${what})`,
        });
      }
      used[c] = 1;
    }
    r.corruptions += dup;
    return dup === 0;
  };

  const bad = (offset: number, message: string, fix = repair): void => {
    if (fix) r.corruptionsFixed++;
    else r.corruptions++;
    r.problems.push({ kind: "corruption", fixed: fix, offset, message });
  };

  markUsed(ctx.l1TableOffset, g.tableSize, "the L1 table");
  let l1Fixed = false;
  const l1 = ctx.l1;
  for (let i = 0; i < l1.length; i++) {
    const value = l1.get(i);
    const kind = classifyL1Entry(value, g);
    if (kind === "unallocated") continue;
    const entryOffset = ctx.l1TableOffset + i * 8;
    if (kind === "invalid") {
      bad(
        entryOffset,
        `L1 entry ${i} points to an L2 table at ${describe(value)}, which is not cluster aligned or not inside the file (${hex(g.fileSize)} bytes)`,
      );
      if (repair) {
        l1.set(i, 0);
        l1Fixed = true;
      }
      continue;
    }
    if (!markUsed(value, g.tableSize, `L1 entry ${i}`)) continue;
    let bytes: Uint8Array;
    try {
      bytes = await ctx.readL2(value);
    } catch (e) {
      r.checkErrors++;
      r.problems.push({
        kind: "error",
        fixed: false,
        offset: value,
        message: `reading the L2 table at ${hex(value)} failed: ${(e as Error).message}`,
      });
      continue;
    }
    const l2 = new QedTable(bytes);
    // A table that is also the L1 table, another table or a data cluster is not written into.
    const fixHere = repair && ownTable(value);
    let invalid = 0;
    let last = 0;
    for (let j = 0; j < l2.length; j++) {
      const v = l2.get(j);
      const k = classifyL2Entry(v, g);
      if (k === "unallocated" || k === "zero") continue;
      r.allocatedClusters++;
      if (last !== 0 && last + cs !== v) r.fragmentedClusters++;
      last = v;
      if (k === "invalid") {
        bad(
          value + j * 8,
          `L2 table at ${hex(value)} entry ${j} points to a data cluster at ${describe(v)}, which is not cluster aligned or not inside the file (${hex(g.fileSize)} bytes)`,
          fixHere,
        );
        if (fixHere) l2.set(j, 0);
        invalid++;
        continue;
      }
      markUsed(v, 1, `L2 table at ${hex(value)} entry ${j}`);
    }
    if (invalid > 0 && fixHere) {
      try {
        await ctx.backend.write(value, bytes);
        ctx.l2Fixed?.(value);
      } catch (e) {
        r.checkErrors++;
        r.problems.push({
          kind: "error",
          fixed: false,
          offset: value,
          message: `writing the repaired L2 table at ${hex(value)} failed: ${(e as Error).message}`,
        });
      }
    }
  }
  if (l1Fixed) {
    try {
      await ctx.backend.write(ctx.l1TableOffset, l1.bytes);
    } catch (e) {
      r.checkErrors++;
      r.problems.push({
        kind: "error",
        fixed: false,
        offset: ctx.l1TableOffset,
        message: `writing the repaired L1 table failed: ${(e as Error).message}`,
      });
    }
  }
  if (r.checkErrors === 0) {
    // Leaks: clusters past the header that nothing references, reported per run.
    for (let c = g.headerSize; c < nclusters;) {
      if (used[c] === 1) {
        c++;
        continue;
      }
      let end = c;
      while (end < nclusters && used[end] !== 1) end++;
      r.leaks += end - c;
      r.problems.push({
        kind: "leak",
        fixed: false,
        offset: c * cs,
        message: `${end - c} cluster(s) at ${hex(c * cs)} are not referenced by any table (leaked)`,
      });
      c = end;
    }
  }
  return r;
}

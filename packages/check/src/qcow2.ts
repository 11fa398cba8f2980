/**
 * `qemu-img check` for qcow2 (QEMU's qcow2_co_check_locked): one pass counts every reference
 * and compares it with the stored refcounts (qcow2-pass.ts, qcow2-tables.ts), a repair may
 * rebuild the refcount structures, and after a repair that fixed anything the image is checked
 * again. The metadata is read without opening a driver (`readQcow2Metadata`); the tables are
 * walked with the driver's table walk.
 */
import type { BlockBackend } from "@qimg/io";
import {
  AutoclearFeatures,
  BitmapFlag,
  classifyBitmapTableEntry,
  ExtensionType,
  encodeSnapshotTable,
  readQcow2Metadata,
  rewriteHeaderArea,
  STALE_BITMAPS_WARNING,
  writeHeaderFields,
} from "@qimg/qcow2";
import { CorruptImageError, U64TableView } from "@qimg/structs";
import type { SnapshotEntry } from "@qimg/qcow2";
import { rebuildRefcounts } from "@qimg/refcount";
import { checkExitCode } from "./result.js";
import type { CheckMessage, CheckMessageKind, CheckResult, LostRange } from "./result.js";
import {
  CheckAbort,
  FIX_ERRORS,
  FIX_LEAKS,
  MAX_L1_ENTRIES,
  Pass,
  suspectSnapshotTable,
  zeroCounters,
} from "./qcow2-pass.js";
import type { Counters, Layout } from "./qcow2-pass.js";
import { buildMetaMap, calculate, checkOflagCopied } from "./qcow2-tables.js";
import { readSnapshotTableRepairing } from "./snapshot-table.js";

/** How much a check may repair, as `qemu-img check -r`. */
export type RepairMode = "leaks" | "all";

/** Options of a check: whether to repair, and the file name to report. */
export interface CheckOptions {
  /** Repair leaks only, or everything that can be repaired. Default: check only. */
  readonly repair?: RepairMode | undefined;
  /** Name reported as `filename` (qemu-img prints the path it was given). Default: the backend's name. */
  readonly filename?: string | undefined;
}

/** The image's metadata, read as opening it would, without a driver (nothing to close). */
function readLayout(backend: BlockBackend): Promise<Layout> {
  return readQcow2Metadata(backend, { noBacking: true, forCheck: true });
}

const DIRTY = 1n;
const CORRUPT = 2n;
const KNOWN_AUTOCLEAR = 3n; // bitmaps, raw external data

interface PassOutcome {
  res: Counters;
  imageEndOffset: number;
  totalClusters: number;
  failure: string | undefined;
  rebuilt: boolean;
}

/**
 * The end of the furthest L1 table or snapshot table that starts inside the file (or up to
 * 32 MiB past it): a rebuild appends its structures at the end of the file, and a table that
 * reaches past the end (its size is wrong) would then read them as entries — new references
 * to garbage, which makes the image worse. (Placing them past the table instead turns its
 * garbage entries into references inside the file: worse again.)
 */
function tablesEnd(layout: Layout, fileSize: number, rewritten = false): number {
  const h = layout.header;
  const cs = 2 ** h.clusterBits;
  let end = fileSize;
  const reach = (offset: number, bytes: number): void => {
    if (offset < fileSize + MAX_L1_ENTRIES * 8 && bytes <= MAX_L1_ENTRIES * 8) {
      end = Math.max(end, offset + bytes);
    }
  };
  reach(h.l1TableOffset, h.l1Size * 8);
  for (const sn of layout.snapshots) reach(sn.l1TableOffset, sn.l1Size * 8);
  // A snapshot table about to be rewritten (its overlong extra data dropped) is never read
  // as entries again past what is kept.
  if (!rewritten) reach(h.snapshotsOffset, layout.snapshotsSize);
  return Math.ceil(end / cs) * cs;
}

/** Indices of the snapshot table entries too short for a v3 image (under 16 bytes of extra data). */
function incompleteSnapshots(snapshots: readonly SnapshotEntry[]): number[] {
  const out: number[] = [];
  snapshots.forEach((sn, i) => {
    if (sn.extraData.byteLength < 16) out.push(i);
  });
  return out;
}

/**
 * The snapshot table rewritten as QEMU writes it (qcow2_write_snapshots): every entry's extra
 * data holds at least the 64-bit VM state size, the disk size and the instruction count (24
 * bytes; longer extra data is kept as it is). A missing disk size is the virtual size rounded
 * up to 512 bytes, a missing instruction count is -1.
 */
function completeExtraData(layout: Layout): Omit<SnapshotEntry, "offset">[] {
  const diskSize = BigInt(Math.ceil(layout.header.size / 512) * 512);
  // IDs and names are C strings to QEMU: it writes them up to their first NUL.
  const cString = (s: string): string => s.split("\0", 1)[0]!;
  return layout.snapshots.map((entry) => {
    const sn = { ...entry, id: cString(entry.id), name: cString(entry.name) };
    if (sn.extraData.byteLength >= 24) return sn;
    const extra = new Uint8Array(24);
    const dv = new DataView(extra.buffer);
    extra.set(sn.extraData);
    if (sn.extraData.byteLength < 8) dv.setBigUint64(0, BigInt(sn.vmStateSize), false);
    if (sn.extraData.byteLength < 16) dv.setBigUint64(8, diskSize, false);
    if (sn.extraData.byteLength < 24) dv.setBigUint64(16, 0xffffffffffffffffn, false);
    return { ...sn, extraData: extra };
  });
}

/**
 * Write the completed snapshot table into new clusters at the end of the file, then point
 * the header at it, then free the old table (each step synced, so a crash leaves the old
 * table or the new one, at worst with leaked clusters). Undefined when the new clusters have
 * no refcount block to count them in (nothing is changed then).
 */
async function rewriteSnapshotTable(
  p: Pass,
  layout: Layout,
): Promise<Layout["header"] | undefined> {
  const backend = p.backend;
  const cs = p.cs;
  const bytes = encodeSnapshotTable(completeExtraData(layout));
  const n = Math.ceil(bytes.byteLength / cs);
  // As qcow2_alloc_clusters: the first run of n free clusters (no reference, refcount 0),
  // else past every table that reaches beyond the end of the file (see tablesEnd).
  // (An empty table has no clusters: the header's offset becomes 0, as QEMU writes it.)
  let at = n === 0 ? 0 : tablesEnd(layout, await backend.size());
  for (let c = 1, run = 0; n > 0 && c < p.nbClusters; c++) {
    run = p.counts[c] === 0 && (await p.stored.get(c)) === 0 ? run + 1 : 0;
    if (run === n) {
      at = (c - n + 1) * cs;
      break;
    }
  }
  const table = new Uint8Array(n * cs);
  table.set(bytes);
  // Each new cluster needs a refcount block that is really in the file (a refcount table
  // found in the wrong place names garbage offsets).
  const fileSize = await backend.size();
  for (let c = at / cs; c < at / cs + n; c++) {
    const block = p.stored.blockOffsetOf(c);
    if (!(block > 0 && block % cs === 0 && block + cs <= fileSize)) return undefined;
  }
  if (n > 0) {
    await backend.write(at, table);
    await backend.flush();
    for (let c = at / cs; c < at / cs + n; c++) await p.stored.set(c, 1);
    await backend.flush();
  }
  const h = layout.header;
  const header = await writeHeaderFields(backend, h, { snapshotsOffset: at });
  const first = Math.floor(h.snapshotsOffset / cs);
  const last = Math.floor((h.snapshotsOffset + layout.snapshotsSize - 1) / cs);
  // As qcow2_free_clusters: all of the old table's clusters or none (one not counted, e.g.
  // a table past the end of the file, fails the whole free, with QEMU's line).
  const counts: number[] = [];
  for (let c = first; c <= last; c++) counts.push(await p.stored.get(c));
  if (counts.some((rc) => rc === 0)) {
    p.log("error", "qcow2_free_clusters failed: Invalid argument");
  } else {
    for (let c = first; c <= last; c++) await p.stored.set(c, counts[c - first]! - 1);
  }
  await backend.flush();
  return header;
}

/**
 * What QEMU's open does with the persistent bitmaps before the check runs
 * (qcow2_load_dirty_bitmaps): the table of every bitmap not in use is read, and an entry with
 * reserved bits, or with an offset that is unaligned or has the all-ones flag, fails the open
 * ("Could not open: Could not read bitmap_table table from image for bitmap 'b': Invalid
 * argument"). Throws that refusal as a typed error.
 */
async function loadBitmapTables(backend: BlockBackend, layout: Layout): Promise<void> {
  if (!AutoclearFeatures.decode(layout.header.autoclearFeatures).has("bitmaps")) return;
  const cs = 2 ** layout.header.clusterBits;
  const fileSize = await backend.size();
  for (const bm of layout.bitmaps) {
    if ((bm.flags & BitmapFlag.inUse) !== 0) continue;
    const bytes = bm.bitmapTableSize * 8;
    if (bm.bitmapTableOffset % cs !== 0 || bm.bitmapTableOffset + bytes > fileSize) continue;
    const t = new U64TableView(new Uint8Array(bytes), "big");
    await backend.read(bm.bitmapTableOffset, t.bytes);
    for (let i = 0; i < t.length; i++) {
      if (typeof classifyBitmapTableEntry(t, i, cs) === "string") {
        throw new CorruptImageError(
          `Could not read bitmap_table table from image for bitmap '${bm.name}': Invalid argument`,
          { offset: bm.bitmapTableOffset + i * 8 },
        );
      }
    }
  }
}

/** qcow2_co_check_locked: one full check (with repairs when `fix` says so). */
async function runCheck(
  backend: BlockBackend,
  fix: number,
  log: (kind: CheckMessageKind, text: string, offset?: number) => void,
  lost: LostRange[],
): Promise<PassOutcome> {
  let layout = await readLayout(backend);
  const h0 = layout.header;
  const cs = 2 ** h0.clusterBits;
  const totalClusters = Math.ceil(h0.size / cs);
  if (fix !== 0 && (h0.autoclearFeatures & ~KNOWN_AUTOCLEAR) !== 0n) {
    // What QEMU does on every read-write open: drop autoclear bits it does not know.
    // Only the field changes on disk (8 bytes), then a sync, as QEMU writes it.
    const header = await writeHeaderFields(backend, h0, {
      autoclearFeatures: h0.autoclearFeatures & KNOWN_AUTOCLEAR,
    });
    layout = { ...layout, header };
  }
  const staleBitmaps =
    !AutoclearFeatures.decode(layout.header.autoclearFeatures).has("bitmaps") &&
    layout.extensions.some((e) => e.type === ExtensionType.bitmaps);
  if (fix !== 0 && staleBitmaps) {
    // QEMU's read-write open drops a bitmaps extension whose autoclear bit is clear (a
    // program without bitmap support wrote the image): the header area without it.
    const extensions = layout.extensions.filter((e) => e.type !== ExtensionType.bitmaps);
    const header = await rewriteHeaderArea(backend, {
      header: layout.header,
      extensions,
      backingFile: layout.backingFilename,
    });
    layout = { ...layout, header, extensions };
  }
  const fileSize = await backend.size();
  let reduced = 0;
  let dropped = 0;
  if (layout.snapshotTableError !== undefined && (fix & FIX_ERRORS) !== 0) {
    // qemu-img check -r all reads what it can of the table instead (and rewrites it below).
    const repaired = await readSnapshotTableRepairing(backend, layout, log);
    layout = repaired.layout;
    reduced = repaired.reduced;
    dropped = repaired.dropped;
  }
  if (layout.snapshotTableError !== undefined) {
    // qcow2_check_read_snapshot_table fails before anything is counted (qemu-img check -r all
    // discards the extra data instead; not done here: nothing is written).
    const { message, hint } = layout.snapshotTableError;
    log("error", `ERROR ${message}\n${hint}`);
    return {
      res: zeroCounters(),
      imageEndOffset: 0,
      totalClusters,
      failure: "File too large",
      rebuilt: false,
    };
  }
  let p = new Pass(backend, layout, fileSize, log, lost);
  let rebuilt = false;
  // Dropped snapshots are gone from the header already; cut extra data is fixed when the
  // table is rewritten below (or counted as a corruption again if that fails).
  p.res.corruptionsFixed += reduced + dropped;
  // qcow2_check_read_snapshot_table: a v3 entry needs at least 16 bytes of extra data.
  const incomplete = h0.version >= 3 ? incompleteSnapshots(layout.snapshots) : [];
  for (const i of incomplete) {
    const repair = (fix & FIX_ERRORS) !== 0;
    log(
      repair ? "repair" : "corruption",
      `${repair ? "Repairing" : "ERROR"} snapshot table entry ${i} is incomplete`,
      layout.snapshots[i]!.offset,
    );
    if (repair) p.res.corruptionsFixed++;
    else p.res.corruptions++;
  }
  try {
    await p.openStored();
    if (fix !== 0) await buildMetaMap(p);
    const copied = await calculate(p, fix, fix === 0);
    // Entries dropped by the walk must be gone on disk before any refcount goes down.
    if (fix !== 0) await backend.flush();
    const pre = { ...p.res };
    await p.compare(0);
    const size = await backend.size();
    // A rebuild appends its structures at the end of the file; a table reaching past the end
    // would read them as entries. Then repair what can be repaired without a rebuild.
    const noRebuild =
      p.rebuild &&
      (fix & FIX_ERRORS) !== 0 &&
      tablesEnd(layout, size, dropped > 0) > Math.ceil(size / cs) * cs;
    if (p.rebuild && fix & FIX_ERRORS && !noRebuild) {
      const old = { ...p.res };
      log("info", "Rebuilding refcount structure");
      // New counts: everything referenced, the old refcount table and blocks included (as
      // QEMU: they stay allocated until the header names the new ones, and then the leak
      // repair below frees them, with its "Repairing cluster" lines).
      const counts = p.counts.slice(0, p.nbClusters);
      await backend.flush();
      let header = layout.header;
      await rebuildRefcounts({
        backend,
        clusterBits: header.clusterBits,
        refcountOrder: header.refcountOrder,
        counts,
        onTableMoved: async (tableOffset, tableClusters) => {
          // The two refcount table fields only (12 bytes, one sector), then a sync.
          header = await writeHeaderFields(backend, header, {
            refcountTableOffset: tableOffset,
            refcountTableClusters: tableClusters,
          });
        },
      });
      rebuilt = true;
      layout = { ...layout, header };
      const carried = p.res;
      p = new Pass(backend, layout, await backend.size(), log, lost);
      await p.openStored();
      await buildMetaMap(p);
      p.res = { ...carried, corruptions: 0, leaks: 0, allocated: 0, fragmented: 0, compressed: 0 };
      await calculate(p, 0);
      let freshLeaks = 0;
      if (fix & FIX_LEAKS) {
        const saved = p.res;
        p.res = zeroCounters();
        await p.compare(FIX_LEAKS);
        if (p.rebuild) log("error", "ERROR rebuilt refcount structure is still broken");
        freshLeaks = p.res.leaks;
        p.res = saved;
      }
      if (p.res.corruptions < old.corruptions)
        p.res.corruptionsFixed += old.corruptions - p.res.corruptions;
      if (p.res.leaks < old.leaks) p.res.leaksFixed += old.leaks - p.res.leaks;
      p.res.leaks += freshLeaks;
    } else if (fix !== 0) {
      if (noRebuild) {
        log(
          "error",
          "ERROR need to rebuild refcount structures, but an L1 table or the snapshot table reaches past the end of the file; not rebuilt",
        );
      } else if (p.rebuild) {
        log("error", "ERROR need to rebuild refcount structures");
        p.res.checkErrors++;
        throw new CheckAbort("Input/output error");
      }
      if (p.res.leaks > 0 || p.res.corruptions > 0) {
        p.res = pre;
        await p.compare(fix);
      }
    }
    if (fix !== 0) await backend.flush();
    if (copied !== undefined) copied.flush();
    else await checkOflagCopied(p, fix);
    if (fix !== 0) await backend.flush();
    if (incomplete.length + dropped > 0 && fix & FIX_ERRORS) {
      // A table that looks like garbage is left as it is (IDs and names that are not UTF-8
      // would be rewritten as U+FFFD; L1 tables outside the file would be kept).
      const lossy = suspectSnapshotTable(layout, await backend.size(), p.cs);
      const header = lossy ? undefined : await rewriteSnapshotTable(p, layout);
      if (header === undefined) {
        log(
          "error",
          lossy
            ? "ERROR failed to update the snapshot table: its entries do not look like snapshots"
            : "ERROR failed to update the snapshot table: no usable refcount block for it",
        );
        p.res.corruptionsFixed -= incomplete.length + dropped;
        p.res.corruptions += incomplete.length + dropped;
      } else {
        layout = { ...layout, header };
      }
    }
  } catch (e) {
    if (e instanceof CheckAbort) {
      return { res: p.res, imageEndOffset: 0, totalClusters, failure: e.message, rebuilt };
    }
    throw e;
  }
  const res = p.res;
  if (fix !== 0 && res.checkErrors === 0 && res.corruptions === 0) {
    // qcow2_mark_clean + qcow2_mark_consistent, after everything else is on disk.
    const h = layout.header;
    const incompat = h.incompatibleFeatures & ~(DIRTY | CORRUPT);
    if (incompat !== h.incompatibleFeatures) {
      await writeHeaderFields(backend, h, { incompatibleFeatures: incompat });
    }
  }
  return { res, imageEndOffset: (p.highest + 1) * cs, totalClusters, failure: undefined, rebuilt };
}

/**
 * Check a qcow2 image as `qemu-img check [-r leaks|all]` does: count every reference to
 * every host cluster (header, active and snapshot L1/L2 tables, data and compressed
 * clusters, refcount table and blocks, snapshot table, bitmaps), compare with the stored
 * refcounts up to the end of the file, check the COPIED flags, and report what qemu-img
 * reports. Never throws on corruption; throws a typed error only when the image cannot be
 * opened at all (qemu-img: "Could not open", exit 1) or on I/O failure.
 *
 * With `repair`, fixes what qemu-img fixes (leaks; with "all" also too-low refcounts,
 * COPIED flags, and a rebuild of broken refcount structures), and in "all" mode also drops
 * L1/L2 entries pointing outside the file or misaligned (listed in `lostRanges`). After a
 * repair that fixed anything, the image is checked again and the result describes that
 * second check, with the fixed counts of the first (as qemu-img).
 */
export async function checkQcow2(
  backend: BlockBackend,
  options: CheckOptions = {},
): Promise<CheckResult> {
  const fix =
    options.repair === "all" ? FIX_LEAKS | FIX_ERRORS : options.repair === "leaks" ? FIX_LEAKS : 0;
  const messages: CheckMessage[] = [];
  const log = (kind: CheckMessageKind, text: string, offset?: number): void => {
    messages.push(offset === undefined ? { kind, text } : { kind, text, offset });
  };
  const lost: LostRange[] = [];
  const filename = options.filename ?? backend.name;
  const first = await readLayout(backend);
  if (
    !AutoclearFeatures.decode(first.header.autoclearFeatures).has("bitmaps") &&
    first.extensions.some((e) => e.type === ExtensionType.bitmaps)
  ) {
    // What QEMU's open warns about before anything else.
    log("info", `warning: ${STALE_BITMAPS_WARNING}`);
  }
  await loadBitmapTables(backend, first);
  let out = await runCheck(backend, fix, log, lost);
  let repaired: CheckResult["repaired"];
  const rebuilt = out.rebuilt;
  if (out.failure === undefined && (out.res.corruptionsFixed > 0 || out.res.leaksFixed > 0)) {
    repaired = { leaks: out.res.leaksFixed, corruptions: out.res.corruptionsFixed };
    const again = await runCheck(backend, 0, log, []);
    again.res.leaksFixed = out.res.leaksFixed;
    again.res.corruptionsFixed = out.res.corruptionsFixed;
    out = again;
  }
  const r = out.res;
  const base = {
    checkErrors: r.checkErrors,
    corruptions: r.corruptions,
    leaks: r.leaks,
    failure: out.failure,
  };
  return {
    filename,
    format: "qcow2",
    ...base,
    corruptionsFixed: r.corruptionsFixed,
    leaksFixed: r.leaksFixed,
    imageEndOffset: out.failure === undefined ? out.imageEndOffset : 0,
    totalClusters: out.totalClusters,
    allocatedClusters: r.allocated,
    fragmentedClusters: r.fragmented,
    compressedClusters: r.compressed,
    messages,
    repaired,
    lostRanges: lost,
    rebuilt,
    exitCode: checkExitCode(base),
  };
}

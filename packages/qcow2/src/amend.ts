/**
 * Changing the options of an existing image (QEMU's qcow2_amend_options, `qemu-img amend`):
 * the compatibility level (upgrade to version 3; downgrade to version 2, which turns zero
 * clusters into data clusters), lazy refcounts, the refcount width, the external data file's
 * name and raw flag, and the virtual size.
 *
 * Steps run in QEMU's order (upgrade, refcount width, data file, lazy refcounts, size,
 * downgrade), but every refusal QEMU would give at any step is checked before the first change,
 * so a refused amend leaves the file as it was.
 *
 * Crash safety: each step writes its new structures into free clusters, syncs, and then
 * switches to them with one header write (a field-level write in the first sector, or a header
 * area rewrite through header-update.ts); old structures are freed only afterwards. A crash
 * leaves the old or the new state plus at worst leaked clusters.
 */
import { createClusterCounts, rebuildRefcounts } from "@qimg/refcount";
import { InvalidArgumentError, UnsupportedFeatureError, hex } from "@qimg/structs";
import {
  AutoclearFeatures,
  CompatibleFeatures,
  CompressionType,
  IncompatibleFeatures,
} from "./spec/header.js";
import type { Qcow2Header } from "./spec/header.js";
import { ExtensionType, encodeFeatureNames, encodeStringExtension } from "./spec/extensions.js";
import type { HeaderExtension } from "./spec/extensions.js";
import { FEATURE_NAMES } from "./spec/header.js";
import { encodeSnapshotTable } from "./spec/snapshot.js";
import type { SnapshotEntry } from "./spec/snapshot.js";
import { ClusterType, OFLAG_COPIED, l2OffsetAt } from "./spec/l2.js";
import { HEADER_FILLER_EXTENSION, rewriteHeaderArea } from "./header-update.js";
import { buildMetadataMap, updateHeader } from "./overlap.js";
import { checkWritable, hasBackingFile } from "./state.js";
import type { Qcow2State, WriteState } from "./state.js";
import { flushLocked } from "./flush.js";
import { resizeImage, resizeWith } from "./resize.js";
import { walkTables } from "./walk.js";
import { removeBitmap } from "./bitmap-manage.js";
import { openRefcounts } from "./open-write.js";

/** What `qemu-img amend -o` can change on a qcow2 image; options left undefined are kept. */
export interface Qcow2AmendOptions {
  /** Compatibility level: "0.10" or "v2" (version 2), "1.1" or "v3" (version 3). */
  readonly compat?: string | undefined;
  /** Lazy refcounts (version 3 only). */
  readonly lazyRefcounts?: boolean | undefined;
  /** Refcount width in bits: a power of two, 1..64 (version 2 holds only 16). */
  readonly refcountBits?: number | undefined;
  /**
   * The backing file name: as QEMU 7.2, amend refuses to change it ("Cannot amend the
   * backing file"; use rebase); giving the current name is accepted and changes nothing.
   */
  readonly backingFile?: string | undefined;
  /** The backing file format, under the same rule as `backingFile`. */
  readonly backingFormat?: string | undefined;
  /** New name of the external data file (only for images that have one; "" drops the name). */
  readonly dataFile?: string | undefined;
  /** data_file_raw: may only be turned off (QEMU refuses to set it on an existing image). */
  readonly dataFileRaw?: boolean | undefined;
  /**
   * New virtual size in bytes (a multiple of 512); 0 or undefined keeps the size. A smaller
   * size shrinks the disk (data past the new end is lost), as qemu-img amend does.
   */
  readonly size?: number | undefined;
  /** Progress: `done` of `total` work units (QEMU's amend status callback). */
  readonly onProgress?: ((done: number, total: number) => void) | undefined;
}

/** Refcount widths QEMU accepts. */
function validWidth(bits: number): boolean {
  return Number.isInteger(bits) && bits >= 1 && bits <= 64 && (bits & (bits - 1)) === 0;
}

/** The version a compat string names, or an error in qemu-img's words. */
export function compatVersion(compat: string): 2 | 3 {
  if (compat === "0.10" || compat === "v2") return 2;
  if (compat === "1.1" || compat === "v3") return 3;
  throw new InvalidArgumentError(`Unknown compatibility level ${compat}`);
}

/** Feature-name table as qemu-img writes it (create.ts writes the same). */
const FEATURE_TABLE = encodeFeatureNames([
  ...FEATURE_NAMES.incompatible.map((name, bit) => ({ type: "incompatible" as const, bit, name })),
  ...FEATURE_NAMES.compatible.map((name, bit) => ({ type: "compatible" as const, bit, name })),
  ...FEATURE_NAMES.autoclear.map((name, bit) => ({ type: "autoclear" as const, bit, name })),
]);

/** Largest cluster size without a feature-name table (create.ts: NO_FEATURE_TABLE_MAX_CLUSTER). */
const NO_FEATURE_TABLE_MAX_CLUSTER = 4096;

const DIRTY = IncompatibleFeatures.maskOf("dirty");
const ZSTD_BIT = IncompatibleFeatures.maskOf("compressionType");
const LAZY = CompatibleFeatures.maskOf("lazyRefcounts");
const RAW_DATA = AutoclearFeatures.maskOf("rawExternalData");

/** What one amend will do, decided (and refused) before anything changes. */
interface Plan {
  upgrade: boolean;
  downgrade: boolean;
  newOrder: number | undefined;
  clearRaw: boolean;
  dataFile: string | undefined;
  lazy: boolean | undefined;
  size: number | undefined;
}

/**
 * Amend `s` (opened read-write) as qemu-img amend does; see {@link Qcow2AmendOptions}. Every
 * refusal (QEMU's wording) comes before the first write.
 */
export async function amendImage(s: Qcow2State, o: Qcow2AmendOptions): Promise<void> {
  const w = checkWritable(s);
  await w.claims.drain();
  const plan = await w.meta.run(async () => {
    await flushLocked(s);
    await w.refcountCache.flush();
    return planAmend(s, w, o);
  });
  const total =
    (plan.upgrade ? 1 : 0) + (plan.newOrder !== undefined ? 1 : 0) + (plan.downgrade ? 1 : 0) + 1;
  let done = 0;
  const report = (fraction: number): void => o.onProgress?.(done + fraction, total);
  report(0);
  await w.meta.run(async () => {
    if (plan.upgrade) {
      await upgrade(s, w);
      done++;
      report(0);
    }
    if (plan.newOrder !== undefined) {
      await changeRefcountOrder(s, plan.newOrder);
      done++;
      report(0);
    }
    if (plan.clearRaw && (s.hdr.autoclearFeatures & RAW_DATA) !== 0n) {
      await updateHeader(s, { autoclearFeatures: s.hdr.autoclearFeatures & ~RAW_DATA });
      setState(s, { dataFileRaw: false });
    }
    if (plan.dataFile !== undefined) await renameDataFile(s, plan.dataFile);
    if (plan.lazy !== undefined) await setLazy(s, plan.lazy);
  });
  // The size changes before a downgrade, as in QEMU (resize takes the metadata lock itself).
  if (plan.size !== undefined && plan.size !== s.size) {
    // A smaller size shrinks as QEMU's truncate does (resize.ts): amend needs no --shrink.
    if (plan.size < s.size) await resizeWith(s, plan.size, { shrink: true });
    else await resizeImage(s, plan.size);
  }
  if (plan.downgrade) {
    await w.claims.drain();
    await w.meta.run(async () => {
      await flushLocked(s);
      await downgrade(s, report);
    });
    done++;
  }
  o.onProgress?.(total, total);
}

/** Decide what to do and refuse what QEMU refuses, before anything is written. */
async function planAmend(s: Qcow2State, w: WriteState, o: Qcow2AmendOptions): Promise<Plan> {
  const h = s.hdr;
  const oldVersion = h.version;
  const newVersion = o.compat === undefined ? oldVersion : compatVersion(o.compat);
  const bits = o.refcountBits;
  if (bits !== undefined && !validWidth(bits)) {
    throw new InvalidArgumentError(
      "Refcount width must be a power of two and may not exceed 64 bits",
    );
  }
  if (o.dataFile !== undefined && !s.hasDataFile) {
    throw new InvalidArgumentError(
      "data-file can only be set for images that use an external data file",
    );
  }
  if (o.dataFileRaw === true && !s.dataFileRaw) {
    throw new InvalidArgumentError("data-file-raw cannot be set on existing images");
  }
  const oldBits = 2 ** h.refcountOrder;
  const newOrder = bits !== undefined && bits !== oldBits ? Math.log2(bits) : undefined;
  if (newOrder !== undefined) {
    if (newVersion < 3 && bits !== 16) {
      throw new InvalidArgumentError(
        "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
      );
    }
    await checkNarrowing(s, w, bits!);
  }
  if (o.backingFile !== undefined || o.backingFormat !== undefined) {
    if (o.backingFile !== s.backingFilename || o.backingFormat !== s.backingFormat) {
      throw new InvalidArgumentError("Cannot amend the backing file");
    }
  }
  const lazyNow = (h.compatibleFeatures & LAZY) !== 0n && h.version === 3;
  const lazy =
    o.lazyRefcounts === undefined || o.lazyRefcounts === lazyNow ? undefined : o.lazyRefcounts;
  if (lazy === true && newVersion < 3) {
    throw new InvalidArgumentError(
      "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
    );
  }
  let size: number | undefined;
  if (o.size !== undefined && o.size !== 0) {
    if (!Number.isSafeInteger(o.size) || o.size < 0 || o.size % 512 !== 0) {
      throw new InvalidArgumentError("The new size must be a multiple of 512");
    }
    // The size changes after an upgrade and before a downgrade.
    if (o.size !== s.size && oldVersion === 2 && newVersion === 2 && s.snapshots.length > 0) {
      throw new InvalidArgumentError("Can't resize a v2 image which has snapshots");
    }
    size = o.size;
  }
  const downgrade = newVersion < oldVersion;
  if (downgrade) {
    if ((newOrder ?? h.refcountOrder) !== 4) {
      throw new UnsupportedFeatureError("compat=0.10 requires refcount_bits=16", ["refcount_bits"]);
    }
    if (s.hasDataFile) {
      throw new UnsupportedFeatureError("Cannot downgrade an image with a data file", [
        "data file",
      ]);
    }
    const finalSize = size ?? s.size;
    for (const snap of s.snapshots) {
      if (snap.vmStateSize > 0xffff_ffff || (snap.diskSize ?? s.size) !== finalSize) {
        throw new UnsupportedFeatureError("Internal snapshots prevent downgrade of image", [
          "snapshots",
        ]);
      }
    }
    const incompat = h.incompatibleFeatures & ~DIRTY & ~ZSTD_BIT;
    if (incompat !== 0n) {
      throw new UnsupportedFeatureError(
        `Cannot downgrade an image with incompatible features 0x${incompat.toString(16)} set`,
        ["incompatible features"],
      );
    }
    if (h.compressionType !== CompressionType.zlib && (await hasCompressedClusters(s))) {
      throw new UnsupportedFeatureError(
        "Cannot downgrade an image with zstd compression type and existing compressed clusters",
        ["zstd"],
      );
    }
  }
  return {
    upgrade: newVersion > oldVersion,
    downgrade,
    newOrder,
    clearRaw: o.dataFileRaw === false,
    dataFile: o.dataFile,
    lazy,
    size,
  };
}

/** Writable view of state fields that amend replaces (they are read-only to other modules). */
function setState(s: Qcow2State, fields: Partial<Record<string, unknown>>): void {
  Object.assign(s, fields);
}

/** Refuse a width too narrow for an existing refcount, with QEMU's numbers. */
async function checkNarrowing(s: Qcow2State, w: WriteState, bits: number): Promise<void> {
  if (bits >= 2 ** s.hdr.refcountOrder) return;
  const max = bits === 64 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
  const counts = await readAllRefcounts(s, w);
  for (let c = 0; c < counts.length; c++) {
    const v = counts[c] ?? 0;
    if (v > max) {
      throw new InvalidArgumentError(
        `Cannot decrease refcount entry width to ${bits} bits: Cluster at offset ${hex(c * s.clusterSize)} has a refcount of ${v}`,
      );
    }
  }
}

/** The refcount of every cluster of the file (and the one after an unaligned end). */
async function readAllRefcounts(s: Qcow2State, w: WriteState): Promise<Float64Array> {
  const fileSize = await s.backend.size();
  const n = Math.ceil(fileSize / s.clusterSize);
  const counts = new Float64Array(n);
  if (n > 0) await w.refcounts.readRange(0, counts);
  return counts;
}

/** True when any L2 table (active or a snapshot's) holds a compressed cluster. */
async function hasCompressedClusters(s: Qcow2State): Promise<boolean> {
  let found = false;
  await walkTables(
    { backend: s.backend, format: s.fmt, fileSize: await s.backend.size() },
    { offset: s.hdr.l1TableOffset, size: s.hdr.l1Size },
    s.snapshots,
    {
      l1Entry: () => !found,
      l2Entry: (c) => {
        if (c.type === ClusterType.Compressed) found = true;
      },
    },
  );
  return found;
}

// ------------------------------------------------------------------------ refcount width

/**
 * Rebuild the refcount structures at width 2^`order` (QEMU's qcow2_change_refcount_order):
 * the current refcounts (leaks included) are copied into a new table and new blocks past the
 * end of the file, synced; one header write switches refcount_order, the table offset and its
 * size together; the old table and blocks are left out of the new counts, so they are free.
 */
async function changeRefcountOrder(s: Qcow2State, order: number): Promise<void> {
  const w = s.w!;
  const cs = s.clusterSize;
  const old = await readAllRefcounts(s, w);
  const counts = createClusterCounts(2 ** order, old.length);
  for (let c = 0; c < old.length; c++) counts[c] = old[c] ?? 0;
  const drop = (offset: number, clusters: number): void => {
    const first = offset / cs;
    for (let c = first; c < first + clusters && c < counts.length; c++) counts[c] = 0;
  };
  drop(s.hdr.refcountTableOffset, s.hdr.refcountTableClusters);
  for (let i = 0; i < w.refcounts.tableEntries; i++) {
    const b = w.refcounts.blockOffset(i);
    if (b !== 0) drop(b, 1);
  }
  await rebuildRefcounts({
    backend: s.backend,
    clusterBits: s.clusterBits,
    refcountOrder: order,
    counts,
    onTableMoved: async (tableOffset, tableClusters) => {
      await updateHeader(s, {
        refcountTableOffset: tableOffset,
        refcountTableClusters: tableClusters,
        refcountOrder: order,
      });
    },
  });
  await reopenRefcounts(s);
}

/** New refcount cache and structures from the header (after the refcount table moved). */
async function reopenRefcounts(s: Qcow2State): Promise<void> {
  const w = s.w!;
  s.fileSize = await s.backend.size();
  const { refcounts, refcountCache } = await openRefcounts(s, w.writethrough && !w.lazy);
  Object.assign(w, { refcounts, refcountCache });
  if (!w.lazy) s.l2Cache.dependOn(refcountCache);
  buildMetadataMap(s);
}

// ------------------------------------------------------------------------ header area

/** The header area as it is now, for a rewrite with `header` and `extensions`. */
async function rewriteArea(
  s: Qcow2State,
  header: Qcow2Header,
  extensions: readonly { type: number; data: Uint8Array }[],
): Promise<void> {
  const exts = extensions.filter((e) => e.type !== HEADER_FILLER_EXTENSION);
  s.hdr = await rewriteHeaderArea(s.backend, {
    header,
    extensions: exts,
    backingFile: s.backingFilename,
  });
  setState(s, {
    extensions: exts.map((e): HeaderExtension => ({ type: e.type, offset: 0, data: e.data })),
  });
}

/** Rename the external data file (an empty name drops the extension, as QEMU). */
async function renameDataFile(s: Qcow2State, name: string): Promise<void> {
  const exts = s.extensions.filter((e) => e.type !== ExtensionType.externalDataFile);
  const at = s.extensions.findIndex((e) => e.type === ExtensionType.externalDataFile);
  const next: { type: number; data: Uint8Array }[] = [...exts];
  if (name !== "") {
    next.splice(at < 0 ? next.length : at, 0, {
      type: ExtensionType.externalDataFile,
      data: encodeStringExtension(name),
    });
  }
  await rewriteArea(s, s.hdr, next);
  setState(s, { dataFileName: name === "" ? undefined : name });
}

// ------------------------------------------------------------------------ lazy refcounts

async function setLazy(s: Qcow2State, on: boolean): Promise<void> {
  const w = s.w!;
  if (on) {
    await updateHeader(s, { compatibleFeatures: s.hdr.compatibleFeatures | LAZY });
    return;
  }
  await markClean(s);
  await updateHeader(s, { compatibleFeatures: s.hdr.compatibleFeatures & ~LAZY });
  if (w.lazy) {
    Object.assign(w, { lazy: false });
    s.l2Cache.dependOn(w.refcountCache);
  }
}

/** QEMU's qcow2_mark_clean: refcounts on disk, then the dirty bit cleared. */
async function markClean(s: Qcow2State): Promise<void> {
  const w = s.w!;
  await w.refcountCache.flush();
  await s.backend.flush();
  if ((s.hdr.incompatibleFeatures & DIRTY) !== 0n) {
    await updateHeader(s, { incompatibleFeatures: s.hdr.incompatibleFeatures & ~DIRTY });
  }
  w.dirtyOnDisk = false;
}

// ------------------------------------------------------------------------ version changes

/** Version 2 to 3 (QEMU's qcow2_upgrade): snapshot entries get v3 extra data, then the header. */
async function upgrade(s: Qcow2State, w: WriteState): Promise<void> {
  const cs = s.clusterSize;
  let snapshotsOffset = s.hdr.snapshotsOffset;
  let oldTable: [number, number] | undefined;
  let snapshots: readonly SnapshotEntry[] = s.snapshots;
  if (s.snapshots.some((e) => e.extraData.byteLength < 16)) {
    snapshots = s.snapshots.map((e) => {
      if (e.extraData.byteLength >= 16) return e;
      const extra = new Uint8Array(24);
      const dv = new DataView(extra.buffer);
      dv.setBigUint64(0, BigInt(e.vmStateSize), false);
      dv.setBigUint64(8, BigInt(e.diskSize ?? s.size), false);
      dv.setBigUint64(16, e.icount ?? 0xffff_ffff_ffff_ffffn, false);
      return { ...e, extraData: extra, diskSize: e.diskSize ?? s.size };
    });
    const table = encodeSnapshotTable(snapshots);
    const clusters = Math.ceil(table.byteLength / cs);
    const at = await w.refcounts.allocate(clusters);
    await w.refcountCache.flush();
    const padded = new Uint8Array(clusters * cs);
    padded.set(table);
    await s.backend.write(at, padded);
    await s.backend.flush();
    const last = s.snapshots[s.snapshots.length - 1]!;
    const enc = new TextEncoder();
    const oldEnd =
      last.offset +
      40 +
      last.extraData.byteLength +
      enc.encode(last.id).byteLength +
      enc.encode(last.name).byteLength;
    oldTable = [s.hdr.snapshotsOffset, Math.ceil((oldEnd - s.hdr.snapshotsOffset) / cs)];
    snapshotsOffset = at;
  }
  const exts = s.extensions.filter((e) => e.type !== ExtensionType.featureNameTable);
  const next: { type: number; data: Uint8Array }[] = [...exts];
  if (cs > NO_FEATURE_TABLE_MAX_CLUSTER) {
    next.push({ type: ExtensionType.featureNameTable, data: FEATURE_TABLE });
  }
  await rewriteArea(s, { ...plainHeader(s.hdr, 3), snapshotsOffset }, next);
  if (oldTable !== undefined) {
    // The table moved: the snapshots are the same, at new offsets.
    let pos = snapshotsOffset;
    const enc = new TextEncoder();
    setState(s, {
      snapshots: snapshots.map((e) => {
        const entry = { ...e, offset: pos };
        const len =
          40 + e.extraData.byteLength + enc.encode(e.id).byteLength + enc.encode(e.name).byteLength;
        pos += Math.ceil(len / 8) * 8;
        return entry;
      }),
    });
    await w.refcounts.free(oldTable[0], oldTable[1]);
    await w.refcountCache.flush();
  }
  buildMetadataMap(s);
}

/**
 * `header` as a plain image of `version` has it when the version changes: the version's own
 * header length, no feature bits, 16-bit refcounts, zlib, no extra header bytes.
 */
function plainHeader(header: Qcow2Header, version: 2 | 3): Qcow2Header {
  return {
    ...header,
    version,
    headerLength: version === 3 ? 112 : 72,
    compressionType: 0,
    extraBytes: new Uint8Array(0),
    refcountOrder: 4,
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
  };
}

/**
 * Version 3 to 2 (QEMU's qcow2_downgrade): the image is made clean, zero clusters become
 * data clusters (or unallocated ones without a backing file), and the header area is
 * rewritten as version 2 (no feature bits, no feature-name table, 16-bit refcounts, zlib).
 */
async function downgrade(s: Qcow2State, progress: (fraction: number) => void): Promise<void> {
  if (s.pbm && s.pbm.list().length > 0) {
    // Version 2 has no autoclear bits, so its bitmaps would be left unmaintained: QEMU keeps
    // their directory in the header and their clusters leaked; qimg removes them first (one
    // crash-safe header-area switch, then their clusters are freed).
    for (const b of s.pbm.list()) removeBitmap(s, b.name);
    await s.pbm.store();
  }
  await markClean(s);
  await expandZeroClusters(s, progress);
  const exts = s.extensions.filter(
    (e) => e.type !== ExtensionType.featureNameTable && e.type !== ExtensionType.bitmaps,
  );
  await rewriteArea(s, plainHeader(s.hdr, 2), exts);
  const w = s.w!;
  if (w.lazy) {
    Object.assign(w, { lazy: false });
    s.l2Cache.dependOn(w.refcountCache);
  }
}

/**
 * QEMU's qcow2_expand_zero_clusters, over the active and every snapshot's L2 tables (each
 * table once): a zero cluster without a host cluster becomes unallocated when no backing file
 * shows through, else a newly allocated cluster of zeros; one with a host cluster gets zeros
 * written there. Per table: refcounts, then the zero data, a sync, then the table, a sync.
 */
async function expandZeroClusters(
  s: Qcow2State,
  progress: (fraction: number) => void,
): Promise<void> {
  const w = s.w!;
  const cs = s.clusterSize;
  await s.l2Cache.flush();
  s.l2Cache.clear();
  const backed = hasBackingFile(s);
  const seen = new Set<number>();
  let l2Refcount = 1;
  let pending: { index: number; type: ClusterType }[] = [];
  const zeros = new Uint8Array(cs);
  const tables = 1 + s.snapshots.length;
  let tableNo = 0;
  await walkTables(
    { backend: s.backend, format: s.fmt, fileSize: await s.backend.size() },
    { offset: s.hdr.l1TableOffset, size: s.hdr.l1Size },
    s.snapshots,
    {
      l1Table: (c) => {
        tableNo = c.snapshot === undefined ? 0 : c.snapshot + 1;
        progress(tableNo / tables);
      },
      l1Entry: async (c) => {
        if (c.l2Offset === 0 || seen.has(c.l2Offset)) return false;
        seen.add(c.l2Offset);
        l2Refcount = Math.max(1, await w.refcounts.get(c.l2Offset / cs));
        pending = [];
        progress((tableNo + c.index / Math.max(1, c.tableSize)) / tables);
        return true;
      },
      l2Entry: (c) => {
        if (c.type === ClusterType.ZeroPlain || c.type === ClusterType.ZeroAlloc) {
          pending.push({ index: c.index, type: c.type });
        }
      },
      l2TableDone: async (c) => {
        if (pending.length === 0) return;
        const dataAt: number[] = [];
        for (const p of pending) {
          const word = p.index * s.fmt.stride;
          if (p.type === ClusterType.ZeroPlain && !backed) {
            c.table.setWords(word, 0, 0);
            continue;
          }
          let host = 0;
          if (p.type === ClusterType.ZeroAlloc) {
            const off = l2OffsetAt(s.fmt, c.table, p.index);
            const ref = await w.refcounts.get(off / cs);
            if (ref <= l2Refcount) host = off;
            else await w.refcounts.update(off / cs, -l2Refcount);
          }
          if (host === 0) {
            host = await w.refcounts.allocate(1);
            if (l2Refcount > 1) await w.refcounts.update(host / cs, l2Refcount - 1);
          }
          dataAt.push(host);
          const copied = l2Refcount === 1 ? OFLAG_COPIED.hi : 0;
          c.table.setWords(word, Math.floor(host / 2 ** 32) | copied, host >>> 0);
        }
        await w.refcountCache.flush();
        for (const at of dataAt) await s.backend.write(at, zeros);
        await s.backend.flush();
        await s.backend.write(c.tableOffset, c.table.bytes.subarray(0, cs));
        await s.backend.flush();
        c.invalidate();
        pending = [];
      },
    },
  );
  s.fileSize = await s.backend.size();
  buildMetadataMap(s);
}

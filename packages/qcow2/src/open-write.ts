/**
 * The write side of a read-write open: refcounts and their cache, the repair of a dirty image,
 * autoclear bits, persistent bitmaps, and the metadata map the overlap checks use.
 */
import { InvalidArgumentError } from "@qimg/structs";
import { ClusterCache } from "@qimg/cluster-cache";
import { Refcounts } from "@qimg/refcount";
import { AutoclearFeatures, CompatibleFeatures, IncompatibleFeatures } from "./spec/header.js";
import { defaultCompress } from "./compress.js";
import {
  Meta,
  MetadataMap,
  buildMetadataMap,
  checkOverlap,
  refreshRefcountBlocks,
  updateHeader,
} from "./overlap.js";
import { PersistentBitmaps } from "./bitmap.js";
import { ExtensionType } from "./spec/extensions.js";
import { rewriteHeaderArea } from "./header-update.js";
import type { BitmapHost } from "./bitmap.js";
import { walkTables } from "./walk.js";
import { guarded, newWriteState } from "./state.js";
import type { Qcow2State } from "./state.js";
import { rebuildRefcountStructures } from "./dirty.js";
import type { Qcow2OpenOptions } from "./types.js";

/** Set up the write side: refcounts, caches, repair of a dirty image, autoclear bits. */
export async function initWrite(s: Qcow2State, options: Qcow2OpenOptions): Promise<void> {
  const cs = s.clusterSize;
  const compat = CompatibleFeatures.decode(s.hdr.compatibleFeatures);
  const lazy = options.lazyRefcounts ?? compat.has("lazyRefcounts");
  if (lazy && s.hdr.version === 2) {
    throw new InvalidArgumentError(
      "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
    );
  }
  // Persistent bitmaps are checked before anything is written: a refused open changes nothing.
  await loadBitmaps(s);
  s.readOnly = false;
  await dropStaleBitmaps(s);
  // Autoclear features we do not maintain (unknown ones) are cleared before anything is
  // written; persistent bitmaps are maintained (bitmap.ts), so their bit stays.
  const keep = AutoclearFeatures.maskOf("rawExternalData") | AutoclearFeatures.maskOf("bitmaps");
  if ((s.hdr.autoclearFeatures & ~keep) !== 0n) {
    await updateHeader(s, { autoclearFeatures: s.hdr.autoclearFeatures & keep });
  }
  // A dirty image (lazy refcounts, not closed cleanly) has stale refcounts: rebuild them
  // from the references, as QEMU does when it opens such an image read-write.
  if (IncompatibleFeatures.decode(s.hdr.incompatibleFeatures).has("dirty")) {
    await rebuildRefcountStructures(s);
    await updateHeader(s, {
      incompatibleFeatures: s.hdr.incompatibleFeatures & ~IncompatibleFeatures.maskOf("dirty"),
    });
  }
  const { refcounts, refcountCache } = await openRefcounts(
    s,
    (options.writethrough ?? false) && !lazy,
    options.refcountCacheBytes,
  );
  // Refcount blocks reach the disk before the L2 entries that use them (unless lazy).
  if (!lazy) s.l2Cache.dependOn(refcountCache);
  s.l2Cache.writethrough = options.writethrough ?? false;
  s.w = newWriteState({
    refcounts,
    refcountCache,
    lazy,
    compress: options.compress ?? defaultCompress,
    metadata: new MetadataMap(cs),
    inactiveL2: await snapshotL2Tables(s),
    writethrough: options.writethrough ?? false,
  });
  buildMetadataMap(s);
  // Bitmaps are marked in use on disk before any guest write.
  await s.pbm?.markInUse();
}

/**
 * A refcount cache and the refcount structures the header names. Table entries are written in
 * place; a grown table and its blocks go to free clusters, and the header follows the table.
 * Lazy refcounts stay cached even under writethrough (see flushLocked), so callers pass
 * `writethrough && !lazy`.
 */
export async function openRefcounts(
  s: Qcow2State,
  writethrough: boolean,
  cacheBytes?: number,
): Promise<{ refcounts: Refcounts; refcountCache: ClusterCache }> {
  const cs = s.clusterSize;
  const refcountCache = new ClusterCache({
    backend: guarded(s, Meta.refcountBlock),
    tableSize: cs,
    capacity: Math.max(4, Math.floor((cacheBytes ?? Math.max(256 * 1024, 4 * cs)) / cs)),
    name: "refcount",
    writethrough,
  });
  const refcounts = await Refcounts.open({
    backend: guarded(s, Meta.refcountTable),
    cache: refcountCache,
    clusterBits: s.clusterBits,
    refcountOrder: s.hdr.refcountOrder,
    tableOffset: s.hdr.refcountTableOffset,
    tableClusters: s.hdr.refcountTableClusters,
    onTableMoved: async (tableOffset, tableClusters) => {
      await updateHeader(s, {
        refcountTableOffset: tableOffset,
        refcountTableClusters: tableClusters,
      });
      if (s.w) buildMetadataMap(s);
    },
  });
  return { refcounts, refcountCache };
}

/**
 * A bitmaps extension without its autoclear bit (a program lacking bitmap support wrote the
 * image; see STALE_BITMAPS_WARNING) describes no bitmap anyone may trust: a read-write open
 * drops it, as QEMU's does, with one crash-safe header-area rewrite. The bitmaps' clusters
 * stay allocated (leaked) until `check -r` frees them, as with QEMU.
 */
async function dropStaleBitmaps(s: Qcow2State): Promise<void> {
  if ((s.hdr.autoclearFeatures & AutoclearFeatures.maskOf("bitmaps")) !== 0n) return;
  if (!s.extensions.some((e) => e.type === ExtensionType.bitmaps)) return;
  const extensions = s.extensions.filter((e) => e.type !== ExtensionType.bitmaps);
  s.hdr = await rewriteHeaderArea(s.backend, {
    header: s.hdr,
    extensions,
    backingFile: s.backingFilename,
  });
  const m = s as { -readonly [K in keyof Qcow2State]: Qcow2State[K] };
  m.extensions = extensions;
  m.bitmapDirectory = undefined;
  m.bitmaps = [];
}

/** Load and check the persistent bitmaps (nothing is written yet). */
export async function loadBitmaps(s: Qcow2State): Promise<void> {
  if (!s.bitmapDirectory || s.bitmaps.length === 0) return;
  if ((s.hdr.autoclearFeatures & AutoclearFeatures.maskOf("bitmaps")) === 0n) return;
  s.pbm = await PersistentBitmaps.load(bitmapStoreHost(s), s.bitmapDirectory, s.bitmaps, s.size);
}

/**
 * The bitmap store's hooks into a writable image: clusters come from (and go back to) the
 * refcounts, `sync` puts refcount blocks on disk before what uses them, the autoclear bit is
 * switched through the header, and directory writes pass the overlap check. Callers that
 * rewrite the directory add `switchDirectory`.
 */
export function bitmapStoreHost(s: Qcow2State): BitmapHost {
  const cs = s.clusterSize;
  const bit = AutoclearFeatures.maskOf("bitmaps");
  return {
    backend: s.backend,
    clusterSize: cs,
    allocate: async (n) => {
      const h = await s.w!.refcounts.allocate(n);
      refreshRefcountBlocks(s, h + n * cs);
      s.fileSize = Math.max(s.fileSize, h + n * cs);
      return h;
    },
    free: (offset, n) => s.w!.refcounts.free(offset, n),
    sync: async () => {
      await s.w!.refcountCache.flush();
      await s.backend.flush();
    },
    setAutoclear: (on) =>
      updateHeader(s, {
        autoclearFeatures: on ? s.hdr.autoclearFeatures | bit : s.hdr.autoclearFeatures & ~bit,
      }),
    checkDirectoryWrite: (offset, length) => checkOverlap(s, offset, length, Meta.bitmapDirectory),
  };
}

/**
 * Offsets of the L2 tables the snapshots' L1 tables point at, each once. Each distinct L1
 * table is read once, and at most 256 MiB of them in all (a hostile snapshot table could name
 * the same large table a million times); past that budget snapshots' L2 tables go unchecked,
 * as QEMU never checks them by default.
 */
export async function snapshotL2Tables(s: Qcow2State): Promise<number[]> {
  const cs = s.clusterSize;
  const out = new Set<number>();
  const seen = new Set<string>();
  let budget = 256 * 1024 * 1024;
  const src = { backend: s.backend, format: s.fmt, fileSize: s.fileSize };
  // Only the snapshots' L1 tables (the active one has size 0 here); no L2 table is read.
  await walkTables(src, { offset: 0, size: 0 }, s.snapshots, {
    l1Table: (c) => {
      if (c.snapshot === undefined) return false;
      const bytes = c.tableSize * 8;
      const key = `${c.tableOffset}:${bytes}`;
      if (bytes === 0 || seen.has(key) || bytes > budget) return false;
      if (c.tableOffset % cs !== 0 || c.tableOffset + bytes > s.fileSize) return false;
      seen.add(key);
      budget -= bytes;
      return true;
    },
    l1Entry: (c) => {
      const off = c.l2Offset;
      if (off !== 0 && off % cs === 0 && off < s.fileSize) out.add(off);
      return false;
    },
  });
  return [...out];
}

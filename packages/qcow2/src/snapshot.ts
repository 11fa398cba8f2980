/**
 * Internal snapshots (QEMU's qcow2-snapshot.c): create, apply, delete, and a read-only view of
 * a snapshot. A snapshot is an L1 table of its own plus an entry in the snapshot table; every
 * cluster its tables reach holds one more reference, so the driver's copy on write (COPIED
 * flags, refcount > 1) keeps it intact while the active image changes.
 *
 * Crash safety: references are raised and on disk before anything points at them, the new
 * snapshot table is written to fresh clusters and synced, and the header's snapshot count and
 * table offset switch in one 12-byte write (header-update.ts). A crash at any point leaves the
 * old or the new table in effect; what it can leave behind is leaked clusters or stale COPIED
 * flags, both of which `qemu-img check -r all` repairs (as with QEMU).
 */
import {
  CorruptImageError,
  InvalidArgumentError,
  UnsupportedFeatureError,
  U64TableView,
  hex,
} from "@qimg/structs";
import type { BlockStatus, DiskImage } from "@qimg/io";
import {
  MAX_SNAPSHOT_L1_ENTRIES,
  SnapshotExtra,
  decodeSnapshotTable,
  encodeSnapshotTable,
} from "./spec/snapshot.js";
import { MAX_SNAPSHOTS } from "./spec/header.js";
import type { SnapshotEntry } from "./spec/snapshot.js";
import {
  ClusterType,
  compressedLength,
  compressedOffset,
  entryCopied,
  entryOffset,
  withCopied,
} from "./spec/l2.js";
import { walkL1Table } from "./walk.js";
import {
  Meta,
  buildMetadataMap,
  checkOverlap,
  refreshRefcountBlocks,
  updateHeader,
} from "./overlap.js";
import { flushLocked } from "./flush.js";
import { snapshotL2Tables } from "./open-write.js";
import { Qcow2State, checkOpen, checkWritable } from "./state.js";
import { guestBlockStatus, guestRead } from "./cluster-map.js";
import { listBitmaps } from "./bitmap-manage.js";
import type { Qcow2Image } from "./image.js";

/** QEMU's QCOW_MAX_SNAPSHOTS_SIZE: the largest snapshot table (bytes). */
export const MAX_SNAPSHOT_TABLE_BYTES = 1024 * MAX_SNAPSHOTS;
/** Last guest cluster index a claim on the whole disk covers (any disk qcow2 can address). */
const ALL_CLUSTERS = 2 ** 52;

/** Longest snapshot name or ID in the table (the entry stores u16 byte lengths). */
export const MAX_SNAPSHOT_STRING_BYTES = 0xffff;

/** Which snapshot: QEMU's (id, name) pair; when both are given, both must match. */
export interface SnapshotSelector {
  /** The snapshot's unique ID string. */
  readonly id?: string | undefined;
  /** The snapshot's name. */
  readonly name?: string | undefined;
}

/** Options of {@link Qcow2Image.createSnapshot}. */
export interface CreateSnapshotOptions {
  /** Creation time (default: now), seconds since the epoch. */
  readonly dateSec?: number;
  /** Nanoseconds part of the creation time (default: the clock's microseconds times 1000, as QEMU). */
  readonly dateNsec?: number;
  /** Guest clock in nanoseconds (default 0: a disk-only snapshot). */
  readonly vmClockNsec?: bigint;
  /** Instruction count stored in the extra data (default 0, as qemu-img 7.2 writes). */
  readonly icount?: bigint;
}

/** Options of {@link openQcow2Snapshot}. */
export interface SnapshotViewOptions {
  /**
   * Which size the view has: `"snapshot"` (default) the disk size the snapshot recorded;
   * `"image"` the image's current size, as `qemu-img convert -l` reads a snapshot (QEMU's
   * bdrv_snapshot_load_tmp switches the L1 table only).
   */
  readonly size?: "snapshot" | "image";
}

/** An error with the errno QEMU returns for the same refusal (qemu-img prints it). */
function errnoCause(code: string, message: string): Error {
  return Object.assign(new Error(message), { code });
}

/**
 * The index of the first snapshot matching `sel` (QEMU's find_snapshot_by_id_and_name): by ID
 * and name when both are given, else by the one given; -1 when none matches.
 */
export function findSnapshot(snapshots: readonly SnapshotEntry[], sel: SnapshotSelector): number {
  if (sel.id === undefined && sel.name === undefined) return -1;
  return snapshots.findIndex(
    (s) =>
      (sel.id === undefined || s.id === sel.id) && (sel.name === undefined || s.name === sel.name),
  );
}

/**
 * The index of the snapshot `idOrName` names (QEMU's find_snapshot_by_id_or_name, what
 * `qemu-img snapshot -a` and `convert -s` use): an ID match first, else a name match; -1.
 */
export function findSnapshotByIdOrName(
  snapshots: readonly SnapshotEntry[],
  idOrName: string,
): number {
  const byId = findSnapshot(snapshots, { id: idOrName });
  return byId >= 0 ? byId : findSnapshot(snapshots, { name: idOrName });
}

function notFound(): InvalidArgumentError {
  return new InvalidArgumentError("Can't find the snapshot", {
    cause: errnoCause("ENOENT", "snapshot not found"),
  });
}

function indexOf(s: Qcow2State, sel: SnapshotSelector | string): number {
  const i =
    typeof sel === "string"
      ? findSnapshotByIdOrName(s.snapshots, sel)
      : findSnapshot(s.snapshots, sel);
  if (i < 0) throw notFound();
  return i;
}

function refuseDataFile(s: Qcow2State): void {
  if (s.hasDataFile) {
    throw new UnsupportedFeatureError(
      "qcow2 internal snapshots are not supported with an external data file",
      ["snapshots with data file"],
      { cause: errnoCause("ENOTSUP", "Operation not supported") },
    );
  }
}

/**
 * The wall clock in seconds and nanoseconds, to the microsecond where the platform has it
 * (QEMU stores gettimeofday()'s microseconds times 1000).
 */
export function wallClock(): { sec: number; nsec: number } {
  const ms =
    typeof performance !== "undefined" ? performance.timeOrigin + performance.now() : Date.now();
  const sec = Math.floor(ms / 1000);
  const usec = Math.min(999_999, Math.floor((ms - sec * 1000) * 1000));
  return { sec, nsec: usec * 1000 };
}

/** QEMU's find_new_snapshot_id: one more than the largest numeric ID (strtoul of each). */
export function newSnapshotId(snapshots: readonly SnapshotEntry[]): string {
  let max = 0n;
  for (const sn of snapshots) {
    const m = /^\s*\+?(\d+)/.exec(sn.id);
    if (m) {
      const v = BigInt(m[1]!);
      if (v > max) max = v;
    }
  }
  return String(max + 1n);
}

// ------------------------------------------------------------------------------ references

/**
 * Visit every host cluster the L1 table at `l1Offset` (`l1Size` entries, on disk) reaches,
 * once per reference: its L2 tables, their data clusters (also preallocated zero clusters)
 * and every host cluster a compressed cluster's bytes touch (QEMU's
 * qcow2_update_snapshot_refcount). Misaligned offsets name no cluster and are skipped.
 */
async function referencesOf(
  s: Qcow2State,
  l1Offset: number,
  l1Size: number,
  visit: (cluster: number) => void | Promise<void>,
): Promise<void> {
  const cs = s.clusterSize;
  const fmt = s.fmt;
  // The L2 entry callback stays synchronous (the clusters of one table are collected and
  // visited when the table is done): the walk awaits what l1Entry and l2TableDone return.
  const found: number[] = [];
  const drain = async (): Promise<void> => {
    for (const c of found) await visit(c);
    found.length = 0;
  };
  await walkL1Table(
    { backend: s.backend, format: fmt, fileSize: s.fileSize },
    l1Offset,
    l1Size,
    undefined,
    {
      l1Entry: async (c) => {
        const off = c.l2Offset;
        if (off === 0 || off % cs !== 0) return false;
        await visit(off / cs);
        return true;
      },
      l2Entry: (c) => {
        if (c.type === ClusterType.Normal || c.type === ClusterType.ZeroAlloc) {
          if (s.hasDataFile) return;
          const off = entryOffset(c.hi, c.lo);
          if (off !== 0 && off % cs === 0) found.push(off / cs);
        } else if (c.type === ClusterType.Compressed) {
          const at = compressedOffset(fmt, c.hi, c.lo);
          const first = Math.floor(at / cs);
          const last = Math.floor((at + compressedLength(fmt, c.hi, c.lo) - 1) / cs);
          for (let k = first; k <= last; k++) found.push(k);
        }
      },
      l2TableDone: drain,
    },
  );
  await drain();
}

/** Runs of consecutive clusters, applied one run at a time. */
class RunBatch {
  #start = -1;
  #len = 0;
  constructor(readonly apply: (first: number, count: number) => Promise<void>) {}

  add(cluster: number): void | Promise<void> {
    if (this.#len > 0 && cluster === this.#start + this.#len) {
      this.#len++;
      return;
    }
    const flushed = this.flush();
    this.#start = cluster;
    this.#len = 1;
    return flushed;
  }

  flush(): Promise<void> {
    if (this.#len === 0) return Promise.resolve();
    const [a, n] = [this.#start, this.#len];
    this.#len = 0;
    return this.apply(a, n);
  }
}

/**
 * Refuse (changing nothing) when one more reference to every cluster the L1 table reaches
 * would overflow a refcount (narrow refcount_bits): QEMU fails the same way, with EINVAL.
 */
async function checkNoOverflow(s: Qcow2State, l1Offset: number, l1Size: number): Promise<void> {
  const w = s.w!;
  const bits = 2 ** s.hdr.refcountOrder;
  if (bits >= 32) return;
  const max = 2 ** bits - 1;
  const adds = new Map<number, number>();
  await referencesOf(s, l1Offset, l1Size, (c) => {
    adds.set(c, (adds.get(c) ?? 0) + 1);
  });
  for (const [c, n] of adds) {
    if ((await w.refcounts.get(c)) + n > max) {
      throw new InvalidArgumentError(
        `cluster ${hex(c * s.clusterSize)} would need a refcount above ${max} (refcount_bits=${bits})`,
        { cause: errnoCause("EINVAL", "Invalid argument") },
      );
    }
  }
}

/** Add one reference (`+1`) to, or drop one (`-1`, freeing at 0) from, every cluster reached. */
async function changeReferences(
  s: Qcow2State,
  l1Offset: number,
  l1Size: number,
  delta: 1 | -1,
): Promise<void> {
  const w = s.w!;
  const cs = s.clusterSize;
  const batch = new RunBatch((first, n) =>
    delta > 0 ? w.refcounts.update(first, 1, n) : w.refcounts.free(first * cs, n),
  );
  await referencesOf(s, l1Offset, l1Size, (c) => batch.add(c));
  await batch.flush();
}

/**
 * Make every COPIED flag of the active L1 and L2 tables say whether the cluster's refcount is
 * exactly 1 (QEMU's update with addend 0). Changed L2 tables are written directly (they may
 * be shared with a snapshot, where the flags mean the same); the L1 entries go out with the
 * next flush. The refcounts must be on disk first.
 */
async function rebuildCopied(s: Qcow2State): Promise<void> {
  const w = s.w!;
  const cs = s.clusterSize;
  const refcountIs1 = async (off: number): Promise<boolean> =>
    off !== 0 && off % cs === 0 && (await w.refcounts.get(off / cs)) === 1;
  // Data entries of the current table (word index, high word, low word), decided when the
  // table is done (a synchronous l2Entry keeps the walk on its fast path).
  const data: number[] = [];
  let changed = false;
  await walkL1Table(
    { backend: s.backend, format: s.fmt, fileSize: s.fileSize },
    s.hdr.l1TableOffset,
    s.l1.length,
    undefined,
    {
      l1Entry: async (c) => {
        const want = await refcountIs1(c.l2Offset);
        if (entryCopied(c.hi) !== want) {
          s.l1.setWords(c.index, withCopied(c.hi, want), c.lo);
          w.l1DirtyLo = Math.min(w.l1DirtyLo, c.index);
          w.l1DirtyHi = Math.max(w.l1DirtyHi, c.index + 1);
        }
        changed = false;
        data.length = 0;
        return c.l2Offset % cs === 0;
      },
      l2Entry: (c) => {
        const isData = c.type === ClusterType.Normal || c.type === ClusterType.ZeroAlloc;
        if (isData && s.hasDataFile) return;
        if (isData) {
          data.push(c.word, c.hi, c.lo);
        } else if (entryCopied(c.hi)) {
          c.table.setWords(c.word, withCopied(c.hi, false), c.lo);
          changed = true;
        }
      },
      l2TableDone: async (c) => {
        for (let k = 0; k < data.length; k += 3) {
          const [word, hi, lo] = [data[k]!, data[k + 1]!, data[k + 2]!];
          const want = await refcountIs1(entryOffset(hi, lo));
          if (entryCopied(hi) !== want) {
            c.table.setWords(word, withCopied(hi, want), lo);
            changed = true;
          }
        }
        data.length = 0;
        if (!changed) return;
        changed = false;
        await checkOverlap(s, c.tableOffset, cs, Meta.activeL2 | Meta.inactiveL2);
        await s.backend.write(c.tableOffset, c.table.bytes);
        c.invalidate();
        s.l2Cache.discard(c.tableOffset);
      },
    },
  );
}

// ---------------------------------------------------------------------------- the table

/** Bytes the snapshot table takes on disk (to the end of its last entry). */
function tableBytes(s: Qcow2State): number {
  const last = s.snapshots[s.snapshots.length - 1];
  if (!last) return 0;
  const enc = new TextEncoder();
  return (
    last.offset +
    40 +
    last.extraData.byteLength +
    enc.encode(last.id).byteLength +
    enc.encode(last.name).byteLength -
    s.hdr.snapshotsOffset
  );
}

/**
 * Entries as QEMU writes them back: every entry carries the extra data up to the icount (the
 * VM state size, the disk size — the current size where none was recorded — and the icount,
 * -1 where none was recorded); unknown trailing extra data is kept.
 */
function normalized(s: Qcow2State, e: SnapshotEntry): Omit<SnapshotEntry, "offset"> {
  if (e.extraData.byteLength >= 24 && e.diskSize !== undefined) return e;
  const extra = new Uint8Array(Math.max(24, e.extraData.byteLength));
  extra.set(e.extraData);
  const diskSize = e.diskSize ?? s.hdr.size;
  const icount = e.icount ?? 0xffff_ffff_ffff_ffffn;
  SnapshotExtra.encode({ vmStateSizeLarge: e.vmStateSize, diskSize, icount }, extra);
  return { ...e, extraData: extra, diskSize, icount };
}

/**
 * The table bytes for `entries` as QEMU writes them (normalized entries, ending where the last
 * entry ends); EFBIG past QEMU's 64 MiB.
 */
function tableImage(
  s: Qcow2State,
  entries: readonly SnapshotEntry[],
): {
  list: Omit<SnapshotEntry, "offset">[];
  bytes: Uint8Array;
} {
  const list = entries.map((e) => normalized(s, e));
  let bytes = encodeSnapshotTable(list);
  if (list.length > 0) {
    const last = list[list.length - 1]!;
    const enc = new TextEncoder();
    const lastLen =
      40 +
      last.extraData.byteLength +
      enc.encode(last.id).byteLength +
      enc.encode(last.name).byteLength;
    bytes = bytes.subarray(0, bytes.byteLength - ((8 - (lastLen % 8)) % 8));
  }
  if (bytes.byteLength > MAX_SNAPSHOT_TABLE_BYTES) {
    throw new InvalidArgumentError(
      `the snapshot table would take ${bytes.byteLength} bytes, more than ${MAX_SNAPSHOT_TABLE_BYTES}`,
      { cause: errnoCause("EFBIG", "File too large") },
    );
  }
  return { list, bytes };
}

/**
 * Write `entries` as the new snapshot table in fresh clusters, sync, switch the header's
 * count and offset in one write, then free the old table. Updates `s.snapshots`.
 */
async function writeTable(s: Qcow2State, entries: readonly SnapshotEntry[]): Promise<void> {
  const w = s.w!;
  const cs = s.clusterSize;
  const { list, bytes } = tableImage(s, entries);
  const oldOffset = s.hdr.snapshotsOffset;
  const oldBytes = tableBytes(s);
  let offset = 0;
  if (bytes.byteLength > 0) {
    const n = Math.ceil(bytes.byteLength / cs);
    offset = await w.refcounts.allocate(n);
    refreshRefcountBlocks(s, offset + n * cs);
    await checkOverlap(s, offset, n * cs);
    await s.backend.write(offset, bytes);
    s.fileSize = Math.max(s.fileSize, offset + bytes.byteLength);
  }
  // The new table and its refcounts are on disk before the header points at them.
  await w.refcountCache.flush();
  await s.backend.flush();
  await updateHeader(s, { nbSnapshots: list.length, snapshotsOffset: offset });
  s.snapshots = decodeSnapshotTable(bytes, list.length, offset, s.hdr.version === 2 ? 2 : 3);
  if (oldBytes > 0 && oldOffset % cs === 0) {
    await w.refcounts.free(oldOffset, Math.ceil(oldBytes / cs));
  }
  await w.refcountCache.flush();
}

/** Allocate clusters for `table` (an L1 table), write it padded to whole clusters. */
async function writeNewL1(s: Qcow2State, table: U64TableView): Promise<number> {
  const w = s.w!;
  const cs = s.clusterSize;
  if (table.length === 0) return 0;
  const n = Math.ceil((table.length * 8) / cs);
  const offset = await w.refcounts.allocate(n);
  refreshRefcountBlocks(s, offset + n * cs);
  await checkOverlap(s, offset, n * cs);
  const padded = new Uint8Array(n * cs);
  padded.set(table.bytes);
  await s.backend.write(offset, padded);
  s.fileSize = Math.max(s.fileSize, offset + n * cs);
  return offset;
}

/**
 * Run `fn` holding every guest cluster (requests in flight finish first, new ones wait until
 * it is done) and the metadata lock, after a full flush.
 */
async function exclusive<T>(s: Qcow2State, fn: () => Promise<T>): Promise<T> {
  const w = checkWritable(s);
  return w.claims.run(0, ALL_CLUSTERS, () =>
    w.meta.run(async () => {
      await flushLocked(s);
      return fn();
    }),
  );
}

/** Forget cached tables and the compressed-cluster cursor after references changed. */
function afterReferencesChanged(s: Qcow2State): void {
  const w = s.w!;
  s.l2Cache.clear();
  w.compressedCluster = -1;
}

// ------------------------------------------------------------------------- the operations

/**
 * Create a snapshot of the active image named `name` (QEMU's qcow2_snapshot_create): the
 * active L1 table is copied to new clusters, every cluster it reaches gets one more
 * reference, COPIED flags are cleared where they no longer hold, and the entry is appended
 * with a fresh ID (the largest numeric ID + 1). Names need not be unique (as QEMU).
 */
export async function createSnapshot(
  s: Qcow2State,
  name: string,
  options: CreateSnapshotOptions = {},
): Promise<SnapshotEntry> {
  checkWritable(s);
  refuseDataFile(s);
  if (new TextEncoder().encode(name).byteLength > MAX_SNAPSHOT_STRING_BYTES) {
    throw new InvalidArgumentError(
      `snapshot name is longer than ${MAX_SNAPSHOT_STRING_BYTES} bytes`,
      { cause: errnoCause("EINVAL", "Invalid argument") },
    );
  }
  if (s.snapshots.length >= MAX_SNAPSHOTS) {
    throw new InvalidArgumentError(`an image has at most ${MAX_SNAPSHOTS} snapshots`, {
      cause: errnoCause("EFBIG", "File too large"),
    });
  }
  const clock = wallClock();
  const dateSec = options.dateSec ?? clock.sec;
  const dateNsec = options.dateNsec ?? clock.nsec;
  return exclusive(s, async () => {
    const w = s.w!;
    const activeOffset = s.hdr.l1TableOffset;
    const activeSize = s.l1.length;
    await checkNoOverflow(s, activeOffset, activeSize);
    const id = newSnapshotId(s.snapshots);
    const extra = new Uint8Array(24);
    SnapshotExtra.encode(
      { vmStateSizeLarge: 0, diskSize: s.hdr.size, icount: options.icount ?? 0n },
      extra,
    );
    const entry: SnapshotEntry = {
      l1TableOffset: 0,
      l1Size: activeSize,
      id,
      name,
      dateSec,
      dateNsec,
      vmClockNsec: options.vmClockNsec ?? 0n,
      vmStateSize: 0,
      diskSize: s.hdr.size,
      icount: options.icount ?? 0n,
      extraData: extra,
      offset: 0,
    };
    // The table's limits are checked before anything is written.
    tableImage(s, [...s.snapshots, entry]);
    // 1. The snapshot's L1 table: a copy of the active one, in new clusters.
    const l1TableOffset = await writeNewL1(s, s.l1);
    // 2. One more reference to everything the active tables reach, on disk.
    await changeReferences(s, activeOffset, activeSize, 1);
    await w.refcountCache.flush();
    await s.backend.flush();
    // 3. Nothing shared is writable in place any more.
    await rebuildCopied(s);
    await flushLocked(s);
    // 4. The table, then the header switch.
    const inactive = new Set(w.inactiveL2);
    for (let i = 0; i < s.l1.length; i++) {
      const off = entryOffset(s.l1.hi(i), s.l1.lo(i));
      if (off !== 0 && off % s.clusterSize === 0) inactive.add(off);
    }
    await writeTable(s, [...s.snapshots, { ...entry, l1TableOffset }]);
    w.inactiveL2 = [...inactive];
    afterReferencesChanged(s);
    buildMetadataMap(s);
    return s.snapshots[s.snapshots.length - 1]!;
  });
}

/**
 * Delete the snapshot `sel` selects (QEMU's qcow2_snapshot_delete): the table without it is
 * written and switched first, then the references its tables held are dropped (clusters
 * reaching 0 are free), its L1 table is freed and the active COPIED flags are rebuilt.
 */
export async function deleteSnapshot(s: Qcow2State, sel: SnapshotSelector): Promise<SnapshotEntry> {
  checkWritable(s);
  refuseDataFile(s);
  indexOf(s, sel);
  return exclusive(s, async () => {
    const w = s.w!;
    const cs = s.clusterSize;
    const idx = indexOf(s, sel);
    const sn = s.snapshots[idx]!;
    await writeTable(
      s,
      s.snapshots.filter((_, i) => i !== idx),
    );
    // From here a crash only leaks clusters.
    if (sn.l1Size > 0 && sn.l1Size <= MAX_SNAPSHOT_L1_ENTRIES && sn.l1TableOffset % cs === 0) {
      await changeReferences(s, sn.l1TableOffset, sn.l1Size, -1);
      await w.refcounts.free(sn.l1TableOffset, Math.ceil((sn.l1Size * 8) / cs));
    }
    await w.refcountCache.flush();
    await s.backend.flush();
    afterReferencesChanged(s);
    w.inactiveL2 = await snapshotL2Tables(s);
    buildMetadataMap(s);
    await rebuildCopied(s);
    await flushLocked(s);
    return sn;
  });
}

function checkSnapshotL1(s: Qcow2State, sn: SnapshotEntry): void {
  if (sn.l1Size > MAX_SNAPSHOT_L1_ENTRIES) {
    throw new CorruptImageError(`Snapshot L1 table too large`, { offset: sn.offset });
  }
  if (
    sn.l1Size > 0 &&
    (sn.l1TableOffset % s.clusterSize !== 0 || sn.l1TableOffset + sn.l1Size * 8 > s.fileSize)
  ) {
    throw new CorruptImageError(`Snapshot L1 table offset invalid`, { offset: sn.offset });
  }
}

/**
 * Revert the active image to the snapshot `sel` selects (a string: an ID first, else a name,
 * as QEMU's qcow2_snapshot_goto): the snapshot's L1 table becomes the active one, at the
 * snapshot's disk size (an image resized since goes back to that size). The references of
 * the snapshot's tables are raised and on disk first, then a new active L1 table is written
 * and the header switches L1 table, size and disk size in one write; the old active tables'
 * references are dropped last and the COPIED flags rebuilt.
 */
export async function applySnapshot(
  s: Qcow2State,
  sel: SnapshotSelector | string,
): Promise<SnapshotEntry> {
  checkWritable(s);
  // QEMU will not revert a disk that has persistent dirty bitmaps (enabled or not): their
  // bits would no longer describe what changed.
  if (listBitmaps(s).length > 0) {
    throw new InvalidArgumentError("Device has active dirty bitmaps", {
      cause: errnoCause("EBUSY", "Device or resource busy"),
    });
  }
  refuseDataFile(s);
  indexOf(s, sel);
  return exclusive(s, async () => {
    const w = s.w!;
    const cs = s.clusterSize;
    const sn = s.snapshots[indexOf(s, sel)]!;
    checkSnapshotL1(s, sn);
    const newSize = sn.diskSize ?? s.hdr.size;
    if (newSize !== s.hdr.size) s.pbm?.checkResize();
    await checkNoOverflow(s, sn.l1TableOffset, sn.l1Size);
    const needed = Math.max(sn.l1Size, Math.ceil(newSize / (cs * s.l2Entries)));
    const l1 = new U64TableView(new Uint8Array(needed * 8), "big");
    if (sn.l1Size > 0)
      await s.backend.read(sn.l1TableOffset, l1.bytes.subarray(0, sn.l1Size * 8), {
        zeroPastEof: true,
      });
    await changeReferences(s, sn.l1TableOffset, sn.l1Size, 1);
    const l1Offset = await writeNewL1(s, l1);
    await w.refcountCache.flush();
    await s.backend.flush();
    const oldOffset = s.hdr.l1TableOffset;
    const oldSize = s.l1.length;
    await updateHeader(s, { l1TableOffset: l1Offset, l1Size: needed, size: newSize });
    s.l1 = l1;
    const oldGuestSize = s.size;
    s.size = Math.floor(newSize / 512) * 512;
    if (s.size !== oldGuestSize) s.pbm?.resize(s.size);
    // The old active tables are unreachable now: a crash from here only leaks clusters.
    if (oldSize > 0) {
      await changeReferences(s, oldOffset, oldSize, -1);
      await w.refcounts.free(oldOffset, Math.ceil((oldSize * 8) / cs));
    }
    await w.refcountCache.flush();
    await s.backend.flush();
    afterReferencesChanged(s);
    w.retiredL2 = [];
    buildMetadataMap(s);
    await rebuildCopied(s);
    await flushLocked(s);
    return sn;
  });
}

// ------------------------------------------------------------------------- read-only view

/** A snapshot of a qcow2 image as a read-only disk image (see {@link openQcow2Snapshot}). */
class Qcow2SnapshotView implements DiskImage {
  readonly format = "qcow2";
  readonly readOnly = true;
  readonly #v: Qcow2State;

  constructor(
    v: Qcow2State,
    /** The snapshot the view reads. */
    readonly snapshot: SnapshotEntry,
  ) {
    this.#v = v;
  }

  get virtualSize(): number {
    return this.#v.size;
  }

  get backend(): Qcow2State["backend"] {
    return this.#v.backend;
  }

  get backing(): DiskImage | undefined {
    return this.#v.backing;
  }

  read(offset: number, buf: Uint8Array): Promise<void> {
    return guestRead(this.#v, offset, buf);
  }

  blockStatus(offset: number, length: number): Promise<BlockStatus> {
    return guestBlockStatus(this.#v, offset, length);
  }

  /** Closes the view only: the image, its file and its backing image stay open. */
  close(): Promise<void> {
    this.#v.closed = true;
    return Promise.resolve();
  }
}

/**
 * A read-only view of snapshot `sel` of the open image behind `s`: guest bytes read through
 * the snapshot's L1 table (and the image's backing file where it has no data). Writes to the
 * image leave it intact; deleting the snapshot while the view is open does not (its clusters
 * may be reused), so close the view first.
 */
export async function openSnapshotView(
  s: Qcow2State,
  sel: SnapshotSelector | string,
  options: SnapshotViewOptions = {},
): Promise<DiskImage & { readonly snapshot: SnapshotEntry }> {
  checkOpen(s);
  const sn = s.snapshots[indexOf(s, sel)]!;
  checkSnapshotL1(s, sn);
  const size = options.size === "image" ? s.hdr.size : (sn.diskSize ?? s.hdr.size);
  const l1 = new U64TableView(new Uint8Array(sn.l1Size * 8), "big");
  if (sn.l1Size > 0) await s.backend.read(sn.l1TableOffset, l1.bytes, { zeroPastEof: true });
  const v = new Qcow2State(s.backend, {
    header: { ...s.hdr, l1TableOffset: sn.l1TableOffset, l1Size: sn.l1Size, size },
    fileSize: s.fileSize,
    extensions: s.extensions,
    featureNames: s.featureNames,
    l1,
    snapshots: s.snapshots,
    bitmaps: [],
    backingFilename: s.backingFilename,
    backingFormat: s.backingFormat,
    dataFileName: s.dataFileName,
    l2CacheBytes: undefined,
    bitmapDirectory: undefined,
    noBacking: s.noBacking,
    decompress: (src, out) => s.decompress(src, out),
  });
  v.backing = s.backing;
  v.dataBackend = s.dataBackend;
  return new Qcow2SnapshotView(v, sn);
}

/**
 * A read-only view of snapshot `sel` of `image` (a string is an ID first, else a name, as
 * `qemu-img convert -s` resolves it; `{ id, name }` as `convert -l snapshot.id=..,snapshot.name=..`).
 * Same as {@link Qcow2Image.openSnapshot}. Closing the view leaves `image` open.
 */
export function openQcow2Snapshot(
  image: Qcow2Image,
  sel: SnapshotSelector | string,
  options: SnapshotViewOptions = {},
): Promise<DiskImage & { readonly snapshot: SnapshotEntry }> {
  return image.openSnapshot(sel, options);
}

/**
 * Which host clusters of a qcow2 file hold metadata, so that no write lands on a structure it
 * does not own (QEMU's metadata overlap checks). Every structure is checked against every
 * other: data writes may touch no metadata at all, and a metadata write (an L2 table, a
 * refcount block, the L1 table, the header...) may touch only clusters of its own kind.
 */
import { CorruptImageError, ErrorCode, IoError, hex } from "@qimg/structs";
import type { BlockBackend, ReadOptions } from "@qimg/io";
import { AutoclearFeatures, IncompatibleFeatures } from "./spec/header.js";
import { l1Offset } from "./spec/l2.js";
import { planHeaderFieldWrite, writeHeaderFields } from "./header-update.js";
import type { HeaderFieldChanges } from "./header-update.js";
import type { Qcow2State } from "./state.js";

/** Kinds of metadata, as bits (a cluster may, in a corrupt image, belong to several). */
export const Meta = {
  header: 1 << 0,
  activeL1: 1 << 1,
  activeL2: 1 << 2,
  refcountTable: 1 << 3,
  refcountBlock: 1 << 4,
  snapshotTable: 1 << 5,
  inactiveL1: 1 << 6,
  inactiveL2: 1 << 7,
  bitmapDirectory: 1 << 8,
  bitmapTable: 1 << 9,
} as const;

/** How messages name each kind (bit order). */
const NAMES = [
  "the qcow2 header",
  "the active L1 table",
  "an active L2 table",
  "the refcount table",
  "a refcount block",
  "the snapshot table",
  "a snapshot's L1 table",
  "a snapshot's L2 table",
  "the bitmap directory",
  "a bitmap table",
] as const;

/** QEMU's names of the same kinds (metadata_ol_names), as its overlap message prints them. */
const QEMU_NAMES = [
  "qcow2_header",
  "active L1 table",
  "active L2 table",
  "refcount table",
  "refcount block",
  "snapshot table",
  "inactive L1 table",
  "inactive L2 table",
  "bitmap directory",
  "bitmap table",
] as const;

/** QEMU's name for the kind `metaName` calls `name`. */
function qemuName(name: string): string {
  const i = (NAMES as readonly string[]).indexOf(name);
  return i < 0 ? name : QEMU_NAMES[i]!;
}

/** The name of the lowest kind bit set in `bits`. */
export function metaName(bits: number): string {
  for (let i = 0; i < NAMES.length; i++) if ((bits & (1 << i)) !== 0) return NAMES[i]!;
  return "metadata";
}

/** Host cluster index -> kinds of metadata stored there. */
export class MetadataMap {
  readonly #clusters = new Map<number, number>();

  constructor(readonly clusterSize: number) {}

  clear(): void {
    this.#clusters.clear();
  }

  /** Mark the clusters of [offset, +bytes) (at least one cluster) as holding `kind`. */
  add(offset: number, bytes: number, kind: number): void {
    const cs = this.clusterSize;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + Math.max(1, bytes) - 1) / cs);
    for (let c = first; c <= last; c++) this.#clusters.set(c, (this.#clusters.get(c) ?? 0) | kind);
  }

  /** Forget that cluster `index` holds `kind`. */
  remove(index: number, kind: number): void {
    const bits = (this.#clusters.get(index) ?? 0) & ~kind;
    if (bits === 0) this.#clusters.delete(index);
    else this.#clusters.set(index, bits);
  }

  /** Kinds of metadata in cluster `index` (0 for none). */
  at(index: number): number {
    return this.#clusters.get(index) ?? 0;
  }

  /** True when some cluster holds metadata (hot paths skip the check otherwise). */
  has(index: number): boolean {
    return this.#clusters.has(index);
  }

  /**
   * The first cluster of [offset, +length) holding metadata other than `ignore`, with the
   * kinds found there; undefined when the range is free of it.
   */
  find(
    offset: number,
    length: number,
    ignore: number,
  ): { cluster: number; kinds: number } | undefined {
    if (this.#clusters.size === 0 || length <= 0) return undefined;
    const cs = this.clusterSize;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + length - 1) / cs);
    if (last - first > this.#clusters.size) {
      // A long range: walk the (fewer) metadata clusters instead of the range.
      let hit: { cluster: number; kinds: number } | undefined;
      for (const [c, bits] of this.#clusters) {
        if (c < first || c > last || (bits & ~ignore) === 0) continue;
        if (hit === undefined || c < hit.cluster) hit = { cluster: c, kinds: bits & ~ignore };
      }
      return hit;
    }
    for (let c = first; c <= last; c++) {
      const bits = (this.#clusters.get(c) ?? 0) & ~ignore;
      if (bits !== 0) return { cluster: c, kinds: bits };
    }
    return undefined;
  }
}

/**
 * A backend whose writes are checked first by `check(offset, length)` (which throws to refuse
 * them); reads and everything else pass through. Metadata caches write through one of these.
 */
export function guardedBackend(
  inner: BlockBackend,
  check: (offset: number, length: number) => Promise<void>,
): BlockBackend {
  return {
    get readOnly() {
      return inner.readOnly;
    },
    get kind() {
      return inner.kind;
    },
    get name() {
      return inner.name;
    },
    read: (offset: number, buf: Uint8Array, options?: ReadOptions) =>
      inner.read(offset, buf, options),
    write: async (offset: number, data: Uint8Array) => {
      await check(offset, data.length);
      await inner.write(offset, data);
    },
    flush: () => inner.flush(),
    size: () => inner.size(),
    truncate: (size: number) => inner.truncate(size),
    close: () => inner.close(),
  };
}

// ------------------------------------------------------------ the checks of one open image

/** Host clusters holding metadata, for the overlap checks before writes. */
export function buildMetadataMap(s: Qcow2State): void {
  const w = s.w;
  if (!w) return;
  const cs = s.clusterSize;
  const m = w.metadata;
  m.clear();
  // Sizes come from the file: nothing past its end is recorded (a u32 entry count of a
  // corrupt table must not make this loop over billions of clusters).
  const limit = s.fileSize + cs;
  const add = (offset: number, bytes: number, kind: number): void => {
    if (offset < limit) m.add(offset, Math.min(bytes, limit - offset), kind);
  };
  add(0, cs, Meta.header);
  if (s.hdr.l1Size > 0) add(s.hdr.l1TableOffset, s.hdr.l1Size * 8, Meta.activeL1);
  add(s.hdr.refcountTableOffset, s.hdr.refcountTableClusters * cs, Meta.refcountTable);
  for (let i = 0; i < w.refcounts.tableEntries; i++) {
    const b = w.refcounts.blockOffset(i);
    if (b !== 0) add(b, cs, Meta.refcountBlock);
  }
  if (s.hdr.nbSnapshots > 0) {
    const last = s.snapshots[s.snapshots.length - 1];
    if (last) {
      const enc = new TextEncoder();
      const lastBytes =
        40 +
        last.extraData.byteLength +
        enc.encode(last.id).byteLength +
        enc.encode(last.name).byteLength;
      add(
        s.hdr.snapshotsOffset,
        last.offset + lastBytes - s.hdr.snapshotsOffset,
        Meta.snapshotTable,
      );
    }
    for (const snap of s.snapshots)
      if (snap.l1Size > 0) add(snap.l1TableOffset, snap.l1Size * 8, Meta.inactiveL1);
  }
  for (const off of w.inactiveL2) add(off, cs, Meta.inactiveL2);
  for (const off of w.retiredL2) add(off, cs, Meta.activeL2); // still active on disk
  for (let i = 0; i < s.l1.length; i++) {
    const off = l1Offset(s.l1.hi(i), s.l1.lo(i));
    if (off !== 0 && off % cs === 0) add(off, cs, Meta.activeL2);
  }
  const dir = s.bitmapDirectory;
  if (dir && AutoclearFeatures.decode(s.hdr.autoclearFeatures).has("bitmaps")) {
    if (dir.length > 0) add(dir.offset, dir.length, Meta.bitmapDirectory);
    for (const b of s.bitmaps) {
      if (b.bitmapTableSize > 0 && b.bitmapTableOffset !== 0)
        add(b.bitmapTableOffset, b.bitmapTableSize * 8, Meta.bitmapTable);
    }
  }
}

/** Refresh the refcount blocks in the metadata map after allocations may have added some. */
export function refreshRefcountBlocks(s: Qcow2State, upTo: number): void {
  const w = s.w!;
  const cs = s.clusterSize;
  const last = Math.min(
    w.refcounts.tableEntries,
    Math.ceil((upTo / cs + 1) / w.refcounts.entriesPerBlock) + 1,
  );
  for (let i = 0; i < last; i++) {
    const b = w.refcounts.blockOffset(i);
    if (b !== 0 && (w.metadata.at(b / cs) & Meta.refcountBlock) === 0)
      w.metadata.add(b, cs, Meta.refcountBlock);
  }
}

/**
 * Refuse (and mark the image corrupt) when [offset, +length) holds metadata other than the
 * kinds in `ignore` (the structure being written may overwrite itself, nothing else).
 */
export async function checkOverlap(
  s: Qcow2State,
  offset: number,
  length: number,
  ignore = 0,
): Promise<void> {
  const hit = s.w!.metadata.find(offset, length, ignore);
  if (hit) await markCorrupt(s, metaName(hit.kinds), hit.cluster * s.clusterSize);
}

/**
 * Write header fields alone (the dirty bit is 8 bytes, a refcount table switch 12), then sync.
 * On read-write opens the bytes are checked like any metadata write first.
 */
export async function updateHeader(s: Qcow2State, changes: HeaderFieldChanges): Promise<void> {
  if (s.w) {
    const plan = planHeaderFieldWrite(s.hdr, changes);
    await checkOverlap(s, plan.offset, plan.bytes.byteLength, Meta.header);
  }
  s.hdr = await writeHeaderFields(s.backend, s.hdr, changes);
}

/** Overlap check for guest data written at host `offset` (nothing to check in a data file). */
export async function checkData(s: Qcow2State, offset: number, length: number): Promise<void> {
  if (!s.hasDataFile) await checkOverlap(s, offset, length);
}

/** The check metadata caches run before writing a table of kind `own` (read-write only). */
export async function checkMetaWrite(
  s: Qcow2State,
  offset: number,
  length: number,
  own: number,
): Promise<void> {
  const w = s.w;
  if (!w) return;
  if (w.corrupted) {
    throw new IoError(`${s.backend.name}: the image was marked corrupt and is read-only`, {
      code: ErrorCode.READ_ONLY,
    });
  }
  await checkOverlap(s, offset, length, own);
}

/** A corruption the qcow2 driver met while using an image (QEMU's corruption event). */
export interface Qcow2CorruptionEvent {
  /** The image file (the backend's name). */
  readonly file: string;
  /**
   * True when the image is marked corrupt (a read-write open; it refuses all further
   * requests), false when only the request failed (a read-only open).
   */
  readonly fatal: boolean;
  /** What is wrong, worded as QEMU's qcow2 driver words it. */
  readonly message: string;
  /** File offset of the corrupt entry or of the refused write. */
  readonly offset: number;
}

const corruptionListeners = new Set<(event: Qcow2CorruptionEvent) => void>();
/** Opens that reported an event already (QEMU reports one per open, then a fatal one). */
const signaled = new WeakSet<Qcow2State>();

/**
 * Listen to corruption events of every qcow2 image of this process (QEMU prints them on
 * stderr: "qcow2: Marking image as corrupt: MESSAGE; further corruption events will be
 * suppressed", or for a read-only open "qcow2: Image is corrupt: MESSAGE; further non-fatal
 * corruption events will be suppressed"). As QEMU, each open reports its first event, and a
 * fatal one after a non-fatal one. Returns a function that removes the listener.
 */
export function onQcow2Corruption(listener: (event: Qcow2CorruptionEvent) => void): () => void {
  corruptionListeners.add(listener);
  return () => {
    corruptionListeners.delete(listener);
  };
}

/** C's `%#x`: 0 prints as "0", anything else with "0x". */
const cHex = (h: string): string => (/^0x0*$/.test(h) ? "0" : h);

/** The driver's message in QEMU's words (qcow2_signal_corruption's callers). */
function qemuWording(message: string): string {
  let m = /^L2 table offset (0x[0-9a-f]+) in L1 entry (\d+) is not aligned/.exec(message);
  if (m) return `L2 table offset ${cHex(m[1]!)} unaligned (L1 index: ${cHex(hex(Number(m[2])))})`;
  m = /^cluster offset (0x[0-9a-f]+) in L2 entry (\d+) of table (0x[0-9a-f]+) is not aligned/.exec(
    message,
  );
  if (m) {
    return `Cluster allocation offset ${cHex(m[1]!)} unaligned (L2 offset: ${cHex(m[3]!)}, L2 index: ${cHex(hex(Number(m[2])))})`;
  }
  m =
    /^(preallocated zero|data) cluster offset (0x[0-9a-f]+) for guest offset (0x[0-9a-f]+) is not aligned/.exec(
      message,
    );
  if (m) {
    const kind = m[1] === "data" ? "Data" : "Preallocated zero";
    return `${kind} cluster offset ${cHex(m[2]!)} unaligned (guest offset: ${cHex(m[3]!)})`;
  }
  return message;
}

function emitCorruption(s: Qcow2State, fatal: boolean, message: string, offset: number): void {
  if (signaled.has(s) && !fatal) return;
  signaled.add(s);
  if (corruptionListeners.size === 0) return;
  const event = { file: s.backend.name, fatal, message: qemuWording(message), offset };
  for (const listener of corruptionListeners) listener(event);
}

export async function markCorrupt(s: Qcow2State, what: string, offset: number): Promise<never> {
  emitCorruption(
    s,
    true,
    `Preventing invalid write on metadata (overlaps with ${qemuName(what)})`,
    offset,
  );
  await setCorruptBit(s);
  throw new CorruptImageError(
    `Preventing invalid write on metadata (overlaps with ${what}) at ${hex(offset)}; image marked as corrupt`,
    { offset },
  );
}

/**
 * A fatal corruption found while using the image (QEMU's qcow2_signal_corruption with
 * fatal=true): an unaligned L2 table or cluster offset met on a read or write. A read-write
 * open marks the image corrupt (and stops writing to it); a read-only one only fails the
 * request. Throws the error that fails the request.
 */
export async function signalCorruption(
  s: Qcow2State,
  message: string,
  offset: number,
): Promise<never> {
  const fatal = s.w !== undefined && !s.w.corrupted;
  if (fatal || s.w === undefined) emitCorruption(s, fatal, message, offset);
  if (fatal) await setCorruptBit(s);
  throw new CorruptImageError(message, { offset });
}

/** Refuse further writes and set the corrupt bit on disk (version 3 images). */
async function setCorruptBit(s: Qcow2State): Promise<void> {
  const w = s.w!;
  w.corrupted = true;
  s.readOnly = true;
  if (s.hdr.version === 3) {
    // Only the incompatible-features field changes (no overlap check: the header is the
    // header, and the corrupt bit must get out whatever else is wrong).
    try {
      s.hdr = await writeHeaderFields(s.backend, s.hdr, {
        incompatibleFeatures: s.hdr.incompatibleFeatures | IncompatibleFeatures.maskOf("corrupt"),
      });
    } catch {
      // The image is already refusing writes; the error the caller throws is what matters.
    }
  }
}

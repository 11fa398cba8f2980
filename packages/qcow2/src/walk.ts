import { U64TableView, hex } from "@qimg/structs";
import type { BlockBackend } from "@qimg/io";
import { AutoclearFeatures, IncompatibleFeatures } from "./spec/header.js";
import type { Qcow2Header } from "./spec/header.js";
import type { SnapshotEntry } from "./spec/snapshot.js";
import type { BitmapEntry } from "./spec/bitmap-directory.js";
import {
  ClusterType,
  EntryProblem,
  compressedLength,
  compressedOffset,
  entryCopied,
  entryOffset,
  l1ReservedBits,
  l2EntryProblem,
  l2Format,
  reftableOffset,
  reftableReservedBits,
} from "./spec/l2.js";
import type { L2Format } from "./spec/l2.js";

/** What a host cluster is used for. */
export type ReferenceKind =
  | "header"
  | "l1"
  | "l2"
  | "data"
  | "compressed"
  | "refcount-table"
  | "refcount-block"
  | "snapshot-table"
  | "bitmap-directory"
  | "bitmap-table"
  | "bitmap-data"
  | "encryption-header";

/** One reference to a run of host clusters (each reference counts 1 for every cluster). */
export interface Reference {
  /** What structure or data the referenced cluster holds. */
  readonly kind: ReferenceKind;
  /** Host offset of the referenced bytes (cluster aligned except for compressed data). */
  readonly offset: number;
  /** Length in bytes of what is referenced (rounded up to clusters when counting). */
  readonly length: number;
  /** Which L1 table it hangs off: undefined for the active one, else the snapshot's index. */
  readonly snapshot?: number | undefined;
  /** Guest cluster index (data references) or L1 index (L2 references). */
  readonly index?: number | undefined;
  /** The L2/L1 entry's COPIED flag, where the entry has one. */
  readonly copied?: boolean | undefined;
  /** Host offset of the table entry that holds the reference, for repairs. */
  readonly entryOffset?: number | undefined;
}

/** A problem found while walking (never thrown: the walk continues past it). */
export interface WalkProblem {
  /** What is wrong, in words. */
  readonly message: string;
  /** Host offset of the bad entry or structure. */
  readonly offset: number;
  /** Where the problem sits, for repairs. */
  readonly where: "l1" | "l2" | "refcount-table" | "snapshot" | "bitmap";
  /** Guest range made unreadable by the problem, when there is one. */
  readonly guest?: { readonly offset: number; readonly length: number } | undefined;
}

/** What {@link walkReferences} walks: the image file and its decoded metadata. */
export interface WalkInput {
  /** The image file. */
  readonly backend: BlockBackend;
  /** Its decoded header. */
  readonly header: Qcow2Header;
  /** Its snapshot table (each snapshot's L1 table is walked too). */
  readonly snapshots: readonly SnapshotEntry[];
  /** Its bitmap directory (each bitmap's table and data clusters are walked). */
  readonly bitmaps: readonly BitmapEntry[];
  /** Bitmaps extension directory location, when the autoclear bit says bitmaps are valid. */
  readonly bitmapDirectory?: { readonly offset: number; readonly length: number } | undefined;
  /** Full-disk encryption header area, if any. */
  readonly encryptionHeader?: { readonly offset: number; readonly length: number } | undefined;
}

/** What {@link walkReferences} calls for each reference and each problem it finds. */
export interface WalkVisitor {
  /** Called for every reference to a host cluster range. */
  reference(ref: Reference): void | Promise<void>;
  /** Called for every bad entry (the walk goes on past it). */
  problem?(p: WalkProblem): void | Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// The table walk: L1 tables, their L2 tables and every entry, as raw words with where they
// are. Visitors decide what the entries mean (references for the refcount rebuild, QEMU's
// verdicts and repairs for the checker, claims for the overlap map); the walk only reads.

/**
 * Where the walk is in an L1 table. One object per walk, updated in place for every entry:
 * read its fields inside the callback, never keep it.
 */
export interface L1Cursor {
  /** Which L1 table: undefined for the active one, else the snapshot's index. */
  snapshot: number | undefined;
  /** Host offset of the L1 table. */
  tableOffset: number;
  /** Entries in the L1 table. */
  tableSize: number;
  /** The L1 table as read (entries past the end of the file read as zero). */
  table: U64TableView;
  /** Index of the current entry. */
  index: number;
  /** Host offset of the current entry. */
  entryOffset: number;
  /** The current entry's high word. */
  hi: number;
  /** The current entry's low word. */
  lo: number;
  /** The L2 table offset the entry holds (bits 9..55). */
  l2Offset: number;
  /**
   * Call after writing into the image file from a callback: L2 tables the walk read ahead are
   * read again (a table the visitor changed on disk is then seen as it is now).
   */
  readonly invalidate: () => void;
}

/**
 * Where the walk is in an L2 table (one object per walk, updated in place for every entry).
 */
export interface L2Cursor {
  /** The L1 entry that names this table. */
  readonly l1: L1Cursor;
  /** Host offset of the L2 table. */
  tableOffset: number;
  /** The L2 table as read (bytes past the end of the file read as zero). A visitor may change it. */
  table: U64TableView;
  /** Entry index inside the table. */
  index: number;
  /** Word index of the entry's standard u64 in `table` (`index * stride`). */
  word: number;
  /** Host offset of the entry. */
  entryOffset: number;
  /** Guest cluster index the entry maps. */
  guestCluster: number;
  /** The entry's high word. */
  hi: number;
  /** The entry's low word. */
  lo: number;
  /** The subcluster bitmap's high word (zero flags); 0 for standard entries. */
  bitmapHi: number;
  /** The subcluster bitmap's low word (allocation flags); 0 for standard entries. */
  bitmapLo: number;
  /** The entry's {@link ClusterType}. */
  type: ClusterType;
  /** As {@link L1Cursor.invalidate}. */
  readonly invalidate: () => void;
}

/** Callbacks of {@link walkL1Table}; each may return a promise (awaited only when it does). */
export interface TableVisitor {
  /** Before an L1 table's entries are read; return false to skip the table. */
  l1Table?: (c: L1Cursor) => boolean | void | Promise<boolean | void>;
  /** For every non-zero L1 entry; return false not to walk the L2 table it names. */
  l1Entry?: (c: L1Cursor) => boolean | void | Promise<boolean | void>;
  /** For every L2 entry with any bit set (either word, with extended L2 entries). */
  l2Entry?: (c: L2Cursor) => void | Promise<void>;
  /** After the entries of an L2 table (a visitor that changed `c.table` may write it back). */
  l2TableDone?: (c: L2Cursor) => void | Promise<void>;
}

/** The image a table walk reads. */
export interface TableSource {
  /** The image file. */
  readonly backend: BlockBackend;
  /** Entry decoding facts ({@link l2Format}). */
  readonly format: L2Format;
  /** The file size (tables past it are not read: they read as zeros). */
  readonly fileSize: number;
}

const TRUE = (): boolean => true;

/** Create the reused cursors of one walk. */
function cursors(reader: TableReader): { l1: L1Cursor; l2: L2Cursor } {
  const invalidate = (): void => reader.invalidate();
  const empty = new U64TableView(new Uint8Array(0), "big");
  const l1: L1Cursor = {
    snapshot: undefined,
    tableOffset: 0,
    tableSize: 0,
    table: empty,
    index: 0,
    entryOffset: 0,
    hi: 0,
    lo: 0,
    l2Offset: 0,
    invalidate,
  };
  const l2: L2Cursor = {
    l1,
    tableOffset: 0,
    table: empty,
    index: 0,
    word: 0,
    entryOffset: 0,
    guestCluster: 0,
    hi: 0,
    lo: 0,
    bitmapHi: 0,
    bitmapLo: 0,
    type: ClusterType.Unallocated,
    invalidate,
  };
  return { l1, l2 };
}

/**
 * Reads L2 tables for a walk with read-ahead: when tables follow each other on the host (as
 * they do in images written sequentially or preallocated), one read fetches the next several,
 * so a walk over millions of entries makes a few hundred reads, not one per table. A visitor
 * that writes into the file calls the cursor's `invalidate()`.
 */
class TableReader {
  readonly #backend: BlockBackend;
  readonly #cs: number;
  readonly #fileSize: number;
  #buf: Uint8Array;
  #start = -1;
  #end = -1;
  #nextExpected = -1;
  #run = 0;
  static readonly MAX_AHEAD = 1 << 20;

  constructor(backend: BlockBackend, cs: number, fileSize: number) {
    this.#backend = backend;
    this.#cs = cs;
    this.#fileSize = fileSize;
    this.#buf = new Uint8Array(Math.max(cs, Math.min(TableReader.MAX_AHEAD, 16 * cs)));
  }

  /** The table at `offset` (cluster aligned, inside the file); valid until the next call. */
  async read(offset: number): Promise<Uint8Array> {
    const cs = this.#cs;
    if (offset >= this.#start && offset + cs <= this.#end) {
      this.#nextExpected = offset + cs;
      return this.#buf.subarray(offset - this.#start, offset - this.#start + cs);
    }
    // Sequential tables grow the read-ahead; anything else reads one table.
    this.#run = offset === this.#nextExpected ? Math.min(this.#run * 2 || 2, 16) : 1;
    const want = Math.min(this.#run * cs, this.#buf.byteLength);
    const len = Math.max(cs, Math.min(want, Math.ceil((this.#fileSize - offset) / cs) * cs));
    const buf = this.#buf.subarray(0, Math.min(len, this.#buf.byteLength));
    this.#start = -1;
    this.#end = -1;
    await this.#backend.read(offset, buf, { zeroPastEof: true });
    this.#start = offset;
    this.#end = offset + buf.byteLength;
    this.#nextExpected = offset + cs;
    return buf.subarray(0, cs);
  }

  /** Forget what was read ahead (after the visitor wrote into the file). */
  invalidate(): void {
    this.#start = -1;
    this.#end = -1;
  }
}

/**
 * Walk one L1 table and the L2 tables it names, calling the visitor with raw entries and
 * their positions. Tables (or their parts) past the end of the file read as zeros, as QEMU
 * reads them. Memory stays bounded: the L1 table and one read-ahead window of L2 tables.
 */
export async function walkL1Table(
  src: TableSource,
  l1Offset: number,
  l1Size: number,
  snapshot: number | undefined,
  visitor: TableVisitor,
): Promise<void> {
  const reader = new TableReader(src.backend, src.format.clusterSize, src.fileSize);
  const { l1, l2 } = cursors(reader);
  await walkOne(src, reader, l1, l2, l1Offset, l1Size, snapshot, visitor);
}

/** Walk the active L1 table, then every snapshot's (in table order), as {@link walkL1Table}. */
export async function walkTables(
  src: TableSource,
  l1: { readonly offset: number; readonly size: number },
  snapshots: readonly SnapshotEntry[],
  visitor: TableVisitor,
): Promise<void> {
  const reader = new TableReader(src.backend, src.format.clusterSize, src.fileSize);
  const c = cursors(reader);
  await walkOne(src, reader, c.l1, c.l2, l1.offset, l1.size, undefined, visitor);
  for (let s = 0; s < snapshots.length; s++) {
    const snap = snapshots[s]!;
    await walkOne(src, reader, c.l1, c.l2, snap.l1TableOffset, snap.l1Size, s, visitor);
  }
}

async function walkOne(
  src: TableSource,
  reader: TableReader,
  c1: L1Cursor,
  c2: L2Cursor,
  l1Offset: number,
  l1Size: number,
  snapshot: number | undefined,
  visitor: TableVisitor,
): Promise<void> {
  const fmt = src.format;
  const per = fmt.entriesPerTable;
  const onL1Entry = visitor.l1Entry ?? TRUE;
  const onL2Entry = visitor.l2Entry;
  c1.snapshot = snapshot;
  c1.tableOffset = l1Offset;
  c1.tableSize = l1Size;
  c1.index = 0;
  c1.entryOffset = l1Offset;
  if (visitor.l1Table) {
    let r = visitor.l1Table(c1);
    if (r instanceof Promise) r = await r;
    if (r === false) return;
  }
  if (l1Size === 0 || l1Offset >= src.fileSize) return;
  const l1 = new U64TableView(new Uint8Array(l1Size * 8), "big");
  await src.backend.read(l1Offset, l1.bytes, { zeroPastEof: true });
  c1.table = l1;
  for (let i = 0; i < l1Size; i++) {
    const hi = l1.hi(i);
    const lo = l1.lo(i);
    if ((hi | lo) === 0) continue;
    c1.index = i;
    c1.entryOffset = l1Offset + i * 8;
    c1.hi = hi;
    c1.lo = lo;
    const l2Offset = entryOffset(hi, lo);
    c1.l2Offset = l2Offset;
    let go = onL1Entry(c1);
    if (go instanceof Promise) go = await go;
    if (go === false || l2Offset >= src.fileSize) continue;
    if (onL2Entry === undefined && visitor.l2TableDone === undefined) continue;
    const table = new U64TableView(await reader.read(l2Offset), "big");
    c2.tableOffset = l2Offset;
    c2.table = table;
    const guestBase = i * per;
    if (onL2Entry !== undefined) {
      const dv = new DataView(table.bytes.buffer, table.bytes.byteOffset, table.bytes.byteLength);
      // visitEntries stops after an entry whose callback returned a promise; that promise is
      // awaited before the walk goes on, also when it was the table's last entry.
      let j = 0;
      do {
        j = visitEntries(fmt, c2, onL2Entry, dv, l2Offset, guestBase, j);
        if (pendingVisit !== undefined) await pendingVisit;
      } while (j < per);
    }
    if (visitor.l2TableDone) {
      const r = visitor.l2TableDone(c2);
      if (r instanceof Promise) await r;
    }
  }
}

/** The promise the last {@link visitEntries} stopped for (undefined when it ran to the end). */
let pendingVisit: Promise<void> | undefined;

/**
 * The inner loop of the walk, a plain function (an async function's loop runs far slower
 * until optimized): visit entries `from`.. of one L2 table; stop after an entry whose
 * callback returned a promise (left in `pendingVisit`) and return the next index, or the
 * table's entry count when done. Big-endian words are read straight from the bytes.
 */
function visitEntries(
  fmt: L2Format,
  c2: L2Cursor,
  onL2Entry: (c: L2Cursor) => void | Promise<void>,
  dv: DataView,
  l2Offset: number,
  guestBase: number,
  from: number,
): number {
  const per = fmt.entriesPerTable;
  const stride = fmt.stride;
  const extended = fmt.extendedL2;
  const dataFile = fmt.hasDataFile;
  pendingVisit = undefined;
  for (let j = from; j < per; j++) {
    const b = j * stride * 8;
    const ehi = dv.getUint32(b, false);
    const elo = dv.getUint32(b + 4, false);
    const bhi = extended ? dv.getUint32(b + 8, false) : 0;
    const blo = extended ? dv.getUint32(b + 12, false) : 0;
    if ((ehi | elo | bhi | blo) === 0) continue;
    c2.index = j;
    c2.word = j * stride;
    c2.entryOffset = l2Offset + b;
    c2.guestCluster = guestBase + j;
    c2.hi = ehi;
    c2.lo = elo;
    c2.bitmapHi = bhi;
    c2.bitmapLo = blo;
    // clusterType(), written out: a call would box the words (heap numbers past 2^30).
    if ((ehi & 0x4000_0000) !== 0) c2.type = ClusterType.Compressed;
    else if ((ehi & 0x00ff_ffff) !== 0 || (elo & 0xffff_fe00) !== 0) {
      c2.type = (elo & 1) !== 0 && !extended ? ClusterType.ZeroAlloc : ClusterType.Normal;
    } else if ((elo & 1) !== 0 && !extended) c2.type = ClusterType.ZeroPlain;
    else
      c2.type =
        dataFile && (ehi & 0x8000_0000) !== 0 ? ClusterType.Normal : ClusterType.Unallocated;
    const r = onL2Entry(c2);
    if (r instanceof Promise) {
      pendingVisit = r;
      return j + 1;
    }
  }
  return per;
}

// ---------------------------------------------------------------------------------------------
// References: the walk above as a list of host cluster references (the refcount rebuild of a
// dirty image and the tests' consistency checker count them).

/**
 * Enumerate every reference to a host cluster in a qcow2 image: the header, the active and
 * every snapshot's L1 and L2 tables and data clusters (compressed clusters as byte ranges),
 * the refcount table and blocks, the snapshot table, bitmap directory and tables. Bad entries
 * (misaligned, past the end of the file, reserved bits) are reported as problems and not
 * followed. Memory stays bounded: one L2 table (and its read-ahead) is held at a time.
 */
export async function walkReferences(input: WalkInput, visit: WalkVisitor): Promise<void> {
  const { backend, header: h } = input;
  const cs = 2 ** h.clusterBits;
  const fileSize = await backend.size();
  const incompat = IncompatibleFeatures.decode(h.incompatibleFeatures);
  const fmt = l2Format({
    clusterBits: h.clusterBits,
    extendedL2: incompat.has("extendedL2"),
    hasDataFile: incompat.has("externalDataFile"),
  });
  const hasDataFile = fmt.hasDataFile;
  const l2Entries = fmt.entriesPerTable;
  const problem = async (p: WalkProblem): Promise<void> => {
    if (visit.problem) await visit.problem(p);
  };

  await visit.reference({ kind: "header", offset: 0, length: cs });

  // Refcount table and blocks.
  const rtBytes = h.refcountTableClusters * cs;
  await visit.reference({ kind: "refcount-table", offset: h.refcountTableOffset, length: rtBytes });
  const rt = new U64TableView(
    new Uint8Array(Math.max(0, Math.min(rtBytes, fileSize - h.refcountTableOffset))),
    "big",
  );
  const rtLen = Math.floor(rt.bytes.byteLength / 8) * 8;
  const rtView = new U64TableView(rt.bytes.subarray(0, rtLen), "big");
  if (rtLen > 0) await backend.read(h.refcountTableOffset, rtView.bytes);
  for (let i = 0; i < rtView.length; i++) {
    const hi = rtView.hi(i);
    const lo = rtView.lo(i);
    if ((hi | lo) === 0) continue;
    const off = reftableOffset(hi, lo);
    const entryOff = h.refcountTableOffset + i * 8;
    if (reftableReservedBits(lo) || off % cs !== 0) {
      await problem({
        message: `refcount block ${i} offset ${hex(off)} is not aligned to the cluster size`,
        offset: entryOff,
        where: "refcount-table",
      });
      continue;
    }
    if (off + cs > fileSize) {
      await problem({
        message: `refcount block ${i} at ${hex(off)} is past the end of the file`,
        offset: entryOff,
        where: "refcount-table",
      });
      continue;
    }
    await visit.reference({
      kind: "refcount-block",
      offset: off,
      length: cs,
      index: i,
      entryOffset: entryOff,
    });
  }

  // Snapshot table.
  if (h.nbSnapshots > 0 && input.snapshots.length > 0) {
    const last = input.snapshots[input.snapshots.length - 1]!;
    const enc = new TextEncoder();
    const entryBytes =
      40 +
      last.extraData.byteLength +
      enc.encode(last.id).byteLength +
      enc.encode(last.name).byteLength;
    const end = last.offset + Math.ceil(entryBytes / 8) * 8;
    await visit.reference({
      kind: "snapshot-table",
      offset: h.snapshotsOffset,
      length: end - h.snapshotsOffset,
    });
  }

  // Encryption header.
  if (input.encryptionHeader) {
    await visit.reference({ kind: "encryption-header", ...input.encryptionHeader });
  }

  const src: TableSource = { backend, format: fmt, fileSize };
  const visitor: TableVisitor = {
    async l1Table(c) {
      const { tableOffset: l1Offset, snapshot } = c;
      const bytes = c.tableSize * 8;
      await visit.reference({ kind: "l1", offset: l1Offset, length: bytes, snapshot });
      if (l1Offset + bytes > fileSize || l1Offset % cs !== 0) {
        await problem({
          message: `${snapshot === undefined ? "active" : `snapshot ${snapshot}`} L1 table at ${hex(l1Offset)} is ${l1Offset % cs !== 0 ? "not aligned to the cluster size" : "past the end of the file"}`,
          offset: l1Offset,
          where: snapshot === undefined ? "l1" : "snapshot",
        });
        return false;
      }
      return true;
    },
    async l1Entry(c) {
      const i = c.index;
      const off = c.l2Offset;
      const guest = { offset: i * l2Entries * cs, length: l2Entries * cs };
      if (l1ReservedBits(c.hi, c.lo)) {
        await problem({
          message: `L1 entry ${i} ${hex((BigInt(c.hi) << 32n) | BigInt(c.lo))} has reserved bits set`,
          offset: c.entryOffset,
          where: "l1",
          guest,
        });
      }
      if (off === 0) return false;
      if (off % cs !== 0) {
        await problem({
          message: `L2 table offset ${hex(off)} in L1 entry ${i} is not aligned to the cluster size ${cs}`,
          offset: c.entryOffset,
          where: "l1",
          guest,
        });
        return false;
      }
      if (off + cs > fileSize) {
        await problem({
          message: `L2 table at ${hex(off)} (L1 entry ${i}) is past the end of the file`,
          offset: c.entryOffset,
          where: "l1",
          guest,
        });
        return false;
      }
      await visit.reference({
        kind: "l2",
        offset: off,
        length: cs,
        snapshot: c.snapshot,
        index: i,
        copied: entryCopied(c.hi),
        entryOffset: c.entryOffset,
      });
      return true;
    },
    async l2Entry(c) {
      const { hi, lo } = c;
      if ((hi | lo) === 0) return;
      const off = c.tableOffset;
      const j = c.index;
      const g = { offset: c.guestCluster * cs, length: cs };
      if (c.type === ClusterType.Compressed) {
        const host = compressedOffset(fmt, hi, lo);
        const length = compressedLength(fmt, hi, lo);
        if (host === 0 || host + length > fileSize + 512) {
          await problem({
            message: `compressed cluster descriptor in L2 entry ${j} of table ${hex(off)} points to ${hex(host)}, outside the file`,
            offset: c.entryOffset,
            where: "l2",
            guest: g,
          });
          return;
        }
        await visit.reference({
          kind: "compressed",
          offset: host,
          length,
          snapshot: c.l1.snapshot,
          index: c.guestCluster,
          copied: entryCopied(hi),
          entryOffset: c.entryOffset,
        });
        return;
      }
      const host = entryOffset(hi, lo);
      const bad = l2EntryProblem(fmt, hi, lo);
      if (bad === EntryProblem.ReservedBits) {
        await problem({
          message: `L2 entry ${j} of table ${hex(off)} (${hex((BigInt(hi) << 32n) | BigInt(lo))}) has reserved bits set`,
          offset: c.entryOffset,
          where: "l2",
          guest: g,
        });
      }
      if (host === 0) return;
      if (host % cs !== 0) {
        await problem({
          message: `cluster offset ${hex(host)} in L2 entry ${j} of table ${hex(off)} is not aligned to the cluster size ${cs}`,
          offset: c.entryOffset,
          where: "l2",
          guest: g,
        });
        return;
      }
      if (hasDataFile) return; // data clusters live in the data file, not counted here
      await visit.reference({
        kind: "data",
        offset: host,
        length: cs,
        snapshot: c.l1.snapshot,
        index: c.guestCluster,
        copied: entryCopied(hi),
        entryOffset: c.entryOffset,
      });
    },
  };
  await walkTables(src, { offset: h.l1TableOffset, size: h.l1Size }, input.snapshots, visitor);

  // Persistent bitmaps.
  const autoclear = AutoclearFeatures.decode(h.autoclearFeatures);
  if (input.bitmapDirectory && autoclear.has("bitmaps")) {
    await visit.reference({ kind: "bitmap-directory", ...input.bitmapDirectory });
    for (const b of input.bitmaps) {
      const bytes = b.bitmapTableSize * 8;
      if (b.bitmapTableOffset % cs !== 0 || b.bitmapTableOffset + bytes > fileSize) {
        await problem({
          message: `bitmap '${b.name}' table at ${hex(b.bitmapTableOffset)} is invalid`,
          offset: b.bitmapTableOffset,
          where: "bitmap",
        });
        continue;
      }
      await visit.reference({ kind: "bitmap-table", offset: b.bitmapTableOffset, length: bytes });
      const t = new U64TableView(new Uint8Array(bytes), "big");
      await backend.read(b.bitmapTableOffset, t.bytes);
      for (let i = 0; i < t.length; i++) {
        const off = entryOffset(t.hi(i), t.lo(i));
        if (off > 1 && off % cs === 0 && off + cs <= fileSize) {
          await visit.reference({ kind: "bitmap-data", offset: off, length: cs });
        }
      }
    }
  }
}

import { U64TableView, hex } from "@qimg/structs";
import type { BlockBackend } from "@qimg/io";
import { AutoclearFeatures, IncompatibleFeatures } from "./spec/header.js";
import type { Qcow2Header } from "./spec/header.js";
import type { SnapshotEntry } from "./spec/snapshot.js";
import type { BitmapEntry } from "./spec/bitmap-directory.js";
import {
  L1_OFFSET_MASK,
  L1_RESERVED_MASK,
  L2_OFFSET_MASK,
  L2_RESERVED_MASK,
  OFLAG_COMPRESSED,
  OFLAG_COPIED,
  OFLAG_ZERO,
  REFTABLE_OFFSET_MASK,
  compressedLayout,
  decodeCompressed,
} from "./spec/l2.js";

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

const TWO_32 = 0x1_0000_0000;

/**
 * Enumerate every reference to a host cluster in a qcow2 image: the header, the active and
 * every snapshot's L1 and L2 tables and data clusters (compressed clusters as byte ranges),
 * the refcount table and blocks, the snapshot table, bitmap directory and tables. Bad entries
 * (misaligned, past the end of the file, reserved bits) are reported as problems and not
 * followed. Memory stays bounded: one L2 table is held at a time.
 */
export async function walkReferences(input: WalkInput, visit: WalkVisitor): Promise<void> {
  const { backend, header: h } = input;
  const cs = 2 ** h.clusterBits;
  const fileSize = await backend.size();
  const incompat = IncompatibleFeatures.decode(h.incompatibleFeatures);
  const extendedL2 = incompat.has("extendedL2");
  const hasDataFile = incompat.has("externalDataFile");
  const l2Entries = cs / (extendedL2 ? 16 : 8);
  const stride = extendedL2 ? 2 : 1;
  const layout = compressedLayout(h.clusterBits);
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
    if (rtView.isZero(i)) continue;
    const off = rtView.getMasked(i, REFTABLE_OFFSET_MASK);
    const entryOffset = h.refcountTableOffset + i * 8;
    if ((rtView.lo(i) & 0x1ff) !== 0 || off % cs !== 0) {
      await problem({
        message: `refcount block ${i} offset ${hex(off)} is not aligned to the cluster size`,
        offset: entryOffset,
        where: "refcount-table",
      });
      continue;
    }
    if (off + cs > fileSize) {
      await problem({
        message: `refcount block ${i} at ${hex(off)} is past the end of the file`,
        offset: entryOffset,
        where: "refcount-table",
      });
      continue;
    }
    await visit.reference({
      kind: "refcount-block",
      offset: off,
      length: cs,
      index: i,
      entryOffset,
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

  const l2 = new U64TableView(new Uint8Array(cs), "big");
  const walkL1 = async (
    l1Offset: number,
    l1Size: number,
    snapshot: number | undefined,
  ): Promise<void> => {
    const bytes = l1Size * 8;
    await visit.reference({ kind: "l1", offset: l1Offset, length: bytes, snapshot });
    if (l1Offset + bytes > fileSize || l1Offset % cs !== 0) {
      await problem({
        message: `${snapshot === undefined ? "active" : `snapshot ${snapshot}`} L1 table at ${hex(l1Offset)} is ${l1Offset % cs !== 0 ? "not aligned to the cluster size" : "past the end of the file"}`,
        offset: l1Offset,
        where: snapshot === undefined ? "l1" : "snapshot",
      });
      return;
    }
    const l1 = new U64TableView(new Uint8Array(bytes), "big");
    await backend.read(l1Offset, l1.bytes);
    for (let i = 0; i < l1.length; i++) {
      if (l1.isZero(i)) continue;
      const entryOffset = l1Offset + i * 8;
      const off = l1.getMasked(i, L1_OFFSET_MASK);
      const guest = { offset: i * l2Entries * cs, length: l2Entries * cs };
      if (l1.test(i, L1_RESERVED_MASK)) {
        await problem({
          message: `L1 entry ${i} ${hex(l1.getBigInt(i))} has reserved bits set`,
          offset: entryOffset,
          where: "l1",
          guest,
        });
      }
      if (off === 0) continue;
      if (off % cs !== 0) {
        await problem({
          message: `L2 table offset ${hex(off)} in L1 entry ${i} is not aligned to the cluster size ${cs}`,
          offset: entryOffset,
          where: "l1",
          guest,
        });
        continue;
      }
      if (off + cs > fileSize) {
        await problem({
          message: `L2 table at ${hex(off)} (L1 entry ${i}) is past the end of the file`,
          offset: entryOffset,
          where: "l1",
          guest,
        });
        continue;
      }
      await visit.reference({
        kind: "l2",
        offset: off,
        length: cs,
        snapshot,
        index: i,
        copied: l1.test(i, OFLAG_COPIED),
        entryOffset,
      });
      await backend.read(off, l2.bytes);
      for (let j = 0; j < l2Entries; j++) {
        const k = j * stride;
        const hi = l2.hi(k);
        const lo = l2.lo(k);
        if ((hi | lo) === 0) continue;
        const gIndex = i * l2Entries + j;
        const eOff = off + k * 8;
        const g = { offset: gIndex * cs, length: cs };
        if ((hi & OFLAG_COMPRESSED.hi) !== 0) {
          const d = decodeCompressed(hi, lo, layout);
          if (d.hostOffset === 0 || d.hostOffset + d.length > fileSize + 512) {
            await problem({
              message: `compressed cluster descriptor in L2 entry ${j} of table ${hex(off)} points to ${hex(d.hostOffset)}, outside the file`,
              offset: eOff,
              where: "l2",
              guest: g,
            });
            continue;
          }
          await visit.reference({
            kind: "compressed",
            offset: d.hostOffset,
            length: d.length,
            snapshot,
            index: gIndex,
            copied: (hi & OFLAG_COPIED.hi) !== 0,
            entryOffset: eOff,
          });
          continue;
        }
        const host = ((hi & L2_OFFSET_MASK.hi) >>> 0) * TWO_32 + ((lo & L2_OFFSET_MASK.lo) >>> 0);
        if (
          ((hi & L2_RESERVED_MASK.hi) |
            (lo & L2_RESERVED_MASK.lo & ~(extendedL2 ? 0 : OFLAG_ZERO.lo))) !==
          0
        ) {
          await problem({
            message: `L2 entry ${j} of table ${hex(off)} (${hex(l2.getBigInt(k))}) has reserved bits set`,
            offset: eOff,
            where: "l2",
            guest: g,
          });
        }
        if (host === 0) continue;
        if (host % cs !== 0) {
          await problem({
            message: `cluster offset ${hex(host)} in L2 entry ${j} of table ${hex(off)} is not aligned to the cluster size ${cs}`,
            offset: eOff,
            where: "l2",
            guest: g,
          });
          continue;
        }
        if (hasDataFile) continue; // data clusters live in the data file, not counted here
        await visit.reference({
          kind: "data",
          offset: host,
          length: cs,
          snapshot,
          index: gIndex,
          copied: (hi & OFLAG_COPIED.hi) !== 0,
          entryOffset: eOff,
        });
      }
    }
  };
  await walkL1(h.l1TableOffset, h.l1Size, undefined);
  for (let s = 0; s < input.snapshots.length; s++) {
    const snap = input.snapshots[s]!;
    await walkL1(snap.l1TableOffset, snap.l1Size, s);
  }

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
        const off = t.getMasked(i, L2_OFFSET_MASK);
        if (off > 1 && off % cs === 0 && off + cs <= fileSize) {
          await visit.reference({ kind: "bitmap-data", offset: off, length: cs });
        }
      }
    }
  }
}

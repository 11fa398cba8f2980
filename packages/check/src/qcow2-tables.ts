/**
 * The qcow2 check's walks over the L1/L2 tables, on the driver's table walk
 * (`walkTables` / `walkL1Table` of `@qimg/qcow2`) with the entry classifier: QEMU's
 * check_refcounts_l1/l2 and check_oflag_copied verdicts and repairs, and the metadata map a
 * repair consults first. The walk hands over raw entries; the policy (what is an error, what
 * a repair writes, the messages) is all here.
 */
import {
  ClusterType,
  compressedLength,
  compressedOffset,
  entryCopied,
  entryOffset,
  entryZeroFlag,
  l1ReservedBits,
  l2ReservedBits,
  reftableOffset,
  walkL1Table,
  walkTables,
  withCopied,
  withoutCopied,
} from "@qimg/qcow2";
import type { L1Cursor, L2Cursor } from "@qimg/qcow2";
import { U64TableView } from "@qimg/structs";
import {
  FIX_ERRORS,
  FIX_LEAKS,
  M_BITMAP,
  M_CRYPTO,
  M_DATA,
  M_HEADER,
  M_L1,
  M_L2,
  M_REFBLOCK,
  M_REFTABLE,
  M_SELF,
  M_SNAPTABLE,
  suspectSnapshotTable,
  MAX_L1_ENTRIES,
  hex64,
} from "./qcow2-pass.js";
import type { Pass } from "./qcow2-pass.js";
import type { StoredRefcounts } from "./stored.js";

/**
 * Build `p.meta` (for repairs): which host clusters of the file the header, the refcount
 * table and blocks, the snapshot table, bitmaps, the encryption header and the L1 tables
 * claim; then, from every L1 table that overlaps none of those, the L2 tables it names (M_L2)
 * and the data clusters those name (M_DATA). A table the map cannot trust adds nothing:
 * garbage pointers must not make real tables or data look like metadata. Bounded by the file
 * size.
 */
export async function buildMetaMap(p: Pass): Promise<void> {
  const L = p.layout;
  const h = L.header;
  const cs = p.cs;
  p.meta = new Uint16Array(Math.ceil(p.fileSize / cs));
  p.mark(0, cs, M_HEADER);
  if (!suspectSnapshotTable(L, p.fileSize, cs))
    p.mark(h.snapshotsOffset, L.snapshotsSize, M_SNAPTABLE);
  p.mark(h.refcountTableOffset, h.refcountTableClusters * cs, M_REFTABLE);
  const rt = p.stored.table;
  for (let i = 0; i < rt.length; i++) {
    const off = reftableOffset(rt.hi(i), rt.lo(i));
    if (off !== 0 && off % cs === 0) p.mark(off, cs, M_REFBLOCK);
  }
  if (L.encryptionHeader !== undefined) {
    p.mark(L.encryptionHeader.offset, L.encryptionHeader.length, M_CRYPTO);
  }
  if (L.bitmapDirectory !== undefined) {
    p.mark(L.bitmapDirectory.offset, L.bitmapDirectory.length, M_BITMAP);
    for (const bm of L.bitmaps) {
      const bytes = bm.bitmapTableSize * 8;
      if (bm.bitmapTableOffset % cs !== 0 || bm.bitmapTableOffset + bytes > p.fileSize) continue;
      p.mark(bm.bitmapTableOffset, bytes, M_BITMAP);
      const t = new U64TableView(new Uint8Array(bytes), "big");
      await p.backend.read(bm.bitmapTableOffset, t.bytes);
      for (let i = 0; i < t.length; i++) {
        const off = entryOffset(t.hi(i), t.lo(i));
        if (off !== 0 && off % cs === 0) p.mark(off, cs, M_BITMAP);
      }
    }
  }
  // L1 tables, the active one first: one is trusted (and claims its clusters, its L2
  // tables and their data) only when it lies inside the file and overlaps nothing claimed
  // so far. A snapshot L1 table whose size or offset is wrong must not make the active
  // image's tables or data look like metadata.
  const seen = new Set<number>();
  const hasDataFile = p.fmt.hasDataFile;
  await walkTables(p.src, { offset: h.l1TableOffset, size: h.l1Size }, L.snapshots, {
    l1Table: (c) => {
      if (!p.saneL1(c.tableOffset, c.tableSize)) return false;
      p.mark(c.tableOffset, c.tableSize * 8, M_L1);
      p.trustedL1.add(c.tableOffset);
      return true;
    },
    l1Entry: (c) => {
      const off = c.l2Offset;
      if (off === 0 || off % cs !== 0 || off >= p.fileSize) return false;
      if (off >= c.tableOffset && off < c.tableOffset + c.tableSize * 8) {
        p.mark(off, cs, M_SELF);
        return false;
      }
      p.mark(off, cs, M_L2);
      if (seen.has(off) || (p.meta[off / cs]! & ~M_L2) !== 0) return false;
      seen.add(off);
      return true;
    },
    l2Entry: (c) => {
      const type = c.type;
      if (type === ClusterType.Compressed) {
        const host = compressedOffset(p.fmt, c.hi, c.lo);
        if (host < p.fileSize) p.mark(host, compressedLength(p.fmt, c.hi, c.lo), M_DATA);
      } else if ((type === ClusterType.Normal || type === ClusterType.ZeroAlloc) && !hasDataFile) {
        p.mark(entryOffset(c.hi, c.lo), cs, M_DATA);
      }
    },
  });
}

/** check_refcounts_l1 and check_refcounts_l2 over one L1 table, with their repairs. */
class TableCheck {
  readonly #p: Pass;
  readonly #fragInfo: boolean;
  /** What a repair may do through this L1 table. */
  readonly #l1Fix: number;
  /** What a repair may do inside the current L2 table. */
  #l2Fix = 0;
  #nextContiguous = 0;

  constructor(p: Pass, fragInfo: boolean, l1Fix: number) {
    this.#p = p;
    this.#fragInfo = fragInfo;
    this.#l1Fix = l1Fix;
  }

  /** An L1 entry: its verdict, a repair that drops it, or the L2 table to walk. */
  l1Entry = (c: L1Cursor): boolean | Promise<boolean> => {
    const p = this.#p;
    const cs = p.cs;
    const { hi, lo, entryOffset } = c;
    if (l1ReservedBits(hi, lo)) {
      p.log(
        "corruption",
        `ERROR found L1 entry with reserved bits set: ${hex64(hi, lo)}`,
        entryOffset,
      );
      p.res.corruptions++;
    }
    const l2Offset = c.l2Offset;
    const misaligned = l2Offset % cs !== 0;
    const outside = l2Offset + cs - p.fileSize >= cs;
    // Offset 0 (an entry holding only flags), the header cluster, or a cluster that other
    // metadata claims: never an L2 table a repair may write into.
    const onMeta = !misaligned && !outside && p.l2OnOtherMeta(l2Offset);
    if (
      this.#l1Fix & FIX_ERRORS &&
      (misaligned || outside || onMeta) &&
      p.l1EntryWritable(entryOffset)
    ) {
      return this.#dropL1(c, misaligned, outside);
    }
    p.inc(l2Offset, cs);
    if (misaligned) {
      p.log(
        "corruption",
        `ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`,
        entryOffset,
      );
      p.res.corruptions++;
    }
    // Through an L1 table that cannot be trusted, nothing is written at all.
    this.#l2Fix = p.l2Writable(l2Offset) ? this.#l1Fix : this.#l1Fix & ~FIX_ERRORS;
    this.#nextContiguous = 0;
    return true;
  };

  /** Our -r all extension: drop an L1 entry whose L2 table cannot be where it says. */
  async #dropL1(c: L1Cursor, misaligned: boolean, outside: boolean): Promise<boolean> {
    const p = this.#p;
    const { hi, lo, entryOffset, l2Offset } = c;
    p.res.corruptions++;
    const reason = misaligned
      ? "L2 table not aligned to the cluster size"
      : outside
        ? "L2 table outside the image file"
        : l2Offset === 0
          ? "L1 entry without an L2 table offset"
          : "L2 table overlaps other metadata";
    p.log(
      "corruption",
      misaligned
        ? `ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`
        : outside
          ? `ERROR l2_offset=${l2Offset.toString(16)}: L2 table is outside the image file; L1 entry corrupted`
          : l2Offset === 0
            ? `ERROR l1_entry=${hex64(hi, lo)}: L1 entry has flags but no L2 table offset; L1 entry corrupted`
            : `ERROR l2_offset=${l2Offset.toString(16)}: L2 table overlaps other metadata; L1 entry corrupted`,
      entryOffset,
    );
    await p.write(entryOffset, new Uint8Array(8));
    c.invalidate();
    p.res.corruptions--;
    p.res.corruptionsFixed++;
    const span = p.fmt.entriesPerTable * p.cs;
    const guest = c.index * span;
    const virtualSize = p.layout.header.size;
    // Offset 0 reads as unallocated before and after: nothing is lost.
    if (guest < virtualSize && l2Offset !== 0) {
      p.lost.push({ offset: guest, length: Math.min(span, virtualSize - guest), reason });
    }
    p.log("repair", `Repairing L1 entry ${c.index}: dropped (${reason})`, entryOffset);
    return false;
  }

  /** Our -r all extension: unmap an L2 entry that points nowhere valid. */
  async #dropL2(c: L2Cursor, reason: string, replacement: number): Promise<void> {
    const p = this.#p;
    const e = new U64TableView(new Uint8Array(p.fmt.stride * 8), "big");
    e.setWords(0, 0, replacement);
    await p.write(c.entryOffset, e.bytes);
    c.invalidate();
    p.res.corruptions--;
    p.res.corruptionsFixed++;
    const guest = c.guestCluster * p.cs;
    const virtualSize = p.layout.header.size;
    if (replacement === 0 && guest < virtualSize) {
      p.lost.push({ offset: guest, length: Math.min(p.cs, virtualSize - guest), reason });
    }
    p.log(
      "repair",
      `Repairing L2 entry ${c.index} of table ${c.tableOffset.toString(16)}: ${reason}`,
      c.entryOffset,
    );
  }

  /** An L2 entry (check_refcounts_l2): a promise only when a repair writes. */
  l2Entry = (c: L2Cursor): void | Promise<void> => {
    const p = this.#p;
    const fmt = p.fmt;
    const cs = p.cs;
    const fix = this.#l2Fix;
    let hi = c.hi;
    const lo = c.lo;
    const bmHi = c.bitmapHi;
    const bmLo = c.bitmapLo;
    const at = c.entryOffset;
    const type = c.type;
    if (type !== ClusterType.Compressed && l2ReservedBits(hi, lo)) {
      p.log("corruption", `ERROR found l2 entry with reserved bits set: ${hex64(hi, lo)}`, at);
      p.res.corruptions++;
    }
    switch (type) {
      case ClusterType.Compressed: {
        const host = compressedOffset(fmt, hi, lo);
        if (entryCopied(hi)) {
          p.log(
            "corruption",
            `ERROR: coffset=0x${host.toString(16)}: copied flag must never be set for compressed clusters`,
            at,
          );
          hi = withoutCopied(hi);
          p.res.corruptions++;
        }
        if (fmt.hasDataFile) {
          p.log(
            "corruption",
            `ERROR compressed cluster ${c.index} with data file, entry=0x${hex64(hi, lo)}`,
            at,
          );
          p.res.corruptions++;
          return;
        }
        if ((bmHi | bmLo) !== 0) {
          p.log(
            "corruption",
            `ERROR compressed cluster ${c.index} with non-zero subcluster allocation bitmap, entry=0x${hex64(hi, lo)}`,
            at,
          );
          p.res.corruptions++;
          return;
        }
        const length = compressedLength(fmt, hi, lo);
        if (fix & FIX_ERRORS && host + length - p.fileSize >= cs) {
          p.res.corruptions++;
          p.log(
            "corruption",
            `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${host.toString(16)} size 0x${length.toString(16)}`,
            host,
          );
          return this.#dropL2(c, "compressed data outside the image file", 0);
        } else if (fix & FIX_ERRORS && p.overlapsMeta(host, length)) {
          p.res.corruptions++;
          p.log(
            "corruption",
            `ERROR coffset=0x${host.toString(16)}: compressed data overlaps metadata; L2 entry corrupted`,
            at,
          );
          return this.#dropL2(c, "compressed data overlaps metadata", 0);
        }
        p.inc(host, length);
        if (this.#fragInfo) {
          p.res.allocated++;
          p.res.compressed++;
          p.res.fragmented++;
        }
        return;
      }
      case ClusterType.Normal:
      case ClusterType.ZeroAlloc: {
        const offset = entryOffset(hi, lo);
        if (fmt.extendedL2 && (bmHi & bmLo) !== 0) {
          p.res.corruptions++;
          p.log(
            "corruption",
            `ERROR offset=${offset.toString(16)}: Allocated cluster has corrupted subcluster allocation bitmap`,
            at,
          );
        }
        if (offset % cs !== 0) {
          p.res.corruptions++;
          const containsData = fmt.extendedL2 ? bmLo !== 0 : !entryZeroFlag(lo);
          if (!containsData) {
            p.log(
              "corruption",
              `${fix & FIX_ERRORS ? "Repairing" : "ERROR"} offset=${offset.toString(16)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
              at,
            );
            if (fix & FIX_ERRORS) return this.#zeroPlain(c);
          } else {
            p.log(
              "corruption",
              `ERROR offset=${offset.toString(16)}: Data cluster is not properly aligned; L2 entry corrupted.`,
              at,
            );
            if (fix & FIX_ERRORS) {
              return this.#dropL2(c, "data cluster offset not aligned to the cluster size", 0);
            }
          }
        }
        // A preallocated zero cluster stays a zero cluster; data is lost.
        const preallocZero = !fmt.extendedL2 && entryZeroFlag(lo);
        if (!fmt.hasDataFile && fix & FIX_ERRORS && offset + cs - p.fileSize >= cs) {
          p.res.corruptions++;
          p.log(
            "corruption",
            `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offset.toString(16)} size 0x${cs.toString(16)}`,
            offset,
          );
          return this.#dropL2(c, "data cluster outside the image file", preallocZero ? 1 : 0);
        }
        if (!fmt.hasDataFile && fix & FIX_ERRORS && p.overlapsMeta(offset, cs)) {
          // Our -r all extension: a data cluster on top of metadata would let guest writes
          // overwrite the metadata (and metadata updates the guest data).
          p.res.corruptions++;
          p.log(
            "corruption",
            `ERROR offset=${offset.toString(16)}: Data cluster overlaps metadata; L2 entry corrupted`,
            at,
          );
          return this.#dropL2(c, "data cluster overlaps metadata", preallocZero ? 1 : 0);
        }
        if (this.#fragInfo) {
          p.res.allocated++;
          if (this.#nextContiguous !== 0 && offset !== this.#nextContiguous) p.res.fragmented++;
          this.#nextContiguous = offset + cs;
        }
        if (!fmt.hasDataFile) {
          if (offset % cs === 0 && offset < p.fileSize) p.incCluster(offset / cs);
          else p.inc(offset, cs);
        }
        return;
      }
      case ClusterType.ZeroPlain:
        return;
      case ClusterType.Unallocated:
        if (fmt.extendedL2 && bmLo !== 0) {
          p.res.corruptions++;
          p.log(
            "corruption",
            "ERROR: Unallocated cluster has non-zero subcluster allocation map",
            at,
          );
        }
        return;
    }
  };

  /**
   * A preallocated zero cluster whose offset is misaligned becomes a plain zero cluster (as
   * QEMU's fix_l2_entry_by_zero: the descriptor becomes the zero flag alone; with extended L2
   * entries the subcluster bitmap is kept, so subclusters that read as zeros still do).
   */
  async #zeroPlain(c: L2Cursor): Promise<void> {
    const p = this.#p;
    const e = new U64TableView(new Uint8Array(p.fmt.stride * 8), "big");
    e.setWords(0, 0, 1);
    if (p.fmt.extendedL2) e.setWords(1, c.bitmapHi, c.bitmapLo);
    await p.write(c.entryOffset, e.bytes);
    c.invalidate();
    p.res.corruptions--;
    p.res.corruptionsFixed++;
  }
}

/** check_refcounts_l1: count the L1 table, its L2 tables and their clusters (and repair). */
export async function checkL1(
  p: Pass,
  l1Offset: number,
  l1Size: number,
  fragInfo: boolean,
  fix: number,
  copied?: CopiedCheck,
): Promise<void> {
  if (l1Size === 0) return;
  p.inc(l1Offset, l1Size * 8);
  // A table past the end of the file reads as zeros: nothing to walk (the walk reads none).
  // A repair never writes into or through an L1 "table" that overlaps other metadata.
  const l1Fix = p.l1Trusted(l1Offset) ? fix : fix & ~FIX_ERRORS;
  const t = new TableCheck(p, fragInfo, l1Fix);
  if (copied === undefined) {
    await walkL1Table(p.src, l1Offset, l1Size, undefined, {
      l1Entry: t.l1Entry,
      l2Entry: t.l2Entry,
    });
    return;
  }
  // A plain check of the active table: the COPIED verdicts in the same walk (nothing is
  // written: the check's callbacks never return a promise here).
  await walkL1Table(p.src, l1Offset, l1Size, undefined, {
    l1Entry: (c) => {
      const go = t.l1Entry(c);
      const o = copied.l1Entry(c);
      if (go instanceof Promise || o instanceof Promise) {
        return Promise.all([go, o]).then(([g]) => g);
      }
      return go;
    },
    l2Entry: (c) => {
      const r = t.l2Entry(c);
      if (r instanceof Promise) return r.then(() => copied.l2Entry(c));
      return copied.l2Entry(c);
    },
  });
}

/**
 * calculate_refcounts. For a plain check (`fix` 0, `withCopied`) it also gathers the COPIED
 * verdicts of the active table in the same walk and returns them, held back for after the
 * comparison (one walk of the tables instead of two).
 */
export async function calculate(
  p: Pass,
  fix: number,
  withCopied = false,
): Promise<CopiedCheck | undefined> {
  const L = p.layout;
  const h = L.header;
  p.inc(0, p.cs);
  const copied = withCopied && fix === 0 ? new CopiedCheck(p, false, true) : undefined;
  await checkL1(p, h.l1TableOffset, h.l1Size, true, fix, copied);
  if (p.fmt.hasDataFile && h.nbSnapshots > 0) {
    p.log("corruption", `ERROR ${h.nbSnapshots} snapshots in image with data file`);
    p.res.corruptions++;
  }
  for (const sn of L.snapshots) {
    if (sn.l1TableOffset % p.cs !== 0) {
      p.log(
        "corruption",
        `ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${sn.l1TableOffset.toString(16)}: L1 table is not cluster aligned; snapshot table entry corrupted`,
        sn.offset,
      );
      p.res.corruptions++;
      continue;
    }
    if (sn.l1Size > MAX_L1_ENTRIES) {
      p.log(
        "corruption",
        `ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${sn.l1Size.toString(16)}: L1 table is too large; snapshot table entry corrupted`,
        sn.offset,
      );
      p.res.corruptions++;
      continue;
    }
    await checkL1(p, sn.l1TableOffset, sn.l1Size, false, fix);
  }
  p.inc(h.snapshotsOffset, L.snapshotsSize);
  p.tagRefcount = true;
  p.inc(h.refcountTableOffset, h.refcountTableClusters * p.cs);
  p.tagRefcount = false;
  if (L.encryptionHeader !== undefined) {
    p.inc(L.encryptionHeader.offset, L.encryptionHeader.length);
  }
  await p.checkBitmaps();
  await p.checkRefblocks(fix);
  return copied;
}

/**
 * check_oflag_copied over the active L1 table: COPIED must be set exactly where the stored
 * refcount is 1 (with repairs). Runs as its own walk after the refcounts were compared, or,
 * for a plain check (nothing is written, so the stored refcounts cannot change in between),
 * inside the first walk with its verdicts held back until {@link CopiedCheck.flush}.
 */
export class CopiedCheck {
  readonly #p: Pass;
  readonly #repair: boolean;
  readonly #trusted: boolean;
  /** Verdicts held back (text, offset), when deferred. */
  readonly #held: { text: string; offset: number }[] | undefined;
  /** Whether the current L2 table's entries are checked (its L1 entry's refcount was read). */
  #on = false;
  /** The current L2 table may be rewritten with fixed COPIED flags. */
  #aligned = false;
  #dirty = 0;

  readonly #stored: StoredRefcounts;
  readonly #cs: number;
  readonly #dataFile: boolean;

  constructor(p: Pass, repair: boolean, deferred: boolean) {
    this.#p = p;
    this.#stored = p.stored;
    this.#cs = p.cs;
    this.#dataFile = p.fmt.hasDataFile;
    this.#repair = repair;
    this.#trusted = p.l1Trusted(p.layout.header.l1TableOffset);
    this.#held = deferred ? [] : undefined;
  }

  /** Report a wrong COPIED flag (now, or held back). */
  #report(text: string, offset: number): void {
    if (this.#held !== undefined) {
      this.#held.push({ text, offset });
      return;
    }
    this.#p.res.corruptions++;
    this.#p.log(this.#repair ? "repair" : "corruption", text, offset);
  }

  /** Log the held-back verdicts (after the refcount comparison, where QEMU reports them). */
  flush(): void {
    if (this.#held === undefined) return;
    for (const m of this.#held) {
      this.#p.res.corruptions++;
      this.#p.log("corruption", m.text, m.offset);
    }
    this.#held.length = 0;
  }

  /** An L1 entry: check its COPIED flag; true when its L2 table's entries are to be checked. */
  l1Entry = (c: L1Cursor): boolean | Promise<boolean> => {
    this.#on = false;
    if (c.l2Offset === 0) return false;
    let rc: number | Promise<number>;
    try {
      rc = this.#p.storedRefcount(Math.floor(c.l2Offset / this.#p.cs));
    } catch {
      return false;
    }
    if (typeof rc === "number") return this.#l1(c, rc);
    return rc.then(
      (n) => this.#l1(c, n),
      () => false,
    );
  };

  #l1(c: L1Cursor, refcount: number): boolean | Promise<boolean> {
    const p = this.#p;
    const l2Offset = c.l2Offset;
    this.#aligned = l2Offset % p.cs === 0 && p.l2Writable(l2Offset) && this.#trusted;
    this.#dirty = 0;
    this.#on = true;
    if ((refcount === 1) === entryCopied(c.hi)) return true;
    const repair = this.#repair;
    const at = c.entryOffset;
    this.#report(
      `${repair ? "Repairing" : "ERROR"} OFLAG_COPIED L2 cluster: l1_index=${c.index} l1_entry=${hex64(c.hi, c.lo)} refcount=${refcount}`,
      at,
    );
    if (repair && this.#trusted && p.l1EntryWritable(at)) return this.#fixL1(c, refcount);
    return true;
  }

  async #fixL1(c: L1Cursor, refcount: number): Promise<boolean> {
    const p = this.#p;
    c.table.setWords(c.index, withCopied(c.hi, refcount === 1), c.lo);
    await p.write(c.entryOffset, c.table.bytes.subarray(c.index * 8, c.index * 8 + 8));
    c.invalidate();
    p.res.corruptions--;
    p.res.corruptionsFixed++;
    return true;
  }

  /** An L2 entry of a table whose L1 entry was checked (no promise unless a block is read). */
  l2Entry = (c: L2Cursor): void | Promise<void> => {
    if (!this.#on) return;
    const type = c.type;
    if (type !== ClusterType.Normal && type !== ClusterType.ZeroAlloc) return;
    const copied = entryCopied(c.hi);
    if (this.#dataFile) {
      if (!copied) this.#l2(c, 1);
      return;
    }
    const k = Math.floor(entryOffset(c.hi, c.lo) / this.#cs);
    let rc: number;
    try {
      rc = this.#stored.peek(k);
    } catch {
      return;
    }
    if (rc < 0) return this.#l2Read(c, k);
    if ((rc === 1) !== copied) this.#l2(c, rc);
  };

  async #l2Read(c: L2Cursor, k: number): Promise<void> {
    let rc: number;
    try {
      rc = await this.#stored.get(k);
    } catch {
      return;
    }
    this.#l2(c, rc);
  }

  #l2(c: L2Cursor, rc: number): void {
    const { hi, lo } = c;
    if ((rc === 1) === entryCopied(hi)) return;
    const repair = this.#repair;
    this.#report(
      `${repair ? "Repairing" : "ERROR"} OFLAG_COPIED data cluster: l2_entry=${hex64(hi, lo)} refcount=${rc}`,
      c.entryOffset,
    );
    if (repair && this.#aligned) {
      c.table.setWords(c.word, withCopied(hi, rc === 1), lo);
      this.#dirty++;
    }
  }

  /** After an L2 table: write it back when flags were fixed in it. */
  l2TableDone = (c: L2Cursor): void | Promise<void> => {
    if (this.#dirty === 0) return;
    return this.#writeBack(c);
  };

  async #writeBack(c: L2Cursor): Promise<void> {
    const p = this.#p;
    await p.write(c.tableOffset, c.table.bytes);
    c.invalidate();
    p.res.corruptions -= this.#dirty;
    p.res.corruptionsFixed += this.#dirty;
    this.#dirty = 0;
  }
}

/** Whether check_oflag_copied repairs, as QEMU decides it. */
function copiedRepair(p: Pass, fix: number): boolean {
  if (fix & FIX_ERRORS) return true;
  if (fix & FIX_LEAKS) {
    return p.res.checkErrors === 0 && p.res.corruptions === 0 && p.res.leaks === 0;
  }
  return false;
}

/** check_oflag_copied as its own walk of the active L1 table. */
export async function checkOflagCopied(p: Pass, fix: number): Promise<void> {
  const h = p.layout.header;
  const t = new CopiedCheck(p, copiedRepair(p, fix), false);
  await walkL1Table(p.src, h.l1TableOffset, h.l1Size, undefined, {
    l1Entry: t.l1Entry,
    l2Entry: t.l2Entry,
    l2TableDone: t.l2TableDone,
  });
}

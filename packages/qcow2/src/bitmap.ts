/**
 * Persistent dirty bitmaps, kept up to date by a read-write open the way QEMU keeps them
 * (block/qcow2-bitmap.c; "Bitmaps extension" in docs/interop/qcow2.txt):
 *
 * - open: every bitmap that is not already in use is checked and marked in use (IN_USE) on
 *   disk before the first guest write; the directory is rewritten in place with the bitmaps
 *   autoclear bit cleared around the write, so a torn directory is never trusted;
 * - every write, write-zeroes, discard and compressed write sets the dirty bits of the guest
 *   range it was asked to change in each enabled (AUTO) bitmap: one in-memory bit per
 *   granularity chunk;
 * - management (bitmap-manage.ts) adds, removes, clears, enables, disables and merges bitmaps
 *   in memory, as QEMU's block layer does; nothing of it reaches the disk before the close;
 * - clean close: the new bits are merged with the stored ones into fresh clusters, each
 *   changed bitmap gets a fresh table (larger after a resize), and the directory then points
 *   at them with IN_USE cleared, the same careful way (or, when bitmaps were added or
 *   removed, a new directory is written to fresh clusters and one header-area update switches
 *   to it); the replaced clusters are freed last.
 *
 * A crash leaves the bitmaps IN_USE, which QEMU reports as inconsistent, as it should.
 * Bitmaps already in use at open are left exactly as they are (they can only be removed);
 * disabled bitmaps keep their data (their table only grows with the disk).
 */
import {
  CorruptImageError,
  InvalidArgumentError,
  UnsupportedFeatureError,
  hex,
} from "@qimg/structs";
import type { U64TableView } from "@qimg/structs";
import type { BlockBackend } from "@qimg/io";
import {
  BitmapFlag,
  bitmapDirectorySlots,
  encodeBitmapDirectory,
  patchBitmapDirEntry,
} from "./spec/bitmap-directory.js";
import type { BitmapDirSlot, BitmapEntry } from "./spec/bitmap-directory.js";
import {
  BITMAP_MAX_DATA_BYTES,
  BITMAP_MAX_GRANULARITY_BITS,
  BITMAP_MAX_TABLE_SIZE,
  BITMAP_MIN_GRANULARITY_BITS,
  BITMAP_TABLE_ENTRY_SIZE,
  BitmapChunk,
  bitmapDataBytes,
  bitmapTableSize,
  bitmapTableView,
  classifyBitmapTableEntry,
} from "./spec/bitmap-table.js";

/** Where the bitmap directory is, and how many entries it has. */
export interface BitmapDirectoryLocation {
  readonly offset: number;
  readonly length: number;
  readonly count: number;
}

/** What the bitmap module needs from the driver. */
export interface BitmapHost {
  /** The qcow2 file itself (not an external data file). */
  readonly backend: BlockBackend;
  readonly clusterSize: number;
  /** Allocate `n` contiguous clusters (refcount 1); returns the host offset of the first. */
  allocate(n: number): Promise<number>;
  /** Drop the reference to `n` clusters at `offset` once nothing on disk points there. */
  free(offset: number, n: number): Promise<void>;
  /** Make refcount changes and every write so far durable. */
  sync(): Promise<void>;
  /** Set or clear the bitmaps autoclear bit in the header; durable when it resolves. */
  setAutoclear(on: boolean): Promise<void>;
  /**
   * Overlap check before the directory is rewritten in place: throws (and marks the image
   * corrupt) when [offset, +length) holds other metadata.
   */
  checkDirectoryWrite(offset: number, length: number): Promise<void>;
  /**
   * Point the header at another directory (undefined: no bitmaps any more) with one
   * header-area update: the bitmaps extension and the autoclear bit; durable when it
   * resolves. Needed only once bitmaps were added or removed.
   */
  switchDirectory?(dir: BitmapDirectoryLocation | undefined): Promise<void>;
}

/** One bitmap, as this open sees it. */
interface Tracked {
  readonly name: string;
  /** Where its entry is in the directory read at open (undefined for a bitmap added now). */
  readonly slot: BitmapDirSlot | undefined;
  /** Flags at open (before this open marked it in use). */
  readonly flags: number;
  readonly granularityBits: number;
  readonly granularity: number;
  /** Not in use at open: this open owns it and stores it back at close. */
  readonly consistent: boolean;
  /** Consistent and AUTO: writes set its bits. */
  enabled: boolean;
  tableOffset: number;
  tableSize: number;
  /** The table as stored (consistent bitmaps only; undefined for a bitmap added now). */
  table: U64TableView | undefined;
  /**
   * Bits set since open (merged into the stored bits at close), or with `full` every bit of
   * the bitmap (the stored ones no longer count: written afresh at close).
   */
  bits: Uint8Array;
  full: boolean;
  /**
   * The disk shrank since open: the stored bits are read back (up to the smallest size the
   * disk had) and the bitmap is written afresh at close.
   */
  reload: boolean;
  /** One byte per bitmap table entry: 1 when `bits` has new bits in that cluster's range. */
  changed: Uint8Array;
}

/** A bitmap of this open, for the management and reading code (bitmap-manage.ts). */
export interface TrackedBitmap {
  readonly name: string;
  readonly granularityBits: number;
  readonly granularity: number;
  /** False for a bitmap that was in use on disk when opened (inconsistent). */
  readonly consistent: boolean;
  readonly enabled: boolean;
  /** Flags on disk at open (0 for a bitmap added now). */
  readonly flags: number;
}

const EMPTY = new Uint8Array(0);

/** Set bits [first, last] of `bits` (least significant bit first in each byte). */
export function setBitRange(bits: Uint8Array, first: number, last: number): void {
  const fb = Math.floor(first / 8);
  const lb = Math.floor(last / 8);
  const head = (0xff << (first % 8)) & 0xff;
  const tail = 0xff >>> (7 - (last % 8));
  if (fb === lb) {
    bits[fb]! |= head & tail;
    return;
  }
  bits[fb]! |= head;
  if (lb > fb + 1) bits.fill(0xff, fb + 1, lb);
  bits[lb]! |= tail;
}

/** Clear every bit from bit `nbits` on (`bits` holds whole bytes). */
function clearPastEnd(bits: Uint8Array, nbits: number): void {
  const byte = Math.floor(nbits / 8);
  if (byte >= bits.length) return;
  if (nbits % 8 !== 0) {
    bits[byte]! &= 0xff >>> (8 - (nbits % 8));
    bits.fill(0, byte + 1);
  } else bits.fill(0, byte);
}

/**
 * Read bitmap data cluster `c` (as `table` says: zeros, ones or a data cluster) into `out`
 * (`clusterSize` bytes). Returns false for a table entry that breaks the spec.
 */
async function readChunk(
  backend: BlockBackend,
  table: U64TableView,
  c: number,
  cs: number,
  out: Uint8Array,
): Promise<boolean> {
  if (c >= table.length) {
    out.fill(0);
    return true;
  }
  const kind = classifyBitmapTableEntry(table, c, cs);
  if (typeof kind === "string") return false;
  if (kind.kind === BitmapChunk.ones) out.fill(0xff);
  else if (kind.kind === BitmapChunk.zeros) out.fill(0);
  else await backend.read(kind.offset, out);
  return true;
}

/** The data clusters a bitmap table points at (entries that break the spec are skipped). */
function dataClusters(table: U64TableView, cs: number): number[] {
  const out: number[] = [];
  for (let c = 0; c < table.length; c++) {
    const kind = classifyBitmapTableEntry(table, c, cs);
    if (typeof kind !== "string" && kind.kind === BitmapChunk.data) out.push(kind.offset);
  }
  return out;
}

/**
 * The persistent bitmaps of one read-write open. Create with {@link PersistentBitmaps.load}
 * (or {@link PersistentBitmaps.empty}), then {@link markInUse}; call {@link setDirty} for
 * every guest range a request changes and {@link store} on a clean close.
 */
export class PersistentBitmaps {
  /** Enabled, consistent bitmaps (the hot path walks only these). */
  private active: Tracked[];
  private stored = false;
  /** Bitmaps were added or removed: the close writes a new directory. */
  private restructured = false;
  /** Removed bitmaps' tables (offset, entries), freed after the new directory is in effect. */
  private readonly removed: { tableOffset: number; tableSize: number }[] = [];
  /** The smallest virtual size since open: stored bits past it were cut off by a shrink. */
  private minSize: number;

  private constructor(
    private host: BitmapHost,
    private readonly dirOffset: number,
    private readonly dir: Uint8Array,
    private readonly tracked: Tracked[],
    private size: number,
  ) {
    this.active = tracked.filter((t) => t.enabled);
    this.minSize = size;
  }

  /** A set with no bitmaps yet (an image without a bitmap directory), for adding some. */
  static empty(host: BitmapHost, virtualSize: number): PersistentBitmaps {
    return new PersistentBitmaps(host, 0, EMPTY, [], virtualSize);
  }

  /**
   * Check the directory and the tables of the bitmaps not in use (refusing the open the way
   * QEMU refuses it when they break the spec); writes nothing. Then call {@link markInUse}
   * before the first guest write. `entries` are the decoded directory entries;
   * `virtualSize` the guest size in bytes.
   */
  static async load(
    host: BitmapHost,
    directory: { readonly offset: number; readonly length: number },
    entries: readonly BitmapEntry[],
    virtualSize: number,
  ): Promise<PersistentBitmaps> {
    const cs = host.clusterSize;
    const fileSize = await host.backend.size();
    const dir = new Uint8Array(directory.length);
    await host.backend.read(directory.offset, dir);
    const slots = bitmapDirectorySlots(dir, entries.length, directory.offset);
    const used = slots.reduce((n, s) => n + s.size, 0);
    if (used !== dir.byteLength) {
      throw new CorruptImageError(
        `bitmap directory at ${hex(directory.offset)} is broken: its ${entries.length} entries use ${used} of ${dir.byteLength} bytes`,
        { offset: directory.offset },
      );
    }
    const tracked: Tracked[] = [];
    for (let i = 0; i < entries.length; i++) {
      const e = entries[i]!;
      const slot = slots[i]!;
      const at = directory.offset + slot.position;
      if (slot.extraDataSize !== 0) {
        throw new UnsupportedFeatureError(
          `bitmap '${e.name}' has ${slot.extraDataSize} bytes of extra data, which is not supported`,
          ["bitmap extra data"],
          { offset: at },
        );
      }
      const inUse = (e.flags & BitmapFlag.inUse) !== 0;
      const bad =
        e.bitmapTableSize === 0 ||
        e.bitmapTableOffset === 0 ||
        e.bitmapTableOffset % cs !== 0 ||
        e.bitmapTableSize > BITMAP_MAX_TABLE_SIZE ||
        e.granularityBits > BITMAP_MAX_GRANULARITY_BITS ||
        e.granularityBits < BITMAP_MIN_GRANULARITY_BITS ||
        (e.flags & ~(BitmapFlag.inUse | BitmapFlag.auto)) !== 0 ||
        e.type !== 1 ||
        e.bitmapTableSize * cs > BITMAP_MAX_DATA_BYTES ||
        (!inUse && virtualSize > e.bitmapTableSize * cs * 8 * 2 ** e.granularityBits);
      if (bad) {
        throw new CorruptImageError(
          `bitmap '${e.name}' (directory entry at ${hex(at)}) does not satisfy the constraints of the qcow2 spec`,
          { offset: at },
        );
      }
      let table: U64TableView | undefined;
      if (!inUse) {
        const expected = bitmapTableSize(virtualSize, e.granularityBits, cs);
        const bytes = e.bitmapTableSize * BITMAP_TABLE_ENTRY_SIZE;
        if (e.bitmapTableSize !== expected || e.bitmapTableOffset + bytes > fileSize) {
          throw new CorruptImageError(
            `bitmap '${e.name}' table at ${hex(e.bitmapTableOffset)} has ${e.bitmapTableSize} entries, expected ${expected} inside the ${fileSize}-byte file`,
            { offset: at },
          );
        }
        table = bitmapTableView(new Uint8Array(bytes));
        await host.backend.read(e.bitmapTableOffset, table.bytes);
        for (let j = 0; j < table.length; j++) {
          const c = classifyBitmapTableEntry(table, j, cs);
          if (typeof c === "string") {
            throw new CorruptImageError(`bitmap '${e.name}': ${c}`, {
              offset: e.bitmapTableOffset + j * 8,
            });
          }
          if (c.kind === BitmapChunk.data && c.offset + cs > fileSize) {
            throw new CorruptImageError(
              `bitmap '${e.name}': data cluster ${hex(c.offset)} is past the end of the file`,
              { offset: e.bitmapTableOffset + j * 8 },
            );
          }
        }
      }
      const enabled = !inUse && (e.flags & BitmapFlag.auto) !== 0;
      tracked.push({
        name: e.name,
        slot,
        flags: e.flags,
        granularityBits: e.granularityBits,
        granularity: 2 ** e.granularityBits,
        consistent: !inUse,
        enabled,
        tableOffset: e.bitmapTableOffset,
        tableSize: e.bitmapTableSize,
        table,
        bits: enabled ? new Uint8Array(bitmapDataBytes(virtualSize, e.granularityBits)) : EMPTY,
        full: false,
        reload: false,
        changed: enabled ? new Uint8Array(e.bitmapTableSize) : EMPTY,
      });
    }
    return new PersistentBitmaps(host, directory.offset, dir, tracked, virtualSize);
  }

  /** Replace the driver callbacks (the management code brings one that can switch directories). */
  useHost(host: BitmapHost): void {
    this.host = host;
  }

  /** Mark every consistent bitmap in use on disk (QEMU does this for all it loads). */
  async markInUse(): Promise<void> {
    await this.patchDirectory((t) => t.flags | BitmapFlag.inUse);
  }

  /**
   * Rewrite, in place, the directory entry of every consistent bitmap that has one: its
   * table's offset and size, and the flags `flagsOf` gives it; written only if any changed.
   */
  private async patchDirectory(flagsOf: (t: Tracked) => number): Promise<void> {
    let any = false;
    for (const t of this.tracked) {
      if (!t.consistent || !t.slot) continue;
      any = true;
      patchBitmapDirEntry(this.dir, t.slot.position, {
        bitmapTableOffset: t.tableOffset,
        bitmapTableSize: t.tableSize,
        flags: flagsOf(t),
      });
    }
    if (any) await this.writeDirectory();
  }

  /**
   * Rewrite the directory in place: the autoclear bit is off while the write is under way,
   * so a torn directory is never taken for a valid one (it then only costs the bitmaps).
   */
  private async writeDirectory(): Promise<void> {
    await this.host.checkDirectoryWrite(this.dirOffset, this.dir.byteLength);
    await this.host.setAutoclear(false);
    await this.host.backend.write(this.dirOffset, this.dir);
    await this.host.backend.flush();
    await this.host.setAutoclear(true);
  }

  /**
   * Record that guest bytes [offset, offset + length) changed: sets the bits in every enabled
   * bitmap. Allocation-free; call it for every write, write-zeroes, discard and compressed
   * write, with the range as requested.
   */
  setDirty(offset: number, length: number): void {
    if (length <= 0) return;
    const perChunk = this.host.clusterSize * 8;
    const active = this.active;
    for (let i = 0; i < active.length; i++) {
      const t = active[i]!;
      const first = Math.floor(offset / t.granularity);
      const last = Math.floor((offset + length - 1) / t.granularity);
      setBitRange(t.bits, first, last);
      const c0 = Math.floor(first / perChunk);
      const c1 = Math.floor(last / perChunk);
      if (c0 === c1) t.changed[c0] = 1;
      else t.changed.fill(1, c0, c1 + 1);
    }
  }

  /** Throw (as QEMU refuses) when the disk must not be resized: a bitmap is inconsistent. */
  checkResize(): void {
    for (const t of this.tracked) {
      if (!t.consistent) {
        throw new InvalidArgumentError(
          `Bitmap '${t.name}' is inconsistent and cannot be used (remove it before resizing)`,
        );
      }
    }
  }

  /**
   * The disk was resized to `newSize` bytes: bitmaps follow it, as QEMU's do (bits past a
   * smaller end are dropped; bits of a grown area start clean).
   */
  resize(newSize: number): void {
    const shrink = newSize < this.size;
    this.size = newSize;
    this.minSize = Math.min(this.minSize, newSize);
    for (const t of this.tracked) {
      if (!t.consistent) continue;
      if (shrink && !t.full) t.reload = true;
      if (t.bits.length > 0 || t.full) {
        this.grow(t);
        if (shrink) clearPastEnd(t.bits, Math.ceil(newSize / t.granularity));
      }
    }
  }

  /** Size `t.bits` and `t.changed` for the current disk size (new bits clean). */
  private grow(t: Tracked): void {
    const cs = this.host.clusterSize;
    const n = bitmapDataBytes(this.size, t.granularityBits);
    if (t.bits.length !== n) {
      const bits = new Uint8Array(n);
      bits.set(t.bits.subarray(0, Math.min(n, t.bits.length)));
      t.bits = bits;
    }
    const m = bitmapTableSize(this.size, t.granularityBits, cs);
    if (t.changed.length !== m) {
      const changed = new Uint8Array(m);
      changed.set(t.changed.subarray(0, Math.min(m, t.changed.length)));
      t.changed = changed;
    }
  }

  // ------------------------------------------------------------------ management (in memory)

  /** Every bitmap of this open, in directory order (added ones last). */
  list(): TrackedBitmap[] {
    return this.tracked.map((t) => ({
      name: t.name,
      granularityBits: t.granularityBits,
      granularity: t.granularity,
      consistent: t.consistent,
      enabled: t.enabled,
      flags: t.flags,
    }));
  }

  /** The virtual size the bitmaps cover. */
  get virtualSize(): number {
    return this.size;
  }

  private find(name: string): Tracked | undefined {
    return this.tracked.find((t) => t.name === name);
  }

  /** Add an empty bitmap (the caller checked name and granularity). */
  add(name: string, granularityBits: number, enabled: boolean): void {
    const t: Tracked = {
      name,
      slot: undefined,
      flags: 0,
      granularityBits,
      granularity: 2 ** granularityBits,
      consistent: true,
      enabled,
      tableOffset: 0,
      tableSize: 0,
      table: undefined,
      bits: EMPTY,
      full: true,
      reload: false,
      changed: EMPTY,
    };
    this.grow(t);
    this.tracked.push(t);
    this.restructured = true;
    this.refreshActive();
  }

  /** Drop a bitmap; its clusters are freed once the close has written the new directory. */
  remove(name: string): void {
    const i = this.tracked.findIndex((t) => t.name === name);
    if (i < 0) return;
    const t = this.tracked[i]!;
    this.tracked.splice(i, 1);
    if (t.tableOffset !== 0)
      this.removed.push({ tableOffset: t.tableOffset, tableSize: t.tableSize });
    this.restructured = true;
    this.refreshActive();
  }

  /** Turn recording on or off for a consistent bitmap. */
  setEnabled(name: string, enabled: boolean): void {
    const t = this.find(name);
    if (!t || !t.consistent || t.enabled === enabled) return;
    t.enabled = enabled;
    if (enabled) this.grow(t);
    this.refreshActive();
  }

  /** Clear every bit of a consistent bitmap. */
  clear(name: string): void {
    const t = this.find(name);
    if (!t || !t.consistent) return;
    t.full = true;
    t.bits = EMPTY;
    t.changed = EMPTY;
    this.grow(t);
  }

  /**
   * Set the bits of `name` that cover guest bytes [offset, +length) (a merge from another
   * bitmap, whatever its granularity).
   */
  setRange(name: string, offset: number, length: number): void {
    const t = this.find(name);
    if (!t || !t.consistent || length <= 0) return;
    if (t.bits.length === 0) this.grow(t);
    const first = Math.floor(offset / t.granularity);
    const last = Math.floor((Math.min(offset + length, this.size) - 1) / t.granularity);
    if (last < first) return;
    setBitRange(t.bits, first, last);
    const perChunk = this.host.clusterSize * 8;
    t.changed.fill(1, Math.floor(first / perChunk), Math.floor(last / perChunk) + 1);
  }

  private refreshActive(): void {
    this.active = this.tracked.filter((t) => t.consistent && t.enabled);
  }

  /**
   * Bitmap data cluster `c` of `name` as this open sees it (stored bits or'ed with the bits
   * set since open), into `out` (`clusterSize` bytes).
   */
  async chunk(name: string, c: number, out: Uint8Array): Promise<void> {
    const t = this.find(name);
    if (!t || !t.consistent) throw new InvalidArgumentError(`no consistent bitmap '${name}'`);
    const cs = this.host.clusterSize;
    if (!t.full && t.table) {
      if (!(await readChunk(this.host.backend, t.table, c, cs, out))) {
        throw new CorruptImageError(`bitmap '${t.name}': bad table entry ${c}`);
      }
      // Stored bits a shrink cut off stay cut off.
      const keep = Math.ceil(this.minSize / t.granularity) - c * cs * 8;
      if (keep < cs * 8) {
        if (keep <= 0) out.fill(0);
        else clearPastEnd(out, keep);
      }
    } else out.fill(0);
    const from = c * cs;
    const to = Math.min(from + cs, t.bits.length);
    for (let k = from; k < to; k++) out[k - from]! |= t.bits[k]!;
  }

  // ------------------------------------------------------------------------------ the close

  /**
   * Store the bitmaps back (clean close). Like QEMU, nothing already on disk is overwritten
   * except the directory: changed clusters of bitmap data go to fresh clusters (the new bits
   * merged into the old ones), each changed bitmap gets a fresh table, and only after those
   * are durable does the directory point at them with IN_USE cleared; then the replaced
   * clusters are freed. Bitmaps in use at open stay as they are.
   */
  async store(): Promise<void> {
    if (this.stored) return;
    const host = this.host;
    const cs = host.clusterSize;
    const backend = host.backend;
    const newTables: { t: Tracked; table: U64TableView }[] = [];
    const frees: [offset: number, clusters: number][] = [];
    const cluster = new Uint8Array(cs);
    // 1. Data: only clusters with new bits (an all-ones chunk cannot change), or every
    // cluster of a bitmap written afresh (added, cleared, merged into).
    for (const t of this.tracked) {
      if (!t.consistent) continue;
      const size = bitmapTableSize(this.size, t.granularityBits, cs);
      const table = bitmapTableView(new Uint8Array(size * BITMAP_TABLE_ENTRY_SIZE));
      if (t.reload && !t.full) await this.loadAll(t);
      if (t.full) {
        await this.writeAfresh(t, table);
        if (t.table) for (const off of dataClusters(t.table, cs)) frees.push([off, 1]);
        newTables.push({ t, table });
        continue;
      }
      if (!t.table) continue;
      table.bytes.set(t.table.bytes.subarray(0, table.bytes.byteLength));
      let changed = size !== t.tableSize;
      for (let c = 0; c < t.changed.length; c++) {
        if (t.changed[c] === 0) continue;
        const kind = classifyBitmapTableEntry(table, c, cs);
        if (typeof kind === "string") throw new CorruptImageError(`bitmap '${t.name}': ${kind}`);
        if (kind.kind === BitmapChunk.ones) continue;
        if (kind.kind === BitmapChunk.data) await backend.read(kind.offset, cluster);
        else cluster.fill(0);
        const from = c * cs;
        const to = Math.min(from + cs, t.bits.length);
        let grew = false;
        for (let k = from; k < to; k++) {
          const v = cluster[k - from]! | t.bits[k]!;
          if (v !== cluster[k - from]) {
            cluster[k - from] = v;
            grew = true;
          }
        }
        if (!grew) continue;
        const off = await host.allocate(1);
        await backend.write(off, cluster);
        table.set(c, off);
        if (kind.kind === BitmapChunk.data) frees.push([kind.offset, 1]);
        changed = true;
      }
      if (changed) newTables.push({ t, table });
    }
    // 2. Fresh tables (zero padded to whole clusters, so the file never ends mid-cluster).
    const placed: { t: Tracked; table: U64TableView; offset: number }[] = [];
    for (const { t, table } of newTables) {
      const clusters = Math.ceil(table.bytes.byteLength / cs);
      const off = await host.allocate(clusters);
      const padded = new Uint8Array(clusters * cs);
      padded.set(table.bytes);
      await backend.write(off, padded);
      if (t.tableOffset !== 0) {
        frees.push([t.tableOffset, Math.ceil((t.tableSize * BITMAP_TABLE_ENTRY_SIZE) / cs)]);
      }
      placed.push({ t, table, offset: off });
    }
    // Removed bitmaps: their data clusters and tables go once the directory no longer names them.
    for (const r of this.removed) {
      const bytes = r.tableSize * BITMAP_TABLE_ENTRY_SIZE;
      const fileSize = await backend.size();
      if (r.tableOffset % cs !== 0 || r.tableOffset + bytes > fileSize) continue;
      const table = bitmapTableView(new Uint8Array(bytes));
      await backend.read(r.tableOffset, table.bytes);
      for (const off of dataClusters(table, cs)) if (off + cs <= fileSize) frees.push([off, 1]);
      frees.push([r.tableOffset, Math.ceil(bytes / cs)]);
    }
    // 3. The directory: new tables, IN_USE cleared, AUTO as asked.
    if (this.restructured) {
      // Refcounts of the new clusters and their contents are on disk before anything uses them.
      if (placed.length > 0) await host.sync();
      this.adopt(placed);
      await this.switchDirectory(frees);
    } else {
      if (placed.length > 0) await host.sync();
      this.adopt(placed);
      await this.patchDirectory(
        (t) =>
          (t.flags & ~(BitmapFlag.inUse | BitmapFlag.auto)) | (t.enabled ? BitmapFlag.auto : 0),
      );
    }
    // 4. What the directory no longer reaches.
    for (const [off, n] of frees) await host.free(off, n);
    this.stored = true;
  }

  private adopt(placed: readonly { t: Tracked; table: U64TableView; offset: number }[]): void {
    for (const { t, table, offset } of placed) {
      t.table = table;
      t.tableOffset = offset;
      t.tableSize = table.length;
    }
  }

  /** Make `t.bits` the whole bitmap: its stored bits (up to the smallest size) or'ed with the new ones. */
  private async loadAll(t: Tracked): Promise<void> {
    const cs = this.host.clusterSize;
    const bits = new Uint8Array(bitmapDataBytes(this.size, t.granularityBits));
    const buf = new Uint8Array(cs);
    for (let c = 0; c * cs < bits.length; c++) {
      await this.chunk(t.name, c, buf);
      bits.set(buf.subarray(0, Math.min(cs, bits.length - c * cs)), c * cs);
    }
    t.bits = bits;
    t.full = true;
    this.grow(t);
  }

  /**
   * Write every data cluster of `t` (its `bits` are the whole bitmap) to fresh clusters and
   * fill `table`: an all-zero cluster gets entry 0 and a whole all-ones cluster the all-ones
   * entry, neither with a cluster.
   */
  private async writeAfresh(t: Tracked, table: U64TableView): Promise<void> {
    const cs = this.host.clusterSize;
    // Bits past the end of the disk stay clear.
    const nbits = Math.ceil(this.size / t.granularity);
    if (nbits % 8 !== 0 && t.bits.length > 0)
      t.bits[t.bits.length - 1]! &= 0xff >>> (8 - (nbits % 8));
    const buf = new Uint8Array(cs);
    for (let c = 0; c < table.length; c++) {
      const chunk = t.bits.subarray(c * cs, Math.min((c + 1) * cs, t.bits.length));
      let zeros = true;
      let ones = chunk.length === cs;
      for (let k = 0; k < chunk.length && (zeros || ones); k++) {
        const v = chunk[k]!;
        if (v !== 0) zeros = false;
        if (v !== 0xff) ones = false;
      }
      if (zeros) continue;
      if (ones) {
        table.setWords(c, 0, 1);
        continue;
      }
      buf.fill(0);
      buf.set(chunk);
      const off = await this.host.allocate(1);
      await this.host.backend.write(off, buf);
      table.set(c, off);
    }
  }

  /**
   * Bitmaps were added or removed: the new directory goes to fresh clusters, then one
   * header-area update points at it (or drops the extension when no bitmap is left); the old
   * directory's clusters join `frees`.
   */
  private async switchDirectory(frees: [number, number][]): Promise<void> {
    const host = this.host;
    const cs = host.clusterSize;
    if (!host.switchDirectory) {
      throw new InvalidArgumentError("this open cannot rewrite the bitmap directory");
    }
    let next: BitmapDirectoryLocation | undefined;
    if (this.tracked.length > 0) {
      const bytes = encodeBitmapDirectory(
        this.tracked.map((t) => ({
          name: t.name,
          granularityBits: t.granularityBits,
          type: 1,
          bitmapTableOffset: t.tableOffset,
          bitmapTableSize: t.tableSize,
          flags: t.consistent ? (t.enabled ? BitmapFlag.auto : 0) : t.flags,
        })),
      );
      const clusters = Math.ceil(bytes.byteLength / cs);
      const off = await host.allocate(clusters);
      const padded = new Uint8Array(clusters * cs);
      padded.set(bytes);
      await host.backend.write(off, padded);
      next = { offset: off, length: bytes.byteLength, count: this.tracked.length };
    }
    await host.sync();
    await host.switchDirectory(next);
    if (this.dir.byteLength > 0) {
      frees.push([this.dirOffset, Math.ceil(this.dir.byteLength / cs)]);
    }
  }
}

/**
 * Read the stored bits of one bitmap (bit `n` is bit `n % 8` of byte `n / 8`, covering guest
 * bytes [n * granularity, (n + 1) * granularity)). Reads what is on disk whatever the flags
 * say; an IN_USE bitmap's bits mean nothing.
 */
export async function readBitmapBits(
  backend: BlockBackend,
  entry: BitmapEntry,
  clusterSize: number,
  virtualSize: number,
): Promise<Uint8Array> {
  const cs = clusterSize;
  const out = new Uint8Array(bitmapDataBytes(virtualSize, entry.granularityBits));
  const table = bitmapTableView(new Uint8Array(entry.bitmapTableSize * BITMAP_TABLE_ENTRY_SIZE));
  await backend.read(entry.bitmapTableOffset, table.bytes);
  const cluster = new Uint8Array(cs);
  for (let c = 0; c < table.length && c * cs < out.length; c++) {
    if (!(await readChunk(backend, table, c, cs, cluster))) {
      throw new CorruptImageError(`bitmap '${entry.name}': bad table entry ${c}`, {
        offset: entry.bitmapTableOffset + c * 8,
      });
    }
    const n = Math.min(cs, out.length - c * cs);
    out.set(cluster.subarray(0, n), c * cs);
  }
  // Bits past the last one cover nothing.
  const bits = Math.ceil(virtualSize / 2 ** entry.granularityBits);
  if (bits % 8 !== 0 && out.length > 0) out[out.length - 1]! &= 0xff >>> (8 - (bits % 8));
  return out;
}

/**
 * Reads the stored data clusters of one bitmap on demand (read-only opens): its table is read
 * once, each cluster when asked for.
 */
export class StoredBitmapReader {
  private table: U64TableView | undefined;
  /** The last cluster read (NBD block status asks for neighbouring ranges one by one). */
  private last: { c: number; bytes: Uint8Array } | undefined;

  constructor(
    private readonly backend: BlockBackend,
    private readonly entry: BitmapEntry,
    private readonly clusterSize: number,
  ) {}

  /** Bitmap data cluster `c` into `out` (`clusterSize` bytes). */
  async chunk(c: number, out: Uint8Array): Promise<void> {
    const e = this.entry;
    if (!this.table) {
      const t = bitmapTableView(new Uint8Array(e.bitmapTableSize * BITMAP_TABLE_ENTRY_SIZE));
      await this.backend.read(e.bitmapTableOffset, t.bytes);
      this.table = t;
    }
    if (this.last?.c === c) {
      out.set(this.last.bytes);
      return;
    }
    if (!(await readChunk(this.backend, this.table, c, this.clusterSize, out))) {
      throw new CorruptImageError(`bitmap '${e.name}': bad table entry ${c}`, {
        offset: e.bitmapTableOffset + c * 8,
      });
    }
    this.last = { c, bytes: out.slice() };
  }
}

/**
 * Live refcount structures of an open qcow2 image: lookups, reference changes, cluster
 * allocation and the growth of refcount blocks and of the refcount table.
 *
 * Crash-ordering rules kept here (see README.md):
 * 1. A new refcount block is written and synced before the table entry pointing at it.
 * 2. A grown table and its new blocks are written and synced before `onTableMoved` is
 *    called; the caller points the header at the new table (and syncs) inside it; only then
 *    are the old table's clusters freed.
 * 3. A refcount increase reaches the disk no later than anything a caller writes through a
 *    cache that `dependOn`s the refcount cache.
 * A crash at any point therefore leaves either the old or the new layout, plus at worst
 * leaked clusters (refcount > 0, unreferenced), never a referenced cluster with refcount 0.
 */
import type { BlockBackend } from "@qimg/io";
import type { CachedTable, ClusterCache } from "@qimg/cluster-cache";
import {
  CorruptImageError,
  ErrorCode,
  InvalidArgumentError,
  IoError,
  RangeFormatError,
  U64TableView,
  hex,
} from "@qimg/structs";
import { refcountGeometry } from "./geometry.js";
import { RefcountBlockView, maxRefcount } from "./spec/refcount-block.js";
import {
  MAX_REFTABLE_BYTES,
  REFTABLE_ENTRY_SIZE,
  REFTABLE_OFFSET_MASK,
  validateRefcountTable,
} from "./spec/refcount-table.js";

/** Called after a grown refcount table is durable; must point the header at it and sync. */
export type TableMovedHook = (tableOffset: number, tableClusters: number) => Promise<void> | void;
/** Called with byte ranges whose clusters dropped to refcount 0 during a discarding free. */
export type DiscardHook = (offset: number, length: number) => Promise<void> | void;

/** Where the refcount structures are and how wide they are (see {@link Refcounts.open}). */
export interface RefcountsOptions {
  /** The image file. */
  readonly backend: BlockBackend;
  /** Cache for refcount blocks; its `tableSize` must equal the cluster size. */
  readonly cache: ClusterCache;
  /** header.cluster_bits (9..21). */
  readonly clusterBits: number;
  /** header.refcount_order (0..6; 4 for version 2 images). */
  readonly refcountOrder: number;
  /** header.refcount_table_offset. */
  readonly tableOffset: number;
  /** header.refcount_table_clusters. */
  readonly tableClusters: number;
  /** Rewrites the header to a moved refcount table; required for the table to grow. */
  readonly onTableMoved?: TableMovedHook;
  /** Receives discarded ranges from `free(..., { discard: true })`. */
  readonly onDiscard?: DiscardHook;
  /** Refuse every change (also implied by a read-only backend). */
  readonly readOnly?: boolean;
}

/** Options of {@link Refcounts.free}. */
export interface FreeOptions {
  /** Pass ranges that reached refcount 0 to `onDiscard`. Default false. */
  readonly discard?: boolean;
}

/** A run of clusters whose refcount reached zero. */
interface ZeroRun {
  first: number;
  count: number;
}

type Change =
  | { readonly kind: "add"; readonly amount: number }
  | { readonly kind: "set"; readonly amount: number };

/**
 * An image's refcount table and blocks: lookups, reference updates with overflow checks,
 * first-fit allocation, and growth of blocks and of the table. See the package README.
 */
export class Refcounts {
  /** header.cluster_bits. */
  readonly clusterBits: number;
  /** Cluster size in bytes. */
  readonly clusterSize: number;
  /** header.refcount_order. */
  readonly refcountOrder: number;
  /** Width of one refcount in bits. */
  readonly refcountBits: number;
  /** Clusters described by one refcount block. */
  readonly entriesPerBlock: number;
  /** Largest refcount an entry holds (2^bits-1; 2^53-1 for 64-bit entries). */
  readonly maxRefcount: number;
  /** True when every change is refused. */
  readonly readOnly: boolean;

  readonly #backend: BlockBackend;
  readonly #cache: ClusterCache;
  readonly #onTableMoved: TableMovedHook | undefined;
  readonly #onDiscard: DiscardHook | undefined;
  #tableOffset: number;
  #tableClusters: number;
  #table: U64TableView;
  /** No cluster below this index is free. */
  #hint = 0;
  #views = new WeakMap<Uint8Array, RefcountBlockView>();
  #lock: Promise<unknown> = Promise.resolve();

  private constructor(options: RefcountsOptions, tableBytes: Uint8Array) {
    const g = refcountGeometry(options.clusterBits, options.refcountOrder);
    this.clusterBits = g.clusterBits;
    this.clusterSize = g.clusterSize;
    this.refcountOrder = g.refcountOrder;
    this.refcountBits = g.refcountBits;
    this.entriesPerBlock = g.entriesPerBlock;
    this.maxRefcount = maxRefcount(g.refcountBits);
    this.readOnly = (options.readOnly ?? false) || options.backend.readOnly;
    this.#backend = options.backend;
    this.#cache = options.cache;
    this.#onTableMoved = options.onTableMoved;
    this.#onDiscard = options.onDiscard;
    this.#tableOffset = options.tableOffset;
    this.#tableClusters = options.tableClusters;
    this.#table = new U64TableView(tableBytes, "big");
  }

  /**
   * Read and validate the refcount table (alignment, reserved bits, blocks inside the file)
   * and return an object ready for lookups and allocation.
   */
  static async open(options: RefcountsOptions): Promise<Refcounts> {
    const g = refcountGeometry(options.clusterBits, options.refcountOrder);
    const cs = g.clusterSize;
    if (options.cache.tableSize !== cs) {
      throw new InvalidArgumentError(
        `refcount block cache holds ${options.cache.tableSize}-byte tables but the cluster size is ${cs}`,
      );
    }
    const { tableOffset, tableClusters } = options;
    if (!Number.isSafeInteger(tableOffset) || tableOffset <= 0 || tableOffset % cs !== 0) {
      throw new CorruptImageError(
        tableOffset === 0
          ? `refcount table offset 0x0 overlaps the image header`
          : `refcount table offset ${hex(tableOffset)} is not aligned to the cluster size ${cs}`,
        { offset: tableOffset },
      );
    }
    if (!Number.isSafeInteger(tableClusters) || tableClusters < 1) {
      throw new CorruptImageError(
        `refcount table size ${tableClusters} clusters must be at least 1`,
      );
    }
    const bytes = tableClusters * cs;
    if (bytes > MAX_REFTABLE_BYTES) {
      throw new CorruptImageError(
        `refcount table of ${tableClusters} clusters (${bytes} bytes) is larger than the limit of ${MAX_REFTABLE_BYTES} bytes`,
        { offset: tableOffset },
      );
    }
    const fileSize = await options.backend.size();
    if (tableOffset + bytes > fileSize) {
      throw new CorruptImageError(
        `refcount table at ${hex(tableOffset)} (${tableClusters} clusters) extends past the end of the file (size ${hex(fileSize)})`,
        { offset: tableOffset },
      );
    }
    const tableBytes = new Uint8Array(bytes);
    await options.backend.read(tableOffset, tableBytes);
    validateRefcountTable({ bytes: tableBytes, tableOffset, clusterSize: cs, fileSize });
    return new Refcounts(options, tableBytes);
  }

  /** Current host offset of the refcount table. */
  get tableOffset(): number {
    return this.#tableOffset;
  }

  /** Current size of the refcount table in clusters. */
  get tableClusters(): number {
    return this.#tableClusters;
  }

  /** Number of refcount table entries (refcount blocks the table can point at). */
  get tableEntries(): number {
    return this.#table.length;
  }

  /** Lowest cluster index that may be free (the allocation search starts here). */
  get freeHint(): number {
    return this.#hint;
  }

  /** Host offset of the refcount block for table entry `index`, or 0 when there is none. */
  blockOffset(index: number): number {
    return index < this.#table.length ? this.#table.getMasked(index, REFTABLE_OFFSET_MASK) : 0;
  }

  /** Refcount of host cluster `clusterIndex` (0 for clusters no block describes). */
  async get(clusterIndex: number): Promise<number> {
    this.#checkIndex(clusterIndex, 1);
    const slot = Math.floor(clusterIndex / this.entriesPerBlock);
    const off = this.blockOffset(slot);
    if (off === 0) return 0;
    const view = await this.#block(off);
    return view.get(clusterIndex - slot * this.entriesPerBlock);
  }

  /**
   * Fill `out` with the refcounts of clusters `first .. first + out.length - 1` (one block
   * load per refcount block, for checkers and scans).
   */
  async readRange(first: number, out: { length: number; [i: number]: number }): Promise<void> {
    this.#checkIndex(first, out.length);
    const E = this.entriesPerBlock;
    let i = 0;
    while (i < out.length) {
      const c = first + i;
      const slot = Math.floor(c / E);
      const n = Math.min(out.length - i, (slot + 1) * E - c);
      const off = this.blockOffset(slot);
      if (off === 0) {
        for (let k = 0; k < n; k++) out[i + k] = 0;
      } else {
        const view = await this.#block(off);
        const base = c - slot * E;
        for (let k = 0; k < n; k++) out[i + k] = view.get(base + k);
      }
      i += n;
    }
  }

  /**
   * Add `delta` (may be negative) to the refcount of `count` clusters starting at
   * `clusterIndex`. All clusters are checked first, so an overflow (the value would pass
   * {@link maxRefcount}) or underflow (below 0: a corruption) changes nothing.
   */
  async update(clusterIndex: number, delta: number, count = 1): Promise<void> {
    if (!Number.isSafeInteger(delta))
      throw new InvalidArgumentError(`refcount delta ${delta} is not an integer`);
    return await this.#locked(async () => {
      this.#writable();
      this.#checkIndex(clusterIndex, count);
      await this.#change(clusterIndex, count, { kind: "add", amount: delta });
    });
  }

  /** Set the refcount of `count` clusters starting at `clusterIndex` to `value`. */
  async set(clusterIndex: number, value: number, count = 1): Promise<void> {
    if (!Number.isSafeInteger(value) || value < 0) {
      throw new InvalidArgumentError(`refcount ${value} is not a non-negative integer`);
    }
    return await this.#locked(async () => {
      this.#writable();
      this.#checkIndex(clusterIndex, count);
      await this.#change(clusterIndex, count, { kind: "set", amount: value });
    });
  }

  /**
   * Allocate `n` contiguous free clusters (first fit, searching from the free-cluster hint),
   * set their refcount to 1 and return the host byte offset of the first. Clusters past the
   * end of the file count as free, so allocation grows the image; the caller writes them.
   */
  async allocate(n: number): Promise<number> {
    this.#checkCount(n);
    return await this.#locked(async () => {
      this.#writable();
      const { start, lowestFree } = await this.#findFree(n, 0, 0);
      // Move the hint first: creating blocks may free clusters (an outgrown table), and
      // those lower it again below.
      this.#hint = lowestFree < start ? lowestFree : start + n;
      try {
        await this.#ensureBlocks(start, n);
        await this.#change(start, n, { kind: "add", amount: 1 });
      } catch (e) {
        this.#hint = Math.min(this.#hint, start);
        throw e;
      }
      return start * this.clusterSize;
    });
  }

  /**
   * Take the `n` clusters starting at host offset `offset` (cluster aligned), which must all
   * be free: their refcount becomes 1. Throws an InvalidArgumentError naming the first
   * cluster in use, changing nothing.
   */
  async allocateAt(offset: number, n: number): Promise<void> {
    this.#checkCount(n);
    const first = this.#clusterOf(offset, "allocateAt");
    return await this.#locked(async () => {
      this.#writable();
      this.#checkIndex(first, n);
      const counts = new Float64Array(n);
      await this.readRange(first, counts);
      const used = counts.findIndex((v) => v !== 0);
      if (used >= 0) {
        const at = (first + used) * this.clusterSize;
        throw new InvalidArgumentError(
          `cannot allocate cluster ${hex(at)}: it is already in use (refcount ${counts[used]})`,
          { offset: at },
        );
      }
      await this.#ensureBlocks(first, n);
      await this.#change(first, n, { kind: "add", amount: 1 });
    });
  }

  /**
   * Drop one reference from each of the `n` clusters at host offset `offset` (as QEMU's
   * qcow2_free_clusters): a cluster with refcount 1 becomes free and reusable, a shared one
   * keeps its other references. Dropping below 0 is a CorruptImageError and changes
   * nothing. With `discard`, ranges that reached 0 are passed to `onDiscard`.
   *
   * Call this only after whatever referenced the clusters no longer does so on disk (flush
   * the L2 cache first): the lowered refcounts may be written at any later point.
   */
  async free(offset: number, n: number, options: FreeOptions = {}): Promise<void> {
    this.#checkCount(n);
    const first = this.#clusterOf(offset, "free");
    return await this.#locked(async () => {
      this.#writable();
      this.#checkIndex(first, n);
      const zeroed = await this.#change(first, n, { kind: "add", amount: -1 });
      if (options.discard === true && this.#onDiscard !== undefined) {
        for (const r of zeroed)
          await this.#onDiscard(r.first * this.clusterSize, r.count * this.clusterSize);
      }
    });
  }

  /** Write every dirty refcount block and sync the file. */
  flush(): Promise<void> {
    return this.#locked(() => this.#cache.flush());
  }

  // ---------------------------------------------------------------- internals

  #locked<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#lock.then(fn, fn);
    this.#lock = run.catch(() => undefined);
    return run;
  }

  #writable(): void {
    if (this.readOnly) {
      throw new IoError(`${this.#backend.name}: refcounts are open read-only`, {
        code: ErrorCode.READ_ONLY,
      });
    }
  }

  #checkCount(n: number): void {
    if (!Number.isSafeInteger(n) || n < 1) {
      throw new InvalidArgumentError(`cluster count ${n} must be a positive integer`);
    }
  }

  #checkIndex(first: number, count: number): void {
    if (!Number.isSafeInteger(first) || first < 0 || !Number.isSafeInteger(count) || count < 0) {
      throw new InvalidArgumentError(
        `cluster range ${first} (+${count}) is not a pair of non-negative integers`,
      );
    }
    if ((first + count) * this.clusterSize > Number.MAX_SAFE_INTEGER) {
      throw new InvalidArgumentError(`cluster range ${first} (+${count}) ends past 2^53-1 bytes`);
    }
  }

  #clusterOf(offset: number, what: string): number {
    if (!Number.isSafeInteger(offset) || offset < 0 || offset % this.clusterSize !== 0) {
      throw new InvalidArgumentError(
        `${what}: offset ${offset} is not aligned to the cluster size ${this.clusterSize}`,
      );
    }
    return offset / this.clusterSize;
  }

  #viewOf(t: CachedTable): RefcountBlockView {
    let v = this.#views.get(t.bytes);
    if (v === undefined) {
      v = new RefcountBlockView(t.bytes, this.refcountBits);
      this.#views.set(t.bytes, v);
    }
    return v;
  }

  /** A view of the block at `off`, for synchronous use before the next await. */
  async #block(off: number): Promise<RefcountBlockView> {
    const hit = this.#cache.peek(off);
    if (hit !== undefined) return this.#viewOf(hit);
    const t = await this.#cache.get(off);
    this.#cache.release(t);
    return this.#viewOf(t);
  }

  /**
   * Apply `change` to clusters [first, first + count): check every new value first (nothing
   * changes on error), then write them into the blocks, creating blocks where a value
   * becomes non-zero. Returns the runs that became zero.
   */
  async #change(first: number, count: number, change: Change): Promise<ZeroRun[]> {
    const E = this.entriesPerBlock;
    const max = this.maxRefcount;
    const end = first + count;
    let needsBlocks = false;
    // Pass 1: validate.
    for (let c = first; c < end;) {
      const slot = Math.floor(c / E);
      const stop = Math.min(end, (slot + 1) * E);
      const off = this.blockOffset(slot);
      const view = off === 0 ? undefined : await this.#block(off);
      for (; c < stop; c++) {
        const cur = view === undefined ? 0 : view.get(c - slot * E);
        const next = change.kind === "add" ? cur + change.amount : change.amount;
        if (next < 0) {
          throw new CorruptImageError(
            `refcount of cluster ${hex(c * this.clusterSize)} is ${cur}; dropping ${-change.amount} reference(s) would make it negative`,
            { offset: c * this.clusterSize },
          );
        }
        if (next > max) {
          throw new RangeFormatError(
            `refcount of cluster ${hex(c * this.clusterSize)} would become ${next}, above the maximum ${max} of refcount_bits=${this.refcountBits}; ` +
              `convert the image to a wider refcount width (e.g. qemu-img amend -o refcount_bits=16)`,
            { offset: c * this.clusterSize },
          );
        }
        if (next !== 0 && view === undefined) needsBlocks = true;
      }
    }
    if (needsBlocks) await this.#ensureBlocks(first, count);
    // Pass 2: apply.
    const zeroed: ZeroRun[] = [];
    for (let c = first; c < end;) {
      const slot = Math.floor(c / E);
      const stop = Math.min(end, (slot + 1) * E);
      const off = this.blockOffset(slot);
      if (off === 0) {
        c = stop; // only possible when every value here stays 0
        continue;
      }
      const t = await this.#cache.get(off);
      try {
        const view = this.#viewOf(t);
        let changed = false;
        for (; c < stop; c++) {
          const i = c - slot * E;
          const cur = view.get(i);
          const next = change.kind === "add" ? cur + change.amount : change.amount;
          if (next === cur) continue;
          view.set(i, next);
          changed = true;
          if (next === 0) {
            const last = zeroed[zeroed.length - 1];
            if (last !== undefined && last.first + last.count === c) last.count++;
            else zeroed.push({ first: c, count: 1 });
            if (c < this.#hint) this.#hint = c;
          }
        }
        if (changed) await this.#cache.markDirty(t);
      } finally {
        this.#cache.release(t);
      }
    }
    return zeroed;
  }

  /** Make sure every block describing [first, first + count) exists, without using those clusters. */
  async #ensureBlocks(first: number, count: number): Promise<void> {
    const E = this.entriesPerBlock;
    const lastSlot = Math.floor((first + count - 1) / E);
    for (let slot = Math.floor(first / E); slot <= lastSlot; slot++) {
      await this.#ensureBlock(slot, first, first + count);
    }
  }

  /**
   * Return the block for table entry `slot`, creating it when missing. New blocks (and a
   * grown table) never take a cluster in [avoidStart, avoidEnd).
   */
  async #ensureBlock(slot: number, avoidStart: number, avoidEnd: number): Promise<number> {
    const E = this.entriesPerBlock;
    const cs = this.clusterSize;
    for (;;) {
      const existing = this.blockOffset(slot);
      if (existing !== 0) return existing;
      if (slot >= this.#table.length) {
        await this.#growTable(slot, avoidStart, avoidEnd);
        continue;
      }
      const { start: c } = await this.#findFree(1, avoidStart, avoidEnd);
      const owner = Math.floor(c / E);
      if (owner !== slot && this.blockOffset(owner) === 0) {
        // The free cluster is described by another missing block: create that one first
        // (it will describe itself), then search again.
        await this.#ensureBlock(owner, avoidStart, avoidEnd);
        continue;
      }
      const off = c * cs;
      if (owner !== slot) {
        // Count the new block in the block that describes its cluster.
        const t = await this.#cache.get(this.blockOffset(owner));
        try {
          this.#viewOf(t).set(c - owner * E, 1);
          await this.#cache.markDirty(t);
        } finally {
          this.#cache.release(t);
        }
      }
      const nt = await this.#cache.getEmpty(off);
      try {
        // Self-describing: the block counts its own cluster.
        if (owner === slot) this.#viewOf(nt).set(c - slot * E, 1);
        await this.#cache.markDirty(nt);
      } finally {
        this.#cache.release(nt);
      }
      // Rule 1: block (and its refcount) durable before the table points at it.
      await this.#cache.flush();
      const entry = new Uint8Array(REFTABLE_ENTRY_SIZE);
      new U64TableView(entry, "big").set(0, off);
      const at = this.#tableOffset + slot * REFTABLE_ENTRY_SIZE;
      try {
        await this.#backend.write(at, entry);
        await this.#backend.flush();
      } catch (cause) {
        throw new IoError(`writing refcount table entry ${slot} at ${hex(at)} failed`, {
          offset: at,
          cause,
        });
      }
      this.#table.set(slot, off);
      return off;
    }
  }

  /**
   * Find `n` contiguous free clusters, first fit from the hint, skipping [avoidStart,
   * avoidEnd). Clusters no block describes (including everything past the table) are free.
   * Returns the run start and the lowest free cluster seen (a new hint).
   */
  async #findFree(
    n: number,
    avoidStart: number,
    avoidEnd: number,
  ): Promise<{ start: number; lowestFree: number }> {
    const E = this.entriesPerBlock;
    let c = this.#hint;
    let start = c;
    let run = 0;
    let lowestFree = -1;
    for (;;) {
      const slot = Math.floor(c / E);
      const slotEnd = (slot + 1) * E;
      const off = this.blockOffset(slot);
      if (off === 0) {
        // Every cluster up to slotEnd is free; only the avoided range interrupts the run.
        if (lowestFree < 0) lowestFree = c;
        if (c >= avoidStart && c < avoidEnd) {
          run = 0;
          c = Math.min(avoidEnd, slotEnd);
          continue;
        }
        const stop = avoidStart > c && avoidStart < slotEnd ? avoidStart : slotEnd;
        if (run === 0) start = c;
        run += stop - c;
        if (run >= n) return { start, lowestFree };
        c = stop;
        continue;
      }
      const view = await this.#block(off);
      for (; c < slotEnd; c++) {
        if (!view.isZero(c - slot * E)) {
          run = 0;
          continue;
        }
        if (lowestFree < 0) lowestFree = c;
        if (c >= avoidStart && c < avoidEnd) {
          run = 0;
          continue;
        }
        if (run === 0) start = c;
        if (++run >= n) return { start, lowestFree };
      }
    }
  }

  /**
   * Grow the refcount table so that entry `needSlot` exists, and give that entry a block.
   *
   * The new table and the blocks it needs are placed together in an area starting at the
   * first block boundary past `needSlot` and past the avoided range (all of it free: no
   * block describes it yet). The area's own blocks describe the area (self-describing).
   * Order: write blocks and table, sync, `onTableMoved` (header), then free the old table.
   */
  async #growTable(needSlot: number, avoidStart: number, avoidEnd: number): Promise<void> {
    const hook = this.#onTableMoved;
    if (hook === undefined) {
      throw new InvalidArgumentError(
        `refcount table at ${hex(this.#tableOffset)} (${this.#table.length} entries) is full and must grow to cover ` +
          `refcount block ${needSlot}, but no onTableMoved callback was given to rewrite the header`,
      );
    }
    const E = this.entriesPerBlock;
    const cs = this.clusterSize;
    const perTableCluster = cs / REFTABLE_ENTRY_SIZE;
    const oldOffset = this.#tableOffset;
    const oldClusters = this.#tableClusters;
    const areaSlot = Math.max(needSlot + 1, Math.ceil(avoidEnd / E), this.#table.length);
    const A = areaSlot * E;

    // Sizes: the area holds k blocks describing itself, the block for needSlot, and a table
    // of T clusters covering every entry up to the area's last block. Grow T by half at
    // least, so growth stays rare.
    let T = Math.max(
      oldClusters + 1,
      Math.min(Math.ceil((oldClusters * 3) / 2), MAX_REFTABLE_BYTES / cs),
    );
    let k = 1;
    for (;;) {
      const n = k + 1 + T;
      const k2 = Math.ceil(n / E);
      const T2 = Math.max(T, Math.ceil((areaSlot + k2) / perTableCluster));
      if (k2 === k && T2 === T) break;
      k = k2;
      T = T2;
    }
    if (T * cs > MAX_REFTABLE_BYTES) {
      throw new RangeFormatError(
        `refcount table would need ${T} clusters (${T * cs} bytes), more than the limit of ${MAX_REFTABLE_BYTES} bytes`,
      );
    }
    const areaClusters = k + 1 + T;
    const blocksOffset = A * cs;
    const newTableOffset = (A + k + 1) * cs;

    // Blocks: k self-describing area blocks, then the (empty) block for needSlot.
    const blocks = new Uint8Array((k + 1) * cs);
    for (let j = 0; j < k; j++) {
      const view = new RefcountBlockView(blocks.subarray(j * cs, (j + 1) * cs), this.refcountBits);
      const lo = (areaSlot + j) * E;
      const from = Math.max(A, lo);
      const to = Math.min(A + areaClusters, lo + E);
      for (let x = from; x < to; x++) view.set(x - lo, 1);
    }
    const tableBytes = new Uint8Array(T * cs);
    tableBytes.set(this.#table.bytes);
    const table = new U64TableView(tableBytes, "big");
    for (let j = 0; j < k; j++) table.set(areaSlot + j, (A + j) * cs);
    table.set(needSlot, (A + k) * cs);

    for (let x = 0; x < areaClusters; x++) this.#forget((A + x) * cs);
    try {
      await this.#backend.write(blocksOffset, blocks);
      await this.#backend.write(newTableOffset, tableBytes);
      await this.#backend.flush();
    } catch (cause) {
      throw new IoError(`writing the grown refcount table at ${hex(newTableOffset)} failed`, {
        offset: newTableOffset,
        cause,
      });
    }
    // Rule 2: the header moves only once the new structures are durable.
    await hook(newTableOffset, T);
    this.#table = table;
    this.#tableOffset = newTableOffset;
    this.#tableClusters = T;
    // The old table is no longer referenced: free its clusters (a crash before this reaches
    // the disk leaks them, nothing worse).
    await this.#change(oldOffset / cs, oldClusters, { kind: "add", amount: -1 });
  }

  /** Drop a stale cached copy of a cluster that is about to be rewritten directly. */
  #forget(off: number): void {
    if (this.#cache.peek(off) !== undefined) this.#cache.discard(off);
  }
}

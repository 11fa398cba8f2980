import type { BlockBackend } from "@qimg/io";
import { reftableOffset } from "@qimg/qcow2";
import { RefcountBlockView } from "@qimg/refcount";
import { CorruptImageError, U64TableView, hex } from "@qimg/structs";

/**
 * The refcounts stored in the image, read the way QEMU's qcow2_get_refcount does: clusters
 * past the refcount table or in a slot without a block have refcount 0; a misaligned block
 * offset is an error. A few refcount blocks are held at a time (the checker reads in order),
 * and {@link peek} answers without a promise while the current one is the right one, so a pass
 * over millions of clusters awaits once per block, not once per cluster.
 */
export class StoredRefcounts {
  readonly #backend: BlockBackend;
  readonly #cs: number;
  readonly #bits: number;
  /** The refcount table as read (bytes past the end of the file read as zeros). */
  readonly table: U64TableView;
  readonly #entriesPerBlock: number;
  /** A few blocks kept (round robin): the checker alternates between a table's and its data's. */
  readonly #blocks: Uint8Array[] = [];
  readonly #views: RefcountBlockView[] = [];
  readonly #offsets: number[] = [];
  #next = 0;
  #block: Uint8Array;
  #view: RefcountBlockView;
  #blockOffset = -1;
  /** The table slot whose block is `#block` (-1: none). */
  #slot = -1;

  private constructor(
    backend: BlockBackend,
    clusterBits: number,
    refcountOrder: number,
    table: U64TableView,
  ) {
    this.#backend = backend;
    this.#cs = 2 ** clusterBits;
    this.#bits = 2 ** refcountOrder;
    this.table = table;
    this.#entriesPerBlock = (this.#cs * 8) / this.#bits;
    for (let i = 0; i < StoredRefcounts.CACHED; i++) {
      const bytes = new Uint8Array(this.#cs);
      this.#blocks.push(bytes);
      this.#views.push(new RefcountBlockView(bytes, this.#bits));
      this.#offsets.push(-1);
    }
    this.#block = this.#blocks[0]!;
    this.#view = this.#views[0]!;
  }

  /** Refcount blocks held at a time. */
  static readonly CACHED = 4;

  /** Read the refcount table (bytes past the end of the file read as zeros). */
  static async open(
    backend: BlockBackend,
    clusterBits: number,
    refcountOrder: number,
    tableOffset: number,
    tableClusters: number,
  ): Promise<StoredRefcounts> {
    const bytes = new Uint8Array(tableClusters * 2 ** clusterBits);
    if (bytes.byteLength > 0) await backend.read(tableOffset, bytes, { zeroPastEof: true });
    return new StoredRefcounts(backend, clusterBits, refcountOrder, new U64TableView(bytes, "big"));
  }

  /** Number of refcount table entries. */
  get tableEntries(): number {
    return this.table.length;
  }

  /** Refcount entries per refcount block. */
  get entriesPerBlock(): number {
    return this.#entriesPerBlock;
  }

  /**
   * The block offset of table slot `slot`: 0 for none (or past the table); throws when it is
   * not cluster aligned.
   */
  #blockOf(slot: number): number {
    if (slot >= this.table.length) return 0;
    const off = reftableOffset(this.table.hi(slot), this.table.lo(slot));
    if (off !== 0 && off % this.#cs !== 0) {
      throw new CorruptImageError(
        `refcount block ${slot} at ${hex(off)} is not aligned to the cluster size ${this.#cs}`,
        { offset: off },
      );
    }
    return off;
  }

  async #load(cluster: number): Promise<number | undefined> {
    const slot = Math.floor(cluster / this.#entriesPerBlock);
    const off = this.#blockOf(slot);
    if (off === 0) return undefined;
    if (off !== this.#blockOffset) {
      this.#slot = -1;
      let k = this.#offsets.indexOf(off);
      if (k < 0) {
        k = this.#next;
        this.#next = (this.#next + 1) % StoredRefcounts.CACHED;
        this.#offsets[k] = -1;
        this.#blockOffset = -1;
        // Past the end of the file a block reads as zeros (as QEMU reads it), also where no
        // read can reach (an entry of garbage, e.g. a table that is really the header).
        if (off + this.#cs > Number.MAX_SAFE_INTEGER) this.#blocks[k]!.fill(0);
        else await this.#backend.read(off, this.#blocks[k]!, { zeroPastEof: true });
        this.#offsets[k] = off;
      }
      this.#block = this.#blocks[k]!;
      this.#view = this.#views[k]!;
      this.#blockOffset = off;
    }
    this.#slot = slot;
    return cluster - slot * this.#entriesPerBlock;
  }

  /**
   * Stored refcount of one host cluster without waiting, when that needs no read: the block
   * holding it is the loaded one, or its slot has no block (0). Otherwise -1 (call
   * {@link get}). Throws as {@link get} for a misaligned block offset.
   */
  peek(cluster: number): number {
    const slot = Math.floor(cluster / this.#entriesPerBlock);
    if (slot !== this.#slot) {
      const off = this.#blockOf(slot);
      if (off === 0) return 0;
      const k = this.#offsets.indexOf(off);
      if (k < 0) return -1;
      this.#block = this.#blocks[k]!;
      this.#view = this.#views[k]!;
      this.#blockOffset = off;
      this.#slot = slot;
    }
    return this.#view.get(cluster - slot * this.#entriesPerBlock);
  }

  /**
   * The loaded refcount block when it holds `cluster` (after {@link peek} or {@link get}
   * answered for it), indexed from the block's first cluster; else undefined.
   */
  loadedBlock(cluster: number): RefcountBlockView | undefined {
    return Math.floor(cluster / this.#entriesPerBlock) === this.#slot ? this.#view : undefined;
  }

  /** The refcount block offset covering host cluster `cluster` (0 when it has none). */
  blockOffsetOf(cluster: number): number {
    return this.#blockOf(Math.floor(cluster / this.#entriesPerBlock));
  }

  /** Stored refcount of one host cluster. */
  async get(cluster: number): Promise<number> {
    const i = await this.#load(cluster);
    return i === undefined ? 0 : this.#view.get(i);
  }

  /**
   * Stored refcount of one host cluster as a bigint: for 64-bit refcounts above 2^53, which
   * {@link get} cannot return as a number. Throws as {@link get} for a misaligned block.
   */
  async getBig(cluster: number): Promise<bigint> {
    const i = await this.#load(cluster);
    if (i === undefined) return 0n;
    if (this.#bits !== 64) return BigInt(this.#view.get(i));
    return new DataView(this.#block.buffer, this.#block.byteOffset).getBigUint64(i * 8, false);
  }

  /**
   * Set the stored refcount of a cluster whose refcount block exists; writes the one
   * 512-byte sector of the block that holds the entry (atomic on disk).
   */
  async set(cluster: number, value: number): Promise<void> {
    const i = await this.#load(cluster);
    if (i === undefined) {
      throw new CorruptImageError(`cluster ${cluster} has no refcount block`, {
        offset: cluster * this.#cs,
      });
    }
    this.#view.set(i, value);
    const byte = Math.floor((i * this.#bits) / 8);
    const sector = Math.floor(byte / 512) * 512;
    const len = Math.min(512, this.#cs - sector);
    await this.#backend.write(
      this.#blockOffset + sector,
      this.#block.subarray(sector, sector + len),
    );
  }
}

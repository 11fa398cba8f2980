import type { BlockBackend } from "@qimg/io";
import { RefcountBlockView } from "@qimg/refcount";
import { CorruptImageError, U64TableView, hex } from "@qimg/structs";

/**
 * The refcounts stored in the image, read the way QEMU's qcow2_get_refcount does: clusters
 * past the refcount table or in a slot without a block have refcount 0; a misaligned block
 * offset is an error. One refcount block is held at a time (the checker reads in order).
 */
export class StoredRefcounts {
  readonly #backend: BlockBackend;
  readonly #cs: number;
  readonly #bits: number;
  readonly #table: U64TableView;
  readonly #entriesPerBlock: number;
  readonly #block: Uint8Array;
  readonly #view: RefcountBlockView;
  #blockOffset = -1;

  private constructor(
    backend: BlockBackend,
    clusterBits: number,
    refcountOrder: number,
    table: U64TableView,
  ) {
    this.#backend = backend;
    this.#cs = 2 ** clusterBits;
    this.#bits = 2 ** refcountOrder;
    this.#table = table;
    this.#entriesPerBlock = (this.#cs * 8) / this.#bits;
    this.#block = new Uint8Array(this.#cs);
    this.#view = new RefcountBlockView(this.#block, this.#bits);
  }

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
    return this.#table.length;
  }

  /** Refcount table entry `i` as its two 32-bit words. */
  entryWords(i: number): { hi: number; lo: number } {
    return { hi: this.#table.hi(i), lo: this.#table.lo(i) };
  }

  async #load(cluster: number): Promise<number | undefined> {
    const slot = Math.floor(cluster / this.#entriesPerBlock);
    if (slot >= this.#table.length) return undefined;
    const hi = this.#table.hi(slot);
    const lo = this.#table.lo(slot) & ~0x1ff;
    const off = (hi >>> 0) * 0x1_0000_0000 + (lo >>> 0);
    if (off === 0) return undefined;
    if (off % this.#cs !== 0) {
      throw new CorruptImageError(
        `refcount block ${slot} at ${hex(off)} is not aligned to the cluster size ${this.#cs}`,
        { offset: off },
      );
    }
    if (off !== this.#blockOffset) {
      this.#blockOffset = -1;
      await this.#backend.read(off, this.#block, { zeroPastEof: true });
      this.#blockOffset = off;
    }
    return cluster - slot * this.#entriesPerBlock;
  }

  /** Stored refcount of one host cluster. */
  async get(cluster: number): Promise<number> {
    const i = await this.#load(cluster);
    return i === undefined ? 0 : this.#view.get(i);
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

/**
 * Which host clusters of a qcow2 file hold metadata, so that no write lands on a structure it
 * does not own (QEMU's metadata overlap checks). Every structure is checked against every
 * other: data writes may touch no metadata at all, and a metadata write (an L2 table, a
 * refcount block, the L1 table, the header...) may touch only clusters of its own kind.
 */
import type { BlockBackend, ReadOptions } from "@qimg/io";

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

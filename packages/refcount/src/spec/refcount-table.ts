/**
 * qcow2 refcount table: big-endian u64 entries at header.refcount_table_offset,
 * refcount_table_clusters clusters long.
 *
 * Entry bits (qcow2 spec):
 * - 0..8   reserved, must be zero;
 * - 9..63  host offset of a refcount block, cluster aligned; 0 means "no block", i.e. every
 *          cluster the entry would describe has refcount 0.
 */
import { CorruptImageError, U64TableView, hex, mask64 } from "@qimg/structs";

/** Size of one refcount table entry in bytes. */
export const REFTABLE_ENTRY_SIZE = 8;
/** Bits 9..63: refcount block offset. */
export const REFTABLE_OFFSET_MASK = mask64(0xffff_ffff_ffff_fe00n);
/** Bits 0..8: reserved. */
export const REFTABLE_RESERVED_MASK = mask64(0x1ffn);
/**
 * Largest refcount table QEMU opens (QCOW_MAX_REFTABLE_SIZE, 8 MiB): one million blocks,
 * which covers far more than any real image.
 */
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;

/** What {@link validateRefcountTable} checks: the table, where it is, and the file it is in. */
export interface RefcountTableCheck {
  /** The table bytes (refcount_table_clusters * cluster_size). */
  readonly bytes: Uint8Array;
  /** Host offset of the table, for messages and error offsets. */
  readonly tableOffset: number;
  /** The image's cluster size in bytes (every block offset must be aligned to it). */
  readonly clusterSize: number;
  /** Size of the image file; every block must lie inside it. */
  readonly fileSize: number;
}

/**
 * Check every entry of a refcount table: reserved bits clear, offsets cluster aligned and
 * representable, blocks inside the file and not inside the table itself. Throws a
 * {@link CorruptImageError} naming the entry, its file offset, the value and the bound.
 */
export function validateRefcountTable(check: RefcountTableCheck): void {
  const { bytes, tableOffset, clusterSize, fileSize } = check;
  const table = new U64TableView(bytes, "big");
  const tableEnd = tableOffset + bytes.byteLength;
  for (let i = 0; i < table.length; i++) {
    if (table.isZero(i)) continue;
    const at = tableOffset + i * REFTABLE_ENTRY_SIZE;
    if (table.test(i, REFTABLE_RESERVED_MASK)) {
      throw new CorruptImageError(
        `refcount table entry ${i} at ${hex(at)} is ${hex(table.getBigInt(i))}: reserved bits 0-8 must be zero`,
        { offset: at },
      );
    }
    if (table.hi(i) > 0x1f_ffff) {
      throw new CorruptImageError(
        `refcount table entry ${i} at ${hex(at)} points to ${hex(table.getBigInt(i))}, beyond 2^53-1`,
        { offset: at },
      );
    }
    const block = table.get(i);
    if (block % clusterSize !== 0) {
      throw new CorruptImageError(
        `refcount block ${hex(block)} (refcount table entry ${i} at ${hex(at)}) is not aligned to the cluster size ${clusterSize}`,
        { offset: at },
      );
    }
    if (block + clusterSize > fileSize) {
      throw new CorruptImageError(
        `refcount block ${hex(block)} (refcount table entry ${i} at ${hex(at)}) lies past the end of the file (size ${hex(fileSize)})`,
        { offset: at },
      );
    }
    if (block < tableEnd && block + clusterSize > tableOffset) {
      throw new CorruptImageError(
        `refcount block ${hex(block)} (refcount table entry ${i} at ${hex(at)}) overlaps the refcount table at ${hex(tableOffset)}..${hex(tableEnd)}`,
        { offset: at },
      );
    }
  }
}

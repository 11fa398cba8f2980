/**
 * QED L1 and L2 tables: `table_size` clusters of little-endian u64 entries.
 *
 * An L1 entry is 0 (no L2 table: the whole range it maps is unallocated) or the host offset
 * of an L2 table. An L2 entry is 0 (unallocated: read the backing file, or zeros),
 * 1 (QED_CLUSTER_ZERO: reads as zeros) or the host offset of a data cluster. Offsets must be
 * cluster aligned, past the header clusters and inside the file.
 *
 * Tables are hot: {@link QedTable} is a zero-copy view over the cached bytes.
 */
import { U64TableView } from "@qimg/structs";
import { QED_CLUSTER_UNALLOCATED, QED_CLUSTER_ZERO, QED_SECTOR_SIZE } from "./constants.js";

/** Size in bytes of one table entry. */
export const QED_TABLE_ENTRY_SIZE = 8;

/** Byte layout of one table entry. */
export const QED_TABLE_ENTRY_FIELDS = {
  /** u64, bytes: 0 = unallocated, 1 = zero cluster (L2 only), else a cluster-aligned host offset. */
  offset: { offset: 0, type: "u64", unit: "bytes", doc: "host offset or 0/1 marker" },
} as const;

/** What the file layout is, for validating offsets found in tables. */
export interface QedGeometry {
  /** Bytes per cluster. */
  readonly clusterSize: number;
  /** Clusters per L1/L2 table. */
  readonly tableSize: number;
  /** Clusters of header at the start of the file. */
  readonly headerSize: number;
  /** File size rounded up to a sector, then down to a whole cluster (QEMU's `file_size`, see {@link qedFileSize}). */
  readonly fileSize: number;
}

/** How a table entry is to be read. */
export type QedEntryKind = "unallocated" | "zero" | "offset" | "invalid";

/** Value returned by {@link QedTable.get} for an entry above 2^53-1 (always invalid). */
export const QED_ENTRY_TOO_LARGE = -1;

/**
 * A zero-copy view of an L1 or L2 table. `get` returns the entry as a number, or
 * {@link QED_ENTRY_TOO_LARGE} when it does not fit 53 bits (which is past any real file,
 * so callers treat it as an invalid offset instead of throwing).
 */
export class QedTable {
  /** The little-endian u64 view the entries are read through. */
  readonly view: U64TableView;

  constructor(bytes: Uint8Array) {
    this.view = new U64TableView(bytes, "little");
  }

  /** Number of entries. */
  get length(): number {
    return this.view.length;
  }

  /** The table's bytes (not a copy). */
  get bytes(): Uint8Array {
    return this.view.bytes;
  }

  /** Entry `i`: 0 unallocated, 1 zero cluster, else a file offset ({@link QED_ENTRY_TOO_LARGE} past 2^53). */
  get(i: number): number {
    return this.view.hi(i) > 0x1f_ffff ? QED_ENTRY_TOO_LARGE : this.view.get(i);
  }

  /** Set entry `i` to `value` (a safe integer). */
  set(i: number, value: number): void {
    this.view.set(i, value);
  }
}

/**
 * QEMU's `file_size` for a file of `bytes` bytes: the length the block layer reports (rounded
 * up to a whole 512-byte sector; the missing bytes of a torn last sector read as zeros),
 * rounded down to a whole cluster. Table entries must point below it.
 */
export function qedFileSize(bytes: number, clusterSize: number): number {
  const sectors = Math.ceil(bytes / QED_SECTOR_SIZE) * QED_SECTOR_SIZE;
  return sectors - (sectors % clusterSize);
}

/** True when `offset` is a cluster-aligned offset past the header and inside the file. */
export function isValidClusterOffset(offset: number, g: QedGeometry): boolean {
  if (offset < 0 || offset % g.clusterSize !== 0) return false;
  return offset >= g.headerSize * g.clusterSize && offset < g.fileSize;
}

/**
 * True when a whole table (`tableSize` clusters) at `offset` is valid: its first and last
 * cluster are valid cluster offsets. (QEMU 7.2's version of this check also rejects every
 * table when table_size is 1, through an overflow guard that compares with `<=`; qimg does
 * not copy that bug.)
 */
export function isValidTableOffset(offset: number, g: QedGeometry): boolean {
  if (offset < 0) return false;
  const last = offset + (g.tableSize - 1) * g.clusterSize;
  return (
    Number.isSafeInteger(last) && isValidClusterOffset(offset, g) && isValidClusterOffset(last, g)
  );
}

/** Classify an L2 entry value (as returned by {@link QedTable.get}). */
export function classifyL2Entry(value: number, g: QedGeometry): QedEntryKind {
  if (value === QED_CLUSTER_UNALLOCATED) return "unallocated";
  if (value === QED_CLUSTER_ZERO) return "zero";
  return isValidClusterOffset(value, g) ? "offset" : "invalid";
}

/** Classify an L1 entry value (there are no zero markers in L1: 1 is invalid). */
export function classifyL1Entry(value: number, g: QedGeometry): QedEntryKind {
  if (value === QED_CLUSTER_UNALLOCATED) return "unallocated";
  return isValidTableOffset(value, g) ? "offset" : "invalid";
}

import { defineFeatures } from "@qimg/structs";

/** "QED\0" read as a little-endian u32. */
export const QED_MAGIC = 0x0044_4551;

/** Incompatible feature bits (header field `features`). */
export const QedFeatures = defineFeatures({
  /** The image has a backing file; its name is stored after the header. */
  backingFile: 0,
  /** The image was not closed cleanly and must be checked before use. */
  needCheck: 1,
  /** The backing file is raw: never probe its format. */
  backingFormatNoProbe: 2,
} as const);

/** Feature bits this implementation understands; any other bit refuses the open. */
export const QED_KNOWN_FEATURES = QedFeatures.knownMask;
/** Compatible feature bits this implementation understands (none exist). */
export const QED_KNOWN_COMPAT_FEATURES = 0n;
/** Autoclear feature bits this implementation understands (none exist); others are cleared on read-write open. */
export const QED_KNOWN_AUTOCLEAR_FEATURES = 0n;

/** Feature bit: the image has a backing file. */
export const QED_F_BACKING_FILE = QedFeatures.maskOf("backingFile");
/** Feature bit: the image may be inconsistent and must be checked before use. */
export const QED_F_NEED_CHECK = QedFeatures.maskOf("needCheck");
/** Feature bit: the backing file is raw; do not probe its format. */
export const QED_F_BACKING_FORMAT_NO_PROBE = QedFeatures.maskOf("backingFormatNoProbe");

/** Cluster size limits and default, in bytes. */
export const QED_MIN_CLUSTER_SIZE = 4 * 1024;
/** Largest cluster size. */
export const QED_MAX_CLUSTER_SIZE = 64 * 1024 * 1024;
/** Cluster size of new images unless asked otherwise. */
export const QED_DEFAULT_CLUSTER_SIZE = 64 * 1024;

/** Table size limits and default, in clusters (for both L1 and L2 tables). */
export const QED_MIN_TABLE_SIZE = 1;
/** Largest table size. */
export const QED_MAX_TABLE_SIZE = 16;
/** Table size of new images unless asked otherwise. */
export const QED_DEFAULT_TABLE_SIZE = 4;

/** Quiet period after the last allocating write before the need-check bit is cleared (QEMU: 5 s). */
export const QED_NEED_CHECK_TIMEOUT_MS = 5000;

/** Table entry meaning "not allocated here: read the backing file (or zeros)". */
export const QED_CLUSTER_UNALLOCATED = 0;
/** L2 table entry meaning "reads as zeros" (QEMU's QED_CLUSTER_ZERO). */
export const QED_CLUSTER_ZERO = 1;

/** Virtual sizes are multiples of this. */
export const QED_SECTOR_SIZE = 512;

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** True when `n` is a power of two in [4 KiB, 64 MiB]. */
export function isValidClusterSize(n: number): boolean {
  return isPowerOfTwo(n) && n >= QED_MIN_CLUSTER_SIZE && n <= QED_MAX_CLUSTER_SIZE;
}

/** True when `n` is a power of two in [1, 16] (clusters). */
export function isValidTableSize(n: number): boolean {
  return isPowerOfTwo(n) && n >= QED_MIN_TABLE_SIZE && n <= QED_MAX_TABLE_SIZE;
}

/**
 * Largest virtual size an image with these cluster and table sizes may have, as QEMU computes it:
 * cluster_size * entries^2 where entries = table_size * cluster_size / 8, in unsigned 64-bit
 * arithmetic that wraps. For the biggest combinations (3*log2(cluster_size) + 2*log2(table_size)
 * >= 70, e.g. 2 MiB clusters with 16-cluster tables, 4 MiB with 4, 64 MiB with 1) the true value
 * reaches 2^64 or more and QEMU's limit wraps to 0: qemu-img then refuses to create such an
 * image with a non-zero size and refuses to open one, so qimg does the same. Capped at the
 * largest safe number that is a multiple of 512 (the unwrapped limits reach 2^63).
 */
export function maxImageSize(clusterSize: number, tableSize: number): number {
  const entries = BigInt((tableSize * clusterSize) / 8);
  const max = (BigInt(clusterSize) * entries * entries) & 0xffff_ffff_ffff_ffffn;
  const cap = Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % QED_SECTOR_SIZE);
  return max > BigInt(cap) ? cap : Number(max);
}

/** True when `size` is a multiple of 512 no larger than the tables can map. */
export function isValidImageSize(size: number, clusterSize: number, tableSize: number): boolean {
  return (
    Number.isSafeInteger(size) &&
    size >= 0 &&
    size % QED_SECTOR_SIZE === 0 &&
    size <= maxImageSize(clusterSize, tableSize)
  );
}

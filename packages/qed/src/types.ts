import type { BackingOpener } from "@qimg/io";

export type { BackingOpener, BackingRequest } from "@qimg/io";

/** A timer the need-check logic uses; inject a fake one in tests. */
export interface QedTimer {
  /** Call `callback` once after `ms` milliseconds; returns a handle for {@link clear}. */
  set(callback: () => void, ms: number): unknown;
  /** Cancel a pending callback. */
  clear(handle: unknown): void;
}

/** Options of {@link openQed}. */
export interface QedOpenOptions {
  /**
   * Open read-only (the default, as for every format driver); `false` opens read-write, which
   * a read-only backend refuses.
   */
  readonly readOnly?: boolean;
  /**
   * Opens the backing file when the image has one. Without it (and without `noBacking`), a
   * read-only open goes on without the backing file and reads of ranges it would answer fail;
   * a read-write open is refused.
   */
  readonly openBacking?: BackingOpener;
  /**
   * Open the image as if it had no backing file (QEMU's BDRV_O_NO_BACKING): ranges the
   * backing file would answer read as zeros. For tools that only look at metadata.
   */
  readonly noBacking?: boolean;
  /** Quiet period after the last allocating write before the need-check bit is cleared. Default 5000 (QEMU's 5 s). */
  readonly needCheckClearDelayMs?: number;
  /** Timer for the need-check quiet period. Default: the global setTimeout (unref'd where possible). */
  readonly timer?: QedTimer;
  /** Backing depth of this image when it is itself opened as a backing file (0 = top). */
  readonly depth?: number;
  /** Names of the images open above this one, top first. */
  readonly chain?: readonly string[];
  /** L2 tables kept in the cache. Default: up to 50 (QEMU's), fewer for large tables. */
  readonly l2CacheCapacity?: number;
}

/** The facts `qemu-img info` shows for a QED image. */
export interface QedInfo {
  /** Guest-visible size in bytes. */
  readonly virtualSize: number;
  /** Cluster size in bytes. */
  readonly clusterSize: number;
  /** L1/L2 table size in clusters. */
  readonly tableSize: number;
  /** Header size in clusters. */
  readonly headerSize: number;
  /** The backing file name as stored, if any. */
  readonly backingFilename?: string;
  /** "raw" when the no-probe flag is set; QED records no other format. */
  readonly backingFormat?: string;
  /** The need-check (dirty) bit. */
  readonly needCheck: boolean;
  /** Raw feature masks, unknown bits included. */
  readonly features: bigint;
  /** Compatible feature mask. */
  readonly compatFeatures: bigint;
  /** Autoclear feature mask. */
  readonly autoclearFeatures: bigint;
}

/** Options of {@link createQed}, as `qemu-img create -f qed -o ...`. */
export interface QedCreateOptions {
  /** Virtual size in bytes; rounded up to a multiple of 512 like qemu-img. */
  readonly size: number;
  /** Default 65536. */
  readonly clusterSize?: number;
  /** L1/L2 table size in clusters. Default 4. */
  readonly tableSize?: number;
  /** Backing file name to record. */
  readonly backingFile?: string;
  /** Backing format; only "raw" is recorded (as the no-probe flag). */
  readonly backingFormat?: string;
}

/** One problem found by {@link checkQed}. */
export interface QedCheckProblem {
  /** A corruption, a leaked cluster, or an I/O error. */
  readonly kind: "corruption" | "leak" | "error";
  /** Whether repair fixed it. */
  readonly fixed: boolean;
  /** File offset of the bad entry (or of the leaked cluster). */
  readonly offset: number;
  /** The problem in words, as qemu-img check prints it. */
  readonly message: string;
}

/** Result of a consistency check, in qemu-img check's terms. */
export interface QedCheckResult {
  /** Corruptions left (unfixed). */
  readonly corruptions: number;
  /** Corruptions repaired. */
  readonly corruptionsFixed: number;
  /** Clusters in the file that no table references (QEMU does not repair these; nor do we). */
  readonly leaks: number;
  /** Leaks repaired (always 0, as in QEMU). */
  readonly leaksFixed: number;
  /** Tables that could not be read or written. */
  readonly checkErrors: number;
  /** Data clusters referenced by L2 tables. */
  readonly allocatedClusters: number;
  /** Clusters of the virtual disk. */
  readonly totalClusters: number;
  /** Data clusters not directly after the previous one in the same L2 table. */
  readonly fragmentedClusters: number;
  /** File size rounded down to a cluster. */
  readonly imageEndOffset: number;
  /** Whether the need-check bit was cleared by this check. */
  readonly markedClean: boolean;
  /** Every problem found, in order. */
  readonly problems: readonly QedCheckProblem[];
}

/** Options of {@link checkQed}. */
export interface QedCheckOptions {
  /** Clear invalid table entries and, when nothing is left broken, the need-check bit. Default false. */
  readonly repair?: boolean;
}

export type { BackingOpener, BackingRequest } from "@qimg/io";

export interface SnapshotInfo {
  /** Unique ID string (QEMU numbers them "1", "2", ...). */
  readonly id: string;
  readonly name: string;
  /** Size of the saved VM state in bytes (64-bit in v3 extra data). */
  readonly vmStateSize: number;
  readonly dateSec: number;
  readonly dateNsec: number;
  /** Guest clock in nanoseconds when taken (any u64: bigint, as stored). */
  readonly vmClockNsec: bigint;
  /** Virtual disk size when taken (v3 extra data), if recorded. */
  readonly diskSize: number | undefined;
  /**
   * Instruction count (icount) when taken, as the signed 64-bit value QEMU prints; undefined
   * when not recorded (absent or -1).
   */
  readonly icount: bigint | undefined;
  /** Host offset of the snapshot's L1 table. */
  readonly l1TableOffset: number;
  readonly l1Size: number;
}

export interface BitmapInfo {
  readonly name: string;
  readonly granularity: number;
  /** "in-use", "auto" as qemu-img info prints them. */
  readonly flags: readonly string[];
}

/** The facts `qemu-img info` shows for a qcow2 image. */
export interface Qcow2Info {
  readonly virtualSize: number;
  readonly clusterSize: number;
  /** "0.10" for version 2, "1.1" for version 3. */
  readonly compat: "0.10" | "1.1";
  readonly version: 2 | 3;
  readonly dirty: boolean;
  readonly corrupt: boolean;
  readonly lazyRefcounts: boolean;
  readonly refcountBits: number;
  readonly extendedL2: boolean;
  readonly compressionType: "zlib" | "zstd";
  readonly encrypted: boolean;
  readonly backingFilename: string | undefined;
  readonly backingFormat: string | undefined;
  readonly dataFile: string | undefined;
  readonly dataFileRaw: boolean;
  readonly snapshots: readonly SnapshotInfo[];
  readonly bitmaps: readonly BitmapInfo[];
  /** Names of the incompatible/compatible/autoclear features that are set, known or not. */
  readonly features: {
    readonly incompatible: readonly string[];
    readonly compatible: readonly string[];
    readonly autoclear: readonly string[];
  };
}

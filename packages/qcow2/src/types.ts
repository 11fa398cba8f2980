import type { BackingOpener, BlockBackend } from "@qimg/io";

export type { BackingOpener, BackingRequest } from "@qimg/io";

/** How {@link openQcow2} opens an image: read-only or read-write, backing files, caching. */
export interface Qcow2OpenOptions {
  /** Open read-only (the default, and the only mode of this read driver). */
  readonly readOnly?: boolean;
  /** Opens the backing file; required when the image has one, unless `noBacking`. */
  readonly openBacking?: BackingOpener;
  /** Opens the external data file by name; required when the image has one, unless `noBacking`. */
  readonly openDataFile?: (name: string, relativeTo: string) => Promise<BlockBackend>;
  /** Override the recorded backing format. */
  readonly backingFormat?: string;
  /** Do not open the backing file or data file (enough for `info`). */
  readonly noBacking?: boolean;
  /** L2 table cache size in bytes. Default: enough for 32 MiB... 1 GiB of guest data, bounded to 32 MiB. */
  readonly l2CacheBytes?: number;
  /** Backing depth of this image (set by openers; 0 for the top image). */
  readonly depth?: number;
  /** Names of the images above this one (for cycle detection). */
  readonly chain?: readonly string[];
  /** Override the image's lazy-refcounts bit for this open (like `-drive lazy_refcounts=on`). */
  readonly lazyRefcounts?: boolean;
  /** Write metadata through at once instead of batching it until flush. Default false. */
  readonly writethrough?: boolean;
  /** Refcount block cache size in bytes. Default 4 clusters' worth of blocks, at least 256 KiB. */
  readonly refcountCacheBytes?: number;
  /** Compresses a cluster for `writeCompressed`; default deflate (zlib) via node:zlib. */
  readonly compress?: Compressor;
  /**
   * Decompresses compressed clusters instead of the built-in decoders (the CLI hands them to
   * worker threads); it must behave as `decompressorFor(compressionType)` does.
   */
  readonly decompress?: ClusterDecompressor;
  /**
   * Told what QEMU warns about when it opens this image, before any backing file is opened:
   * so far {@link STALE_BITMAPS_WARNING}. The library itself prints nothing.
   */
  readonly onWarning?: (message: string) => void;
}

/**
 * What QEMU says (two lines) when an image has a bitmaps extension but not its autoclear bit:
 * a program without bitmap support wrote the image, every bitmap is inconsistent, and their
 * clusters may be leaked.
 */
export const STALE_BITMAPS_WARNING =
  "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent\n" +
  "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.";

/** Decompresses one compressed cluster into exactly `out.length` bytes, or throws. */
export type ClusterDecompressor = (
  src: Uint8Array,
  out: Uint8Array,
  compressionType: number,
) => Promise<void>;

/** Compresses one cluster; returns undefined when compression does not pay. */
export type Compressor = (
  data: Uint8Array,
  compressionType: number,
) => Promise<Uint8Array | undefined>;

/** A snapshot as `qemu-img info` lists it. */
export interface SnapshotInfo {
  /** Unique ID string (QEMU numbers them "1", "2", ...). */
  readonly id: string;
  /** The snapshot's name. */
  readonly name: string;
  /** Size of the saved VM state in bytes (64-bit in v3 extra data). */
  readonly vmStateSize: number;
  /** Wall-clock time it was taken: seconds since the epoch. */
  readonly dateSec: number;
  /** The nanoseconds part of that time. */
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
  /** Entries of that L1 table. */
  readonly l1Size: number;
}

/** A persistent dirty bitmap as `qemu-img info` lists it. */
export interface BitmapInfo {
  /** The bitmap's name. */
  readonly name: string;
  /** Bytes of guest data one bit covers. */
  readonly granularity: number;
  /** "in-use", "auto" as qemu-img info prints them. */
  readonly flags: readonly string[];
}

/** The facts `qemu-img info` shows for a qcow2 image. */
export interface Qcow2Info {
  /** Guest-visible size in bytes. */
  readonly virtualSize: number;
  /** Cluster size in bytes. */
  readonly clusterSize: number;
  /** "0.10" for version 2, "1.1" for version 3. */
  readonly compat: "0.10" | "1.1";
  /** Format version. */
  readonly version: 2 | 3;
  /** The dirty bit is set (refcounts may be stale: lazy refcounts after a crash). */
  readonly dirty: boolean;
  /** The corrupt bit is set (QEMU opens such images read-only). */
  readonly corrupt: boolean;
  /** Lazy refcounts are enabled. */
  readonly lazyRefcounts: boolean;
  /** Width of one refcount in bits. */
  readonly refcountBits: number;
  /** L2 entries are extended (32 subclusters per cluster). */
  readonly extendedL2: boolean;
  /** How compressed clusters are encoded. */
  readonly compressionType: "zlib" | "zstd";
  /** The image is encrypted (AES or LUKS). */
  readonly encrypted: boolean;
  /** The backing file name as stored, if any. */
  readonly backingFilename: string | undefined;
  /** The backing file format as stored, if any. */
  readonly backingFormat: string | undefined;
  /** The external data file name, if any. */
  readonly dataFile: string | undefined;
  /** The external data file is raw (guest offsets equal data file offsets). */
  readonly dataFileRaw: boolean;
  /** The snapshot table. */
  readonly snapshots: readonly SnapshotInfo[];
  /** The persistent bitmaps. */
  readonly bitmaps: readonly BitmapInfo[];
  /** Names of the incompatible/compatible/autoclear features that are set, known or not. */
  readonly features: {
    readonly incompatible: readonly string[];
    readonly compatible: readonly string[];
    readonly autoclear: readonly string[];
  };
}

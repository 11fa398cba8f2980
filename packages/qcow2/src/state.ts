/**
 * What every module of the qcow2 driver shares (QEMU keeps the same in one `BDRVQcow2State`):
 * the header and the facts derived from it, the active L1 table, the L2 table cache, the
 * files, and for read-write opens the write state (refcounts, locks, claims, the metadata map,
 * postponed frees). The modules are free functions over one {@link Qcow2State}; `image.ts` is
 * the public facade over them.
 */
import { CorruptImageError, IoError } from "@qimg/structs";
import type { U64TableView } from "@qimg/structs";
import { Mutex, RangeClaims, imageClosedError, imageReadOnlyError } from "@qimg/io";
import type { BlockBackend, DiskImage } from "@qimg/io";
import { ClusterCache } from "@qimg/cluster-cache";
import type { Refcounts } from "@qimg/refcount";
import { AutoclearFeatures, IncompatibleFeatures } from "./spec/header.js";
import type { Qcow2Header } from "./spec/header.js";
import type { FeatureName, HeaderExtension } from "./spec/extensions.js";
import type { SnapshotEntry } from "./spec/snapshot.js";
import type { BitmapEntry } from "./spec/bitmap-directory.js";
import { compressedLayout, entryCopied, l1Offset, l2Format } from "./spec/l2.js";
import type { CompressedLayout, L2Format } from "./spec/l2.js";
import { decompressorFor } from "./compress.js";
import type { Decompressor } from "./compress.js";
import { Meta, checkMetaWrite, guardedBackend } from "./overlap.js";
import type { MetadataMap } from "./overlap.js";
import type { PersistentBitmaps } from "./bitmap.js";
import type { ClusterDecompressor, Compressor } from "./types.js";

/** Everything a read-write open needs on top of the read path. */
export interface WriteState {
  readonly refcounts: Refcounts;
  readonly refcountCache: ClusterCache;
  readonly lazy: boolean;
  readonly compress: Compressor;
  /** Serialises metadata changes (L1, L2 entries, refcounts). */
  readonly meta: Mutex;
  /** Guest cluster ranges with a request in flight (FIFO: overlapping requests wait). */
  readonly claims: RangeClaims;
  /**
   * Host clusters of metadata (overlap checks): header, active and inactive L1 and L2 tables,
   * refcount table and blocks, snapshot table, bitmap directory and tables.
   */
  readonly metadata: MetadataMap;
  /** L2 tables of the snapshots (read at open; snapshot.ts replaces it when the table changes). */
  inactiveL2: readonly number[];
  /** Old L2 tables replaced by copies, still active on disk until the L1 table is written. */
  retiredL2: number[];
  /** Dirty range of the in-memory L1 table, in entries [lo, hi). */
  l1DirtyLo: number;
  l1DirtyHi: number;
  /** Refcount decrements postponed until the L2/L1 change that dropped the reference is on disk. */
  pendingFrees: [offset: number, clusters: number][];
  /** The dirty bit is set on disk (lazy refcounts). */
  dirtyOnDisk: boolean;
  /** Set once an overlap was caught: the image is read-only from then on. */
  corrupted: boolean;
  /** cache=writethrough: every request is durable (data and metadata) when it completes. */
  readonly writethrough: boolean;
  /** Host cluster being filled with compressed data, and the next free byte in it. */
  compressedCluster: number;
  compressedNext: number;
}

/** What `open.ts` read from the file, to build the state from. */
export interface StateInit {
  header: Qcow2Header;
  fileSize: number;
  extensions: readonly HeaderExtension[];
  featureNames: readonly FeatureName[];
  l1: U64TableView;
  snapshots: readonly SnapshotEntry[];
  bitmaps: readonly BitmapEntry[];
  backingFilename: string | undefined;
  backingFormat: string | undefined;
  dataFileName: string | undefined;
  l2CacheBytes: number | undefined;
  bitmapDirectory: { offset: number; length: number } | undefined;
  /** Opened with `noBacking`: unallocated ranges read as zeros, not from the backing file. */
  noBacking: boolean;
  /** The `decompress` open option. */
  decompress?: ClusterDecompressor | undefined;
}

/** The shared state of one open qcow2 image. */
export class Qcow2State {
  /** Guest-visible size: whole 512-byte sectors. */
  size: number;
  /** The current header (read-write opens change it: dirty bit, moved tables, size). */
  hdr: Qcow2Header;
  readOnly = true;
  readonly bitmapDirectory: { readonly offset: number; readonly length: number } | undefined;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly extensions: readonly HeaderExtension[];
  readonly featureNames: readonly FeatureName[];
  /** The snapshot table (snapshot.ts replaces it on create and delete). */
  snapshots: readonly SnapshotEntry[];
  readonly bitmaps: readonly BitmapEntry[];
  readonly backingFilename: string | undefined;
  readonly backingFormat: string | undefined;
  readonly dataFileName: string | undefined;
  backing: DiskImage | undefined;
  /** Opened with `noBacking` (QEMU's BDRV_O_NO_BACKING): no backing file is read. */
  readonly noBacking: boolean;

  /** The active L1 table (replaced by a larger one on resize). */
  l1: U64TableView;
  readonly l2Cache: ClusterCache;
  /** L2 entries per table (a cluster of 8-byte entries, or 16-byte ones with extended L2). */
  readonly l2Entries: number;
  readonly extendedL2: boolean;
  /** Subcluster size (the cluster size without extended L2). */
  readonly subclusterSize: number;
  readonly layout: CompressedLayout;
  /** How this image's L2 entries decode (stride, entries per table, compressed layout). */
  readonly fmt: L2Format;
  readonly decompress: Decompressor;
  readonly hasDataFile: boolean;
  /** data_file_raw: the external data file always equals the guest disk. */
  readonly dataFileRaw: boolean;
  /** Where guest data lives: the image file, or the external data file. */
  dataBackend: BlockBackend;
  fileSize: number;
  closed = false;
  /** Write-side state; undefined for read-only opens. */
  w: WriteState | undefined;
  /** The last decompressed cluster, so sequential small reads decompress once. */
  lastCompressed: { host: number; data: Uint8Array } | undefined;
  /** Persistent dirty bitmaps kept up to date by this read-write open (bitmap.ts). */
  pbm: PersistentBitmaps | undefined;

  constructor(
    /** The file the image lives in. */
    readonly backend: BlockBackend,
    init: StateInit,
  ) {
    const h = init.header;
    this.hdr = h;
    this.bitmapDirectory = init.bitmapDirectory;
    // QEMU counts whole 512-byte sectors: a size that is not a multiple of 512 is rounded down.
    this.size = Math.floor(h.size / 512) * 512;
    this.clusterBits = h.clusterBits;
    this.clusterSize = 2 ** h.clusterBits;
    this.fileSize = init.fileSize;
    this.extensions = init.extensions;
    this.featureNames = init.featureNames;
    this.l1 = init.l1;
    this.snapshots = init.snapshots;
    this.bitmaps = init.bitmaps;
    this.backingFilename = init.backingFilename;
    this.backingFormat = init.backingFormat;
    this.dataFileName = init.dataFileName;
    this.noBacking = init.noBacking;
    const incompat = IncompatibleFeatures.decode(h.incompatibleFeatures);
    this.extendedL2 = incompat.has("extendedL2");
    this.hasDataFile = incompat.has("externalDataFile");
    this.dataFileRaw =
      this.hasDataFile && AutoclearFeatures.decode(h.autoclearFeatures).has("rawExternalData");
    this.layout = compressedLayout(h.clusterBits);
    this.fmt = l2Format({
      clusterBits: h.clusterBits,
      extendedL2: this.extendedL2,
      hasDataFile: this.hasDataFile,
    });
    this.l2Entries = this.fmt.entriesPerTable;
    this.subclusterSize = this.clusterSize / this.fmt.subclusters;
    const builtIn = decompressorFor(h.compressionType); // refuses an unknown type either way
    const custom = init.decompress;
    const type = h.compressionType;
    this.decompress = custom === undefined ? builtIn : (src, out) => custom(src, out, type);
    this.dataBackend = backend;
    const tables = Math.max(
      4,
      Math.floor(
        (init.l2CacheBytes ??
          Math.min(32 * 1024 * 1024, Math.max(1024 * 1024, h.l1Size * this.clusterSize))) /
          this.clusterSize,
      ),
    );
    this.l2Cache = new ClusterCache({
      // L2 tables are written only where no other metadata lives.
      backend: guarded(this, Meta.activeL2),
      tableSize: this.clusterSize,
      capacity: tables,
      name: "L2",
    });
  }
}

/**
 * The image file, with every write checked against the metadata map first (metadata of kind
 * `own` may overwrite itself).
 */
export function guarded(s: Qcow2State, own: number): BlockBackend {
  return guardedBackend(s.backend, (o, n) => checkMetaWrite(s, o, n, own));
}

/** The L2 table offset in active L1 entry `i` (0 for none). */
export function l1Entry(s: Qcow2State, i: number): number {
  return l1Offset(s.l1.hi(i), s.l1.lo(i));
}

/** Whether active L1 entry `i` has COPIED set (its L2 table is writable in place). */
export function l1Copied(s: Qcow2State, i: number): boolean {
  return entryCopied(s.l1.hi(i));
}

/** Throws once the image is closed. */
export function checkOpen(s: Qcow2State): void {
  if (s.closed) throw imageClosedError(s.backend.name);
}

/**
 * Throws once the image is closed, or once this open marked it corrupt: like QEMU, which drops
 * the driver of an image it marks corrupt, no request is served after that (qemu-io: "No
 * medium found"; a flush still succeeds and close still closes).
 */
export function checkUsable(s: Qcow2State): void {
  checkOpen(s);
  if (s.w?.corrupted) {
    throw new IoError(`${s.backend.name}: the image was marked corrupt; no more requests`, {
      cause: Object.assign(new Error("no medium: the image was marked corrupt"), {
        code: "ENOMEDIUM",
      }),
    });
  }
}

/** The write state, or the error for a read-only (or corrupted) image. */
export function checkWritable(s: Qcow2State): WriteState {
  checkUsable(s);
  const w = s.w;
  if (!w || s.readOnly) throw imageReadOnlyError(s.backend.name, "image is opened read-only");
  return w;
}

/**
 * A metadata write refused by the overlap check reaches us wrapped by the cache that tried
 * it ("writing L2 table ... failed"): once the image is marked corrupt, give callers the
 * CorruptImageError itself.
 */
export function corruptCause(s: Qcow2State, e: unknown): unknown {
  if (!s.w?.corrupted) return e;
  for (let c: unknown = e; c instanceof Error; c = c.cause) {
    if (c instanceof CorruptImageError) return c;
  }
  return e;
}

/**
 * Run `fn` holding guest clusters [first, last] (RangeClaims.run): overlapping requests take
 * effect in the order they were issued, and unrelated ones run in parallel.
 */
export function withClusters<T>(
  s: Qcow2State,
  first: number,
  last: number,
  fn: () => Promise<T>,
): Promise<T> {
  return s.w!.claims.run(first, last, fn).catch((e: unknown) => {
    throw corruptCause(s, e);
  });
}

/** True when the image has a backing file (opened or not). */
export function hasBackingFile(s: Qcow2State): boolean {
  return s.backing !== undefined || s.backingFilename !== undefined;
}

/** Fresh write state for a read-write open (see open-write.ts). */
export function newWriteState(
  fields: Pick<
    WriteState,
    "refcounts" | "refcountCache" | "lazy" | "compress" | "metadata" | "inactiveL2" | "writethrough"
  >,
): WriteState {
  return {
    ...fields,
    meta: new Mutex(),
    claims: new RangeClaims(),
    retiredL2: [],
    l1DirtyLo: Number.MAX_SAFE_INTEGER,
    l1DirtyHi: 0,
    pendingFrees: [],
    dirtyOnDisk: false,
    corrupted: false,
    compressedCluster: -1,
    compressedNext: 0,
  };
}

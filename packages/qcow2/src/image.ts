import {
  CorruptImageError,
  ErrorCode,
  IoError,
  FormatError,
  InvalidArgumentError,
  UnsupportedFeatureError,
  U64TableView,
  hex,
} from "@qimg/structs";
import { RangeClaims } from "@qimg/io";
import type { BlockBackend, BlockStatus, DiskImage } from "@qimg/io";
import { ClusterCache } from "@qimg/cluster-cache";
import type { CachedTable } from "@qimg/cluster-cache";
import { Refcounts, rebuildRefcounts } from "@qimg/refcount";
import {
  AutoclearFeatures,
  CompatibleFeatures,
  FEATURE_NAMES,
  IncompatibleFeatures,
  decodeHeader,
  validateHeader,
} from "./spec/header.js";
import type { Qcow2Header } from "./spec/header.js";
import {
  BitmapsExtension,
  ExtensionType,
  decodeExtensions,
  decodeFeatureNames,
  decodeString,
  decodeStringExtension,
} from "./spec/extensions.js";
import type { FeatureName, HeaderExtension } from "./spec/extensions.js";
import { decodeSnapshotTable } from "./spec/snapshot.js";
import type { SnapshotEntry } from "./spec/snapshot.js";
import { decodeBitmapDirectory, BitmapFlag } from "./spec/bitmap-directory.js";
import type { BitmapEntry } from "./spec/bitmap-directory.js";
import {
  L1_OFFSET_MASK,
  L2_OFFSET_MASK,
  OFLAG_COMPRESSED,
  OFLAG_COPIED,
  OFLAG_ZERO,
  SUBCLUSTERS,
  compressedLayout,
  decodeCompressed,
} from "./spec/l2.js";
import type { CompressedLayout } from "./spec/l2.js";
import { decompressorFor } from "./compress.js";
import type { Decompressor } from "./compress.js";
import { defaultCompress } from "./compress.js";
import { encodeHeaderArea } from "./spec/header-area.js";
import { walkReferences } from "./walk.js";
import { Meta, MetadataMap, guardedBackend, metaName } from "./overlap.js";
import { PersistentBitmaps } from "./bitmap.js";
import { encodeCompressed } from "./spec/l2.js";
import type { BackingOpener, Qcow2Info } from "./types.js";

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
}

/** Kinds of guest ranges, as the qcow2 spec classifies (sub)clusters. */
const enum Kind {
  /** Not allocated here: read from the backing file or zeros. */
  Unallocated,
  /** Reads as zeros; `host` is set when a cluster stays allocated (zero-alloc). */
  Zero,
  /** Data stored uncompressed at `host`. */
  Normal,
  /** Data stored compressed at `host` (a whole cluster). */
  Compressed,
}

/** One resolved run of guest bytes with the same kind (reused; never allocated per entry). */
interface Extent {
  kind: Kind;
  length: number;
  /** Host offset of the run's first byte, or -1. */
  host: number;
  /** Compressed: length of the compressed bytes. */
  compressedLength: number;
}

/** Compresses one cluster; returns undefined when compression does not pay. */
export type Compressor = (
  data: Uint8Array,
  compressionType: number,
) => Promise<Uint8Array | undefined>;

/** Everything a read-write open needs on top of the read path. */
interface WriteState {
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
  /** L2 tables of the snapshots (read once at open; the driver never changes snapshots). */
  readonly inactiveL2: readonly number[];
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

class Mutex {
  private tail: Promise<unknown> = Promise.resolve();
  run<T>(fn: () => Promise<T>): Promise<T> {
    const r = this.tail.then(fn, fn);
    this.tail = r.catch(() => undefined);
    return r;
  }
}

const TWO_32 = 0x1_0000_0000;
const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
/** QEMU writes at most this much zero bytes per try when a zero write falls back. */
const ZERO_FALLBACK_MAX = 16 * 1024 * 1024;

/**
 * A qcow2 image opened for reading. Implements {@link DiskImage}: reads return exactly the
 * bytes QEMU returns, `blockStatus` gives the facts `qemu-img map` prints.
 */
export class Qcow2Image implements DiskImage {
  readonly format = "qcow2";
  readOnly = true;
  private size: number;
  private hdr: Qcow2Header;
  /** Location of the bitmap directory, when the bitmaps extension is valid. */
  readonly bitmapDirectory: { readonly offset: number; readonly length: number } | undefined;
  /** Cluster size in bytes (2^clusterBits). */
  readonly clusterSize: number;
  /** log2 of the cluster size, from the header. */
  readonly clusterBits: number;
  /** Header extensions as found at open, unknown ones included (kept on header rewrites). */
  readonly extensions: readonly HeaderExtension[];
  /** The feature-name table extension's entries (empty when the image has none). */
  readonly featureNames: readonly FeatureName[];
  /** Internal snapshots as found at open, in table order. */
  readonly snapshots: readonly SnapshotEntry[];
  /** Persistent dirty bitmaps' directory entries as found at open (empty when not valid). */
  readonly bitmaps: readonly BitmapEntry[];
  /** The backing file name stored in the header, if any. */
  readonly backingFilename: string | undefined;
  /** The backing format from the backing-format extension, if any. */
  readonly backingFormat: string | undefined;
  /** The external data file's name from its extension, if the image has one. */
  readonly dataFileName: string | undefined;
  backing: DiskImage | undefined;

  private l1: U64TableView;
  private readonly l2Cache: ClusterCache;
  private readonly l2Entries: number;
  private readonly extendedL2: boolean;
  private readonly subclusterSize: number;
  private readonly layout: CompressedLayout;
  private readonly decompress: Decompressor;
  private readonly hasDataFile: boolean;
  /** data_file_raw: the external data file always equals the guest disk. */
  private readonly dataFileRaw: boolean;
  private dataBackend: BlockBackend;
  private fileSize: number;
  private closed = false;
  /** Write-side state; undefined for read-only opens. */
  private w: WriteState | undefined;
  /** The last decompressed cluster, so sequential small reads decompress once. */
  private lastCompressed: { host: number; data: Uint8Array } | undefined;
  /** Persistent dirty bitmaps kept up to date by this read-write open (bitmap.ts). */
  private pbm: PersistentBitmaps | undefined;

  private constructor(
    /** The file the image lives in. */
    readonly backend: BlockBackend,
    init: {
      header: Qcow2Header;
      fileSize: number;
      extensions: HeaderExtension[];
      featureNames: FeatureName[];
      l1: U64TableView;
      snapshots: SnapshotEntry[];
      bitmaps: BitmapEntry[];
      backingFilename: string | undefined;
      backingFormat: string | undefined;
      dataFileName: string | undefined;
      l2CacheBytes: number | undefined;
      bitmapDirectory: { offset: number; length: number } | undefined;
    },
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
    const incompat = IncompatibleFeatures.decode(h.incompatibleFeatures);
    this.extendedL2 = incompat.has("extendedL2");
    this.hasDataFile = incompat.has("externalDataFile");
    this.dataFileRaw =
      this.hasDataFile && AutoclearFeatures.decode(h.autoclearFeatures).has("rawExternalData");
    this.l2Entries = this.clusterSize / (this.extendedL2 ? 16 : 8);
    this.subclusterSize = this.extendedL2 ? this.clusterSize / SUBCLUSTERS : this.clusterSize;
    this.layout = compressedLayout(h.clusterBits);
    this.decompress = decompressorFor(h.compressionType);
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
      backend: guardedBackend(backend, (o, n) => this.checkMetaWrite(o, n, Meta.activeL2)),
      tableSize: this.clusterSize,
      capacity: tables,
      name: "L2",
    });
  }

  /** Open a qcow2 image. Validates the header, L1 table and snapshot table. */
  static async open(backend: BlockBackend, options: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
    const fileSize = await backend.size();
    // The header area is the first cluster: read 64 KiB, and more only for larger clusters.
    let first = new Uint8Array(Math.min(fileSize, 64 * 1024));
    await backend.read(0, first);
    const bits = first.byteLength >= 24 ? new DataView(first.buffer).getUint32(20, false) : 0;
    if (bits > 16 && bits <= 21 && fileSize > first.byteLength) {
      first = new Uint8Array(Math.min(fileSize, 2 ** bits));
      await backend.read(0, first);
    }
    const header = decodeHeader(first);
    if (header.clusterBits < 9 || header.clusterBits > 21) {
      validateHeader(header); // throws the cluster_bits error
    }
    const clusterSize = 2 ** header.clusterBits;
    const area = first.subarray(0, Math.min(first.byteLength, clusterSize));
    const extStart = header.version === 2 ? 72 : header.headerLength;
    const extEnd =
      header.backingFileOffset > extStart
        ? Math.min(header.backingFileOffset, clusterSize)
        : clusterSize;
    const extensions = decodeExtensions(area, extStart, extEnd);
    const featureNames: FeatureName[] = [];
    for (const e of extensions) {
      if (e.type === ExtensionType.featureNameTable)
        featureNames.push(...decodeFeatureNames(e.data));
    }
    validateHeader(header, {
      featureName: (type, bit) => featureNames.find((f) => f.type === type && f.bit === bit)?.name,
    });
    if (header.cryptMethod !== 0) {
      throw new UnsupportedFeatureError(
        `encryption is not supported (crypt_method ${header.cryptMethod === 1 ? "aes" : "luks"})`,
        ["encryption"],
        { offset: 32 },
      );
    }
    const incompat = IncompatibleFeatures.decode(header.incompatibleFeatures);
    const writable = options.readOnly === false;
    if (writable && incompat.has("corrupt")) {
      throw new CorruptImageError("image is corrupt; cannot be opened read/write", { offset: 72 });
    }
    if (writable && backend.readOnly) {
      throw new InvalidArgumentError(
        `cannot open ${backend.name} read/write: the file is read-only`,
      );
    }
    // Backing file name and format.
    let backingFilename: string | undefined;
    if (header.backingFileOffset !== 0 && header.backingFileSize !== 0) {
      if (header.backingFileOffset + header.backingFileSize > area.byteLength) {
        throw new FormatError(
          `qcow2 header: backing file name at ${hex(header.backingFileOffset)} (${header.backingFileSize} bytes) is past the end of the file`,
          { offset: 8 },
        );
      }
      backingFilename = decodeString(area, header.backingFileOffset, header.backingFileSize);
    }
    let backingFormat = options.backingFormat;
    let dataFileName: string | undefined;
    for (const e of extensions) {
      if (e.type === ExtensionType.backingFormat && backingFormat === undefined) {
        backingFormat = decodeStringExtension(e.data);
      } else if (e.type === ExtensionType.externalDataFile) {
        dataFileName = decodeStringExtension(e.data);
      }
    }
    if (incompat.has("externalDataFile") && dataFileName === undefined && !options.noBacking) {
      throw new FormatError("qcow2 image uses an external data file but does not name it");
    }
    if (
      AutoclearFeatures.decode(header.autoclearFeatures).has("rawExternalData") &&
      backingFilename !== undefined
    ) {
      throw new FormatError("qcow2 image has both a raw external data file and a backing file");
    }
    // Active L1 table.
    const l1Bytes = header.l1Size * 8;
    if (header.l1Size > 0 && header.l1TableOffset + l1Bytes > fileSize) {
      throw new CorruptImageError(
        `L1 table at ${hex(header.l1TableOffset)} (${l1Bytes} bytes) extends past the end of the file (${fileSize} bytes)`,
        { offset: header.l1TableOffset },
      );
    }
    if (header.l1Size > 0 && header.l1TableOffset === 0) {
      throw new CorruptImageError("L1 table offset is 0 (it would overlap the header)", {
        offset: 40,
      });
    }
    const l1 = new U64TableView(new Uint8Array(l1Bytes), "big");
    if (l1Bytes > 0) await backend.read(header.l1TableOffset, l1.bytes);
    // Snapshot table.
    let snapshots: SnapshotEntry[] = [];
    if (header.nbSnapshots > 0) {
      const avail = Math.max(0, fileSize - header.snapshotsOffset);
      const bytes = new Uint8Array(
        Math.min(avail, MAX_SNAPSHOT_TABLE_BYTES, header.nbSnapshots * (40 + 1024 + 2 * 65535 + 8)),
      );
      if (bytes.byteLength === 0) {
        throw new CorruptImageError(
          `snapshot table at ${hex(header.snapshotsOffset)} is past the end of the file`,
          {
            offset: 64,
          },
        );
      }
      await backend.read(header.snapshotsOffset, bytes);
      snapshots = decodeSnapshotTable(
        bytes,
        header.nbSnapshots,
        header.snapshotsOffset,
        header.version,
      );
    }
    // Persistent bitmaps (only meaningful while the autoclear bit says the extension is valid).
    let bitmaps: BitmapEntry[] = [];
    let bitmapDirectory: { offset: number; length: number } | undefined;
    const autoclear = AutoclearFeatures.decode(header.autoclearFeatures);
    const bmExt = extensions.find((e) => e.type === ExtensionType.bitmaps);
    if (bmExt && autoclear.has("bitmaps")) {
      if (bmExt.data.byteLength < 24) {
        throw new FormatError(
          `qcow2 bitmaps extension is ${bmExt.data.byteLength} bytes, needs 24`,
          { offset: bmExt.offset },
        );
      }
      const ext = BitmapsExtension.decode(bmExt.data, 0, bmExt.offset + 8);
      if (
        ext.nbBitmaps > 65535 ||
        ext.directorySize > 64 * 1024 * 1024 ||
        ext.directoryOffset + ext.directorySize > fileSize
      ) {
        throw new CorruptImageError(
          `bitmap directory at ${hex(ext.directoryOffset)} (${ext.directorySize} bytes, ${ext.nbBitmaps} bitmaps) is invalid for a ${fileSize}-byte file`,
          { offset: bmExt.offset },
        );
      }
      const dir = new Uint8Array(ext.directorySize);
      await backend.read(ext.directoryOffset, dir);
      bitmaps = decodeBitmapDirectory(dir, ext.nbBitmaps, ext.directoryOffset);
      bitmapDirectory = { offset: ext.directoryOffset, length: ext.directorySize };
    }
    const image = new Qcow2Image(backend, {
      header,
      fileSize,
      extensions,
      featureNames,
      l1,
      snapshots,
      bitmaps,
      backingFilename,
      backingFormat,
      dataFileName,
      l2CacheBytes: options.l2CacheBytes,
      bitmapDirectory,
    });
    if (!options.noBacking) {
      try {
        if (dataFileName !== undefined) {
          if (!options.openDataFile) {
            throw new InvalidArgumentError(
              `image uses the external data file '${dataFileName}' but no data file opener was given`,
            );
          }
          image.dataBackend = await options.openDataFile(dataFileName, backend.name);
        }
        if (backingFilename !== undefined) {
          if (!options.openBacking) {
            throw new InvalidArgumentError(
              `image has the backing file '${backingFilename}' but no backing opener was given`,
            );
          }
          const depth = (options.depth ?? 0) + 1;
          image.backing = await options.openBacking({
            filename: backingFilename,
            format: backingFormat,
            relativeTo: backend.name,
            readOnly: true,
            depth,
            chain: [...(options.chain ?? []), backend.name],
          });
        }
      } catch (e) {
        await image.closeSide();
        throw e;
      }
    }
    if (writable) {
      try {
        await image.initWrite(options);
      } catch (e) {
        await image.closeSide();
        throw e;
      }
    }
    return image;
  }

  /** Guest-visible size in bytes (whole 512-byte sectors). */
  get virtualSize(): number {
    return this.size;
  }

  /** The current header (it changes on read-write opens: dirty bit, moved tables). */
  get header(): Qcow2Header {
    return this.hdr;
  }

  /** The facts `qemu-img info` shows. */
  info(): Qcow2Info {
    const h = this.hdr;
    const incompat = IncompatibleFeatures.decode(h.incompatibleFeatures);
    const compat = CompatibleFeatures.decode(h.compatibleFeatures);
    const autoclear = AutoclearFeatures.decode(h.autoclearFeatures);
    const name = (kind: "incompatible" | "compatible" | "autoclear", mask: bigint): string[] => {
      const out: string[] = [];
      for (let bit = 0; bit < 64; bit++) {
        if (((mask >> BigInt(bit)) & 1n) === 0n) continue;
        const known = (FEATURE_NAMES[kind] as readonly string[])[bit];
        out.push(
          this.featureNames.find((f) => f.type === kind && f.bit === bit)?.name ??
            known ??
            `${kind} bit ${bit}`,
        );
      }
      return out;
    };
    return {
      virtualSize: h.size,
      clusterSize: this.clusterSize,
      compat: h.version === 2 ? "0.10" : "1.1",
      version: h.version,
      dirty: incompat.has("dirty"),
      corrupt: incompat.has("corrupt"),
      lazyRefcounts: compat.has("lazyRefcounts"),
      refcountBits: 2 ** h.refcountOrder,
      extendedL2: this.extendedL2,
      compressionType: h.compressionType === 1 ? "zstd" : "zlib",
      encrypted: h.cryptMethod !== 0,
      backingFilename: this.backingFilename,
      backingFormat: this.backingFormat,
      dataFile: this.dataFileName,
      dataFileRaw: autoclear.has("rawExternalData"),
      snapshots: this.snapshots.map((s) => ({
        id: s.id,
        name: s.name,
        vmStateSize: s.vmStateSize,
        dateSec: s.dateSec,
        dateNsec: s.dateNsec,
        vmClockNsec: s.vmClockNsec,
        diskSize: s.diskSize,
        icount:
          s.icount === undefined || s.icount === 0xffff_ffff_ffff_ffffn
            ? undefined
            : BigInt.asIntN(64, s.icount),
        l1TableOffset: s.l1TableOffset,
        l1Size: s.l1Size,
      })),
      bitmaps: this.bitmaps.map((b) => ({
        name: b.name,
        granularity: 2 ** b.granularityBits,
        flags: [
          ...((b.flags & BitmapFlag.inUse) !== 0 ? ["in-use"] : []),
          ...((b.flags & BitmapFlag.auto) !== 0 ? ["auto"] : []),
        ],
      })),
      features: {
        incompatible: name("incompatible", h.incompatibleFeatures),
        compatible: name("compatible", h.compatibleFeatures),
        autoclear: name("autoclear", h.autoclearFeatures),
      },
    };
  }

  /** Read guest bytes. Ranges past `virtualSize` are refused. */
  async read(offset: number, buf: Uint8Array): Promise<void> {
    this.checkOpen();
    checkRequest(offset, buf.length, this.virtualSize);
    await this.readInternal(offset, buf);
  }

  private async readInternal(offset: number, buf: Uint8Array): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const e = await this.resolve(pos, buf.length - done);
      const n = e.length;
      const dst = buf.subarray(done, done + n);
      switch (e.kind) {
        case Kind.Zero:
          dst.fill(0);
          break;
        case Kind.Normal:
          // Data past the end of the file (even past 2^53) reads as zeros, as QEMU reads it.
          if (e.host > Number.MAX_SAFE_INTEGER - n) dst.fill(0);
          else await this.dataBackend.read(e.host, dst, { zeroPastEof: true });
          break;
        case Kind.Compressed: {
          const cluster = await this.readCompressed(e.host, e.compressedLength);
          const inCluster = pos % this.clusterSize;
          dst.set(cluster.subarray(inCluster, inCluster + n));
          break;
        }
        case Kind.Unallocated:
          await this.readBacking(pos, dst);
          break;
      }
      done += n;
    }
  }

  /** The status of the extent at `offset` (at most `length` bytes), looking through backing files. */
  async blockStatus(offset: number, length: number): Promise<BlockStatus> {
    this.checkOpen();
    checkRequest(offset, length, this.virtualSize);
    if (length === 0) throw new InvalidArgumentError("block status of an empty range");
    const e = await this.resolve(offset, length);
    const file = this.hasDataFile ? this.dataFileName : this.backend.name;
    switch (e.kind) {
      case Kind.Normal:
        return {
          offset,
          length: e.length,
          present: true,
          zero: false,
          data: true,
          depth: 0,
          hostOffset: e.host,
          file,
        };
      case Kind.Compressed:
        return {
          offset,
          length: e.length,
          present: true,
          zero: false,
          data: true,
          depth: 0,
          compressed: true,
          file,
        };
      case Kind.Zero:
        return {
          offset,
          length: e.length,
          present: true,
          zero: true,
          data: false,
          depth: 0,
          hostOffset: e.host >= 0 ? e.host : undefined,
          file: e.host >= 0 ? file : undefined,
        };
      case Kind.Unallocated: {
        const n = e.length;
        const b = this.backing;
        if (b && offset < b.virtualSize) {
          const s = await b.blockStatus(offset, Math.min(n, b.virtualSize - offset));
          return { ...s, depth: s.depth + 1 };
        }
        return {
          offset,
          length: n,
          present: false,
          zero: true,
          data: false,
          depth: 0,
          hostOffset: e.host >= 0 ? e.host : undefined,
          file: e.host >= 0 ? file : undefined,
        };
      }
    }
  }

  /**
   * Close the image. A read-write image is closed cleanly: every cache is flushed, pending
   * refcount decrements are applied, and the dirty bit is cleared.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (this.w && !this.w.corrupted)
        await this.closeClean().catch((e: unknown) => {
          throw this.corruptCause(e);
        });
    } finally {
      this.closed = true;
      await this.closeSide();
      await this.backend.close();
    }
  }

  private async closeSide(): Promise<void> {
    const b = this.backing;
    this.backing = undefined;
    if (b) await b.close();
    if (this.dataBackend !== this.backend) await this.dataBackend.close();
  }

  private checkOpen(): void {
    if (this.closed) throw new InvalidArgumentError(`qcow2 image ${this.backend.name} is closed`);
  }

  private async readBacking(pos: number, dst: Uint8Array): Promise<void> {
    const b = this.backing;
    if (!b || pos >= b.virtualSize) {
      dst.fill(0);
      return;
    }
    const inBacking = Math.min(dst.length, b.virtualSize - pos);
    await b.read(pos, dst.subarray(0, inBacking));
    if (inBacking < dst.length) dst.fill(0, inBacking);
  }

  private async readCompressed(host: number, length: number): Promise<Uint8Array> {
    const last = this.lastCompressed;
    if (last && last.host === host) return last.data;
    const avail = Math.max(0, this.fileSize - host);
    if (host >= this.fileSize) {
      throw new CorruptImageError(
        `compressed cluster at ${hex(host)} is past the end of the file (${this.fileSize} bytes)`,
        {
          offset: host,
        },
      );
    }
    const src = new Uint8Array(Math.min(length, avail));
    await this.backend.read(host, src);
    const out = new Uint8Array(this.clusterSize);
    try {
      await this.decompress(src, out);
    } catch (cause) {
      throw new CorruptImageError(
        `compressed cluster at ${hex(host)} (${length} bytes) cannot be decompressed: ${(cause as Error).message}`,
        { offset: host, cause },
      );
    }
    this.lastCompressed = { host, data: out };
    return out;
  }

  /**
   * Resolve the run of guest bytes starting at `pos` (at most `max` bytes) that share one kind,
   * walking contiguous entries of one L2 table.
   */
  private async resolve(pos: number, max: number): Promise<Extent> {
    // A fresh result per call (per extent, not per entry): concurrent requests interleave at
    // every await, so a shared scratch object would be overwritten under another request.
    const cs = this.clusterSize;
    const guestCluster = Math.floor(pos / cs);
    const l1Index = Math.floor(guestCluster / this.l2Entries);
    let l2Index = guestCluster % this.l2Entries;
    // Bytes until the end of the range this L2 table maps (or the request).
    const tableEnd = (l1Index + 1) * this.l2Entries * cs;
    const limit = Math.min(max, tableEnd - pos, this.virtualSize - pos);
    if (l1Index >= this.l1.length) {
      return { kind: Kind.Unallocated, length: limit, host: -1, compressedLength: 0 };
    }
    const l2Offset = this.l1.getMasked(l1Index, L1_OFFSET_MASK);
    if (l2Offset === 0)
      return { kind: Kind.Unallocated, length: limit, host: -1, compressedLength: 0 };
    if (l2Offset % cs !== 0) {
      throw new CorruptImageError(
        `L2 table offset ${hex(l2Offset)} in L1 entry ${l1Index} is not aligned to the cluster size ${cs}`,
        { offset: this.hdr.l1TableOffset + l1Index * 8 },
      );
    }
    if (l2Offset + cs > this.fileSize) {
      throw new CorruptImageError(
        `L2 table at ${hex(l2Offset)} (L1 entry ${l1Index}) is past the end of the file (${this.fileSize} bytes)`,
        { offset: this.hdr.l1TableOffset + l1Index * 8 },
      );
    }
    let table = this.l2Cache.peek(l2Offset);
    if (!table) {
      const pinned = await this.l2Cache.get(l2Offset);
      this.l2Cache.release(pinned);
      table = pinned;
    }
    const l2 = new U64TableView(table.bytes, "big");
    const stride = this.extendedL2 ? 2 : 1;
    let inCluster = pos % cs;
    let kind = -1 as Kind | -1;
    let host = -1;
    let length = 0;
    let compressedLength = 0;
    // Walk (sub)clusters while the kind stays the same and host offsets stay contiguous.
    while (length < limit && l2Index < this.l2Entries) {
      const i = l2Index * stride;
      const hi = l2.hi(i);
      const lo = l2.lo(i);
      let k: Kind;
      let h = -1;
      let runBytes: number;
      if ((hi & OFLAG_COMPRESSED.hi) !== 0) {
        if (this.hasDataFile) {
          throw new CorruptImageError(
            `compressed cluster in L2 entry ${l2Index} of an image with an external data file`,
            {
              offset: l2Offset + i * 8,
            },
          );
        }
        const d = decodeCompressed(hi, lo, this.layout);
        if (d.hostOffset === 0) {
          throw new CorruptImageError(
            `compressed cluster descriptor in L2 entry ${l2Index} of table ${hex(l2Offset)} has offset 0`,
            {
              offset: l2Offset + i * 8,
            },
          );
        }
        k = Kind.Compressed;
        h = d.hostOffset;
        // Compressed clusters never merge: each decompresses on its own.
        if (length > 0) break;
        compressedLength = d.length;
        runBytes = cs - inCluster;
      } else {
        const off = ((hi & L2_OFFSET_MASK.hi) >>> 0) * TWO_32 + ((lo & L2_OFFSET_MASK.lo) >>> 0);
        const copied = (hi & OFLAG_COPIED.hi) !== 0;
        if (off !== 0 && off % cs !== 0) {
          throw new CorruptImageError(
            `cluster offset ${hex(off)} in L2 entry ${l2Index} of table ${hex(l2Offset)} is not aligned to the cluster size ${cs}`,
            { offset: l2Offset + i * 8 },
          );
        }
        if (this.extendedL2) {
          const bitmapHi = l2.hi(i + 1);
          const bitmapLo = l2.lo(i + 1);
          const sc = Math.floor(inCluster / this.subclusterSize);
          const alloc = (bitmapLo >>> sc) & 1;
          const zero = (bitmapHi >>> sc) & 1;
          if (alloc && zero) {
            throw new CorruptImageError(
              `subcluster ${sc} of L2 entry ${l2Index} in table ${hex(l2Offset)} is marked both allocated and zero`,
              { offset: l2Offset + i * 8 },
            );
          }
          const hasHost = off !== 0 || (this.hasDataFile && copied);
          if (alloc && !hasHost) {
            throw new CorruptImageError(
              `subcluster ${sc} of L2 entry ${l2Index} in table ${hex(l2Offset)} is allocated but the cluster has no host offset`,
              { offset: l2Offset + i * 8 },
            );
          }
          k = alloc ? Kind.Normal : zero ? Kind.Zero : Kind.Unallocated;
          h = hasHost ? off + inCluster : -1;
          // Extend across following subclusters with the same bits.
          let end = sc + 1;
          while (
            end < SUBCLUSTERS &&
            ((bitmapLo >>> end) & 1) === alloc &&
            ((bitmapHi >>> end) & 1) === zero
          ) {
            end++;
          }
          runBytes = end * this.subclusterSize - inCluster;
        } else {
          const zeroFlag = (lo & OFLAG_ZERO.lo) !== 0;
          if (zeroFlag && this.hdr.version === 2) {
            throw new CorruptImageError(
              `zero cluster entry in L2 entry ${l2Index} of table ${hex(l2Offset)} in a version 2 image`,
              { offset: l2Offset + i * 8 },
            );
          }
          const hasHost = off !== 0 || (this.hasDataFile && copied);
          if (zeroFlag) k = Kind.Zero;
          else if (hasHost) k = Kind.Normal;
          else k = Kind.Unallocated;
          h = hasHost ? off + inCluster : -1;
          runBytes = cs - inCluster;
        }
      }
      if (kind === -1) {
        kind = k;
        host = h;
      } else {
        // Same kind and (where there is a host offset) contiguous on the host.
        if (k !== kind) break;
        const expected = host >= 0 ? host + length : -1;
        if (h >= 0 !== host >= 0 || (h >= 0 && h !== expected)) break;
      }
      length += runBytes;
      if (k === Kind.Compressed) break;
      inCluster = (inCluster + runBytes) % cs;
      if (inCluster === 0) l2Index++;
    }
    return {
      kind: kind === -1 ? Kind.Unallocated : kind,
      length: Math.min(length, limit),
      host,
      compressedLength,
    };
  }

  // ------------------------------------------------------------------ write path

  /** Set up the write side: refcounts, caches, repair of a dirty image, autoclear bits. */
  private async initWrite(options: Qcow2OpenOptions): Promise<void> {
    const cs = this.clusterSize;
    const compat = CompatibleFeatures.decode(this.hdr.compatibleFeatures);
    const lazy = options.lazyRefcounts ?? compat.has("lazyRefcounts");
    if (lazy && this.hdr.version === 2) {
      throw new InvalidArgumentError(
        "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
      );
    }
    // Persistent bitmaps are checked before anything is written: a refused open changes nothing.
    await this.loadBitmaps();
    this.readOnly = false;
    // Autoclear features we do not maintain (unknown ones) are cleared before anything is
    // written; persistent bitmaps are maintained (bitmap.ts), so their bit stays.
    const keep = AutoclearFeatures.maskOf("rawExternalData") | AutoclearFeatures.maskOf("bitmaps");
    if ((this.hdr.autoclearFeatures & ~keep) !== 0n) {
      await this.rewriteHeader({ autoclearFeatures: this.hdr.autoclearFeatures & keep });
    }
    // A dirty image (lazy refcounts, not closed cleanly) has stale refcounts: rebuild them
    // from the references, as QEMU does when it opens such an image read-write.
    if (IncompatibleFeatures.decode(this.hdr.incompatibleFeatures).has("dirty")) {
      await this.rebuildRefcountStructures();
      await this.rewriteHeader({
        incompatibleFeatures: this.hdr.incompatibleFeatures & ~IncompatibleFeatures.maskOf("dirty"),
      });
    }
    const refcountCache = new ClusterCache({
      backend: guardedBackend(this.backend, (o, n) =>
        this.checkMetaWrite(o, n, Meta.refcountBlock),
      ),
      tableSize: cs,
      capacity: Math.max(
        4,
        Math.floor((options.refcountCacheBytes ?? Math.max(256 * 1024, 4 * cs)) / cs),
      ),
      name: "refcount",
      // Lazy refcounts stay cached even under writethrough (see flushLocked).
      writethrough: (options.writethrough ?? false) && !lazy,
    });
    const refcounts = await Refcounts.open({
      // Table entries are written in place; a grown table and its blocks go to free clusters.
      backend: guardedBackend(this.backend, (o, n) =>
        this.checkMetaWrite(o, n, Meta.refcountTable),
      ),
      cache: refcountCache,
      clusterBits: this.clusterBits,
      refcountOrder: this.hdr.refcountOrder,
      tableOffset: this.hdr.refcountTableOffset,
      tableClusters: this.hdr.refcountTableClusters,
      onTableMoved: async (tableOffset, tableClusters) => {
        await this.rewriteHeader({
          refcountTableOffset: tableOffset,
          refcountTableClusters: tableClusters,
        });
        if (this.w) this.buildMetadataMap();
      },
    });
    // Refcount blocks reach the disk before the L2 entries that use them (unless lazy).
    if (!lazy) this.l2Cache.dependOn(refcountCache);
    this.l2Cache.writethrough = options.writethrough ?? false;
    this.w = {
      refcounts,
      refcountCache,
      lazy,
      compress: options.compress ?? defaultCompress,
      meta: new Mutex(),
      claims: new RangeClaims(),
      metadata: new MetadataMap(cs),
      inactiveL2: await this.snapshotL2Tables(),
      retiredL2: [],
      l1DirtyLo: Number.MAX_SAFE_INTEGER,
      l1DirtyHi: 0,
      pendingFrees: [],
      dirtyOnDisk: false,
      corrupted: false,
      writethrough: options.writethrough ?? false,
      compressedCluster: -1,
      compressedNext: 0,
    };
    this.buildMetadataMap();
    // Bitmaps are marked in use on disk before any guest write.
    await this.pbm?.markInUse();
  }

  /** Load and check the persistent bitmaps (nothing is written yet). */
  private async loadBitmaps(): Promise<void> {
    const cs = this.clusterSize;
    const bit = AutoclearFeatures.maskOf("bitmaps");
    if (!this.bitmapDirectory || this.bitmaps.length === 0) return;
    if ((this.hdr.autoclearFeatures & bit) === 0n) return;
    this.pbm = await PersistentBitmaps.load(
      {
        backend: this.backend,
        clusterSize: cs,
        allocate: async (n) => {
          const h = await this.w!.refcounts.allocate(n);
          this.refreshRefcountBlocks(h + n * cs);
          this.fileSize = Math.max(this.fileSize, h + n * cs);
          return h;
        },
        free: (offset, n) => this.w!.refcounts.free(offset, n),
        sync: async () => {
          await this.w!.refcountCache.flush();
          await this.backend.flush();
        },
        setAutoclear: (on) =>
          this.rewriteHeader({
            autoclearFeatures: on
              ? this.hdr.autoclearFeatures | bit
              : this.hdr.autoclearFeatures & ~bit,
          }),
        checkDirectoryWrite: (offset, length) =>
          this.checkOverlap(offset, length, Meta.bitmapDirectory),
      },
      this.bitmapDirectory,
      this.bitmaps,
      this.size,
    );
  }

  /** Rewrite the whole header area (header, extensions, backing name) in one write, then sync. */
  private async rewriteHeader(changes: Partial<Qcow2Header>): Promise<void> {
    const next: Qcow2Header = { ...this.hdr, ...changes };
    const area = encodeHeaderArea(
      next,
      this.extensions.map((e) => ({ type: e.type, data: e.data })),
      this.backingFilename,
    );
    if (this.w) await this.checkOverlap(0, area.bytes.byteLength, Meta.header);
    await this.backend.write(0, area.bytes);
    await this.backend.flush();
    this.hdr = area.header;
  }

  /** Count every reference and write fresh refcount structures (the repair of a dirty image). */
  private async rebuildRefcountStructures(): Promise<void> {
    const cs = this.clusterSize;
    // Every reference as a run of host clusters; adjacent runs merge, so a sequentially written
    // image needs only a few. The refcount package counts them (and refuses overflows).
    const runs: [number, number][] = [];
    // A reference that ends a cluster or more past the end of the file is corruption, not
    // space to count (QEMU's check reports it and leaves it out): memory stays bounded by the
    // file's real size. Such a data cluster (typically a crash lost its data write but kept the
    // L2 entry) reads as zeros; its entry is rewritten to say so (a zero cluster on version 3,
    // unallocated on version 2 without a backing file), so that neither the new refcount
    // structures nor later allocations land under it and change what it reads, and a later
    // write allocates instead of writing far past the end. (QEMU's repair only clears COPIED,
    // which leaves the stale reference in place.)
    const fileSize = await this.backend.size();
    const pastEnd: number[] = [];
    await walkReferences(
      {
        backend: this.backend,
        header: this.hdr,
        snapshots: this.snapshots,
        bitmaps: this.bitmaps,
        bitmapDirectory: this.bitmapDirectory,
      },
      {
        reference: (r) => {
          if (r.kind === "refcount-table" || r.kind === "refcount-block") return;
          if (r.offset + Math.max(1, r.length) - fileSize >= cs) {
            if (r.kind === "data" && r.entryOffset !== undefined) pastEnd.push(r.entryOffset);
            return;
          }
          const first = Math.floor(r.offset / cs);
          const count = Math.floor((r.offset + Math.max(1, r.length) - 1) / cs) - first + 1;
          const last = runs[runs.length - 1];
          if (last !== undefined && last[0] + last[1] * cs === first * cs) last[1] += count;
          else runs.push([first * cs, count]);
        },
      },
    );
    await rebuildRefcounts({
      backend: this.backend,
      clusterBits: this.clusterBits,
      refcountOrder: this.hdr.refcountOrder,
      references: runs,
      onTableMoved: async (tableOffset, tableClusters) => {
        await this.rewriteHeader({
          refcountTableOffset: tableOffset,
          refcountTableClusters: tableClusters,
        });
      },
    });
    if (pastEnd.length > 0) {
      const hasBacking = this.backingFilename !== undefined;
      const entry = new Uint8Array(this.extendedL2 ? 16 : 8);
      const view = new DataView(entry.buffer);
      for (const at of pastEnd) {
        await this.backend.read(at, entry);
        if (this.extendedL2) {
          // No host cluster, every subcluster reads as zeros.
          view.setBigUint64(0, 0n, false);
          view.setBigUint64(8, 0xffff_ffff_0000_0000n, false);
        } else if (this.hdr.version === 3) {
          view.setBigUint64(0, BigInt(OFLAG_ZERO.lo), false);
        } else if (!hasBacking) {
          view.setBigUint64(0, 0n, false);
        } else {
          // Version 2 over a backing file has no way to say "zeros": keep the entry, not COPIED.
          view.setUint32(0, view.getUint32(0, false) & ~OFLAG_COPIED.hi, false);
        }
        await this.backend.write(at, entry);
      }
      await this.backend.flush();
    }
    this.fileSize = await this.backend.size();
  }

  /**
   * Offsets of the L2 tables the snapshots' L1 tables point at, each once. Each distinct L1
   * table is read once, and at most 256 MiB of them in all (a hostile snapshot table could name
   * the same large table a million times); past that budget snapshots' L2 tables go unchecked,
   * as QEMU never checks them by default.
   */
  private async snapshotL2Tables(): Promise<number[]> {
    const cs = this.clusterSize;
    const out = new Set<number>();
    const seen = new Set<string>();
    let budget = 256 * 1024 * 1024;
    for (const snap of this.snapshots) {
      const bytes = snap.l1Size * 8;
      const key = `${snap.l1TableOffset}:${bytes}`;
      if (bytes === 0 || seen.has(key) || bytes > budget) continue;
      if (snap.l1TableOffset % cs !== 0 || snap.l1TableOffset + bytes > this.fileSize) continue;
      seen.add(key);
      budget -= bytes;
      const l1 = new U64TableView(new Uint8Array(bytes), "big");
      await this.backend.read(snap.l1TableOffset, l1.bytes);
      for (let i = 0; i < l1.length; i++) {
        const off = l1.getMasked(i, L1_OFFSET_MASK);
        if (off !== 0 && off % cs === 0 && off < this.fileSize) out.add(off);
      }
    }
    return [...out];
  }

  /** Host clusters holding metadata, for the overlap checks before writes. */
  private buildMetadataMap(): void {
    const w = this.w;
    if (!w) return;
    const cs = this.clusterSize;
    const m = w.metadata;
    m.clear();
    // Sizes come from the file: nothing past its end is recorded (a u32 entry count of a
    // corrupt table must not make this loop over billions of clusters).
    const limit = this.fileSize + cs;
    const add = (offset: number, bytes: number, kind: number): void => {
      if (offset < limit) m.add(offset, Math.min(bytes, limit - offset), kind);
    };
    add(0, cs, Meta.header);
    if (this.hdr.l1Size > 0) add(this.hdr.l1TableOffset, this.hdr.l1Size * 8, Meta.activeL1);
    add(this.hdr.refcountTableOffset, this.hdr.refcountTableClusters * cs, Meta.refcountTable);
    for (let i = 0; i < w.refcounts.tableEntries; i++) {
      const b = w.refcounts.blockOffset(i);
      if (b !== 0) add(b, cs, Meta.refcountBlock);
    }
    if (this.hdr.nbSnapshots > 0) {
      const last = this.snapshots[this.snapshots.length - 1];
      if (last) {
        const enc = new TextEncoder();
        const lastBytes =
          40 +
          last.extraData.byteLength +
          enc.encode(last.id).byteLength +
          enc.encode(last.name).byteLength;
        add(
          this.hdr.snapshotsOffset,
          last.offset + lastBytes - this.hdr.snapshotsOffset,
          Meta.snapshotTable,
        );
      }
      for (const snap of this.snapshots)
        if (snap.l1Size > 0) add(snap.l1TableOffset, snap.l1Size * 8, Meta.inactiveL1);
    }
    for (const off of w.inactiveL2) add(off, cs, Meta.inactiveL2);
    for (const off of w.retiredL2) add(off, cs, Meta.activeL2); // still active on disk
    for (let i = 0; i < this.l1.length; i++) {
      const off = this.l1.getMasked(i, L1_OFFSET_MASK);
      if (off !== 0 && off % cs === 0) add(off, cs, Meta.activeL2);
    }
    const dir = this.bitmapDirectory;
    if (dir && AutoclearFeatures.decode(this.hdr.autoclearFeatures).has("bitmaps")) {
      if (dir.length > 0) add(dir.offset, dir.length, Meta.bitmapDirectory);
      for (const b of this.bitmaps) {
        if (b.bitmapTableSize > 0 && b.bitmapTableOffset !== 0)
          add(b.bitmapTableOffset, b.bitmapTableSize * 8, Meta.bitmapTable);
      }
    }
  }

  /** Refresh the refcount blocks in the metadata map after allocations may have added some. */
  private refreshRefcountBlocks(upTo: number): void {
    const w = this.w!;
    const cs = this.clusterSize;
    const last = Math.min(
      w.refcounts.tableEntries,
      Math.ceil((upTo / cs + 1) / w.refcounts.entriesPerBlock) + 1,
    );
    for (let i = 0; i < last; i++) {
      const b = w.refcounts.blockOffset(i);
      if (b !== 0 && (w.metadata.at(b / cs) & Meta.refcountBlock) === 0)
        w.metadata.add(b, cs, Meta.refcountBlock);
    }
  }

  /**
   * Refuse (and mark the image corrupt) when [offset, +length) holds metadata other than the
   * kinds in `ignore` (the structure being written may overwrite itself, nothing else).
   */
  private async checkOverlap(offset: number, length: number, ignore = 0): Promise<void> {
    const hit = this.w!.metadata.find(offset, length, ignore);
    if (hit) await this.markCorrupt(metaName(hit.kinds), hit.cluster * this.clusterSize);
  }

  /** Overlap check for guest data written at host `offset` (nothing to check in a data file). */
  private async checkData(offset: number, length: number): Promise<void> {
    if (!this.hasDataFile) await this.checkOverlap(offset, length);
  }

  /** The check metadata caches run before writing a table of kind `own` (read-write only). */
  private async checkMetaWrite(offset: number, length: number, own: number): Promise<void> {
    const w = this.w;
    if (!w) return;
    if (w.corrupted) {
      throw new IoError(`${this.backend.name}: the image was marked corrupt and is read-only`, {
        code: ErrorCode.READ_ONLY,
      });
    }
    await this.checkOverlap(offset, length, own);
  }

  private async markCorrupt(what: string, offset: number): Promise<never> {
    const w = this.w!;
    w.corrupted = true;
    this.readOnly = true;
    if (this.hdr.version === 3) {
      // Only the incompatible-features field changes (no overlap check: the header is the
      // header, and the corrupt bit must get out whatever else is wrong).
      try {
        const incompatibleFeatures =
          this.hdr.incompatibleFeatures | IncompatibleFeatures.maskOf("corrupt");
        const field = new Uint8Array(8);
        new DataView(field.buffer).setBigUint64(0, incompatibleFeatures, false);
        await this.backend.write(72, field);
        await this.backend.flush();
        this.hdr = { ...this.hdr, incompatibleFeatures };
      } catch {
        // The image is already refusing writes; the error below is what matters.
      }
    }
    throw new CorruptImageError(
      `Preventing invalid write on metadata (overlaps with ${what}) at ${hex(offset)}; image marked as corrupt`,
      { offset },
    );
  }

  private checkWritable(): WriteState {
    this.checkOpen();
    const w = this.w;
    if (!w || this.readOnly) {
      throw new IoError(
        w?.corrupted
          ? `${this.backend.name}: the image was marked corrupt and is read-only`
          : `${this.backend.name} is opened read-only`,
        { code: ErrorCode.READ_ONLY },
      );
    }
    return w;
  }

  /**
   * Run `fn` holding guest clusters [first, last] (RangeClaims.run): overlapping requests take
   * effect in the order they were issued, and unrelated ones run in parallel.
   */
  private withClusters<T>(first: number, last: number, fn: () => Promise<T>): Promise<T> {
    return this.w!.claims.run(first, last, fn).catch((e: unknown) => {
      throw this.corruptCause(e);
    });
  }

  /**
   * A metadata write refused by the overlap check reaches us wrapped by the cache that tried
   * it ("writing L2 table ... failed"): once the image is marked corrupt, give callers the
   * CorruptImageError itself.
   */
  private corruptCause(e: unknown): unknown {
    if (!this.w?.corrupted) return e;
    for (let c: unknown = e; c instanceof Error; c = c.cause) {
      if (c instanceof CorruptImageError) return c;
    }
    return e;
  }

  /** With lazy refcounts the dirty bit must be on disk before any allocating write. */
  private async markDirtyOnDisk(): Promise<void> {
    const w = this.w!;
    if (!w.lazy || w.dirtyOnDisk || this.hdr.version === 2) return;
    await w.meta.run(async () => {
      if (w.dirtyOnDisk) return;
      await this.rewriteHeader({
        incompatibleFeatures: this.hdr.incompatibleFeatures | IncompatibleFeatures.maskOf("dirty"),
      });
      w.dirtyOnDisk = true;
    });
  }

  /** Read guest bytes for copy-on-write; bytes past the virtual size read as zeros. */
  private async readGuest(offset: number, buf: Uint8Array): Promise<void> {
    const n = Math.max(0, Math.min(buf.length, this.virtualSize - offset));
    if (n > 0) await this.readInternal(offset, buf.subarray(0, n));
    if (n < buf.length) buf.fill(0, n);
  }

  private setL1(index: number, l2Offset: number): void {
    const w = this.w!;
    this.l1.set(index, l2Offset);
    this.l1.setFlag(index, OFLAG_COPIED, true);
    w.l1DirtyLo = Math.min(w.l1DirtyLo, index);
    w.l1DirtyHi = Math.max(w.l1DirtyHi, index + 1);
  }

  /** Under the metadata lock: the L2 table for `l1Index`, allocated or copied when needed; pinned. */
  private async l2ForWrite(l1Index: number): Promise<CachedTable> {
    const w = this.w!;
    const cs = this.clusterSize;
    if (l1Index >= this.l1.length) {
      throw new CorruptImageError(
        `guest offset needs L1 entry ${l1Index}, but the L1 table has ${this.l1.length}`,
      );
    }
    const off = this.l1.getMasked(l1Index, L1_OFFSET_MASK);
    const copied = this.l1.test(l1Index, OFLAG_COPIED);
    if (off !== 0 && copied) {
      if (off % cs !== 0 || off + cs > this.fileSize) {
        throw new CorruptImageError(
          `L2 table offset ${hex(off)} in L1 entry ${l1Index} is not a cluster inside the file`,
          { offset: this.hdr.l1TableOffset + l1Index * 8 },
        );
      }
      await this.checkOverlap(off, cs, Meta.activeL2);
      return this.l2Cache.get(off);
    }
    if (off !== 0 && (off % cs !== 0 || off + cs > this.fileSize)) {
      throw new CorruptImageError(
        `L2 table offset ${hex(off)} in L1 entry ${l1Index} is not a cluster inside the file`,
        { offset: this.hdr.l1TableOffset + l1Index * 8 },
      );
    }
    // New table, or a copy of a table shared with a snapshot.
    const newOff = await w.refcounts.allocate(1);
    this.refreshRefcountBlocks(newOff);
    await this.checkOverlap(newOff, cs);
    // A new L2 table's refcount is on disk before the table is used, lazy refcounts or not
    // (QEMU's l2_allocate flushes the refcount cache here too); without lazy refcounts the
    // cache dependency already orders it.
    if (w.lazy) await w.refcountCache.flush();
    const table = await this.l2Cache.getEmpty(newOff);
    if (off !== 0) {
      const old = await this.l2Cache.get(off);
      table.bytes.set(old.bytes);
      this.l2Cache.release(old);
      w.pendingFrees.push([off, 1]);
    }
    this.fileSize = Math.max(this.fileSize, newOff + cs);
    await this.l2Cache.markDirty(table);
    w.metadata.add(newOff, cs, Meta.activeL2);
    // The old table stays protected as an active one until the L1 table on disk no longer
    // points at it (then a snapshot may still use it: an inactive L2 table).
    if (off !== 0) w.retiredL2.push(off);
    this.setL1(l1Index, newOff);
    return table;
  }

  /** Queue the reference held by L2 entry word `i` for freeing once the change is durable. */
  private queueFree(l2: U64TableView, i: number): void {
    const w = this.w!;
    const hi = l2.hi(i);
    const lo = l2.lo(i);
    if ((hi & OFLAG_COMPRESSED.hi) !== 0) {
      const d = decodeCompressed(hi, lo, this.layout);
      const cs = this.clusterSize;
      const first = Math.floor(d.hostOffset / cs);
      const last = Math.floor((d.hostOffset + d.length - 1) / cs);
      w.pendingFrees.push([first * cs, last - first + 1]);
      return;
    }
    if (this.hasDataFile) return; // data clusters are not refcounted
    const off = ((hi & L2_OFFSET_MASK.hi) >>> 0) * TWO_32 + ((lo & L2_OFFSET_MASK.lo) >>> 0);
    if (off !== 0) w.pendingFrees.push([off, 1]);
  }

  /** Write guest bytes. Allocates (copying on write) where the clusters are not writable in place. */
  async write(offset: number, data: Uint8Array): Promise<void> {
    this.checkWritable();
    checkRequest(offset, data.length, this.virtualSize);
    if (data.length === 0) return;
    this.pbm?.setDirty(offset, data.length);
    const cs = this.clusterSize;
    await this.withClusters(
      Math.floor(offset / cs),
      Math.floor((offset + data.length - 1) / cs),
      () => this.writeLocked(offset, data),
    );
    if (this.w?.writethrough) await this.flush();
  }

  /** Write while holding the cluster claim for the range. */
  private async writeLocked(offset: number, data: Uint8Array): Promise<void> {
    const cs = this.clusterSize;
    const span = this.l2Entries * cs;
    const end = offset + data.length;
    // Most requests stay inside one L2 table's range: no subarray for them.
    if (Math.floor(offset / span) === Math.floor((end - 1) / span)) {
      await this.writeChunk(offset, data);
      return;
    }
    let pos = offset;
    while (pos < end) {
      const chunkEnd = Math.min(end, (Math.floor(pos / span) + 1) * span);
      await this.writeChunk(pos, data.subarray(pos - offset, chunkEnd - offset));
      pos = chunkEnd;
    }
  }

  /** True when standard L2 entry word `i` can take a write in place. */
  private inPlace(l2: U64TableView, i: number): boolean {
    const hi = l2.hi(i);
    const lo = l2.lo(i);
    if ((hi & OFLAG_COMPRESSED.hi) !== 0 || (lo & OFLAG_ZERO.lo) !== 0) return false;
    if ((hi & OFLAG_COPIED.hi) === 0) return false;
    return this.hasDataFile || ((hi & L2_OFFSET_MASK.hi) | (lo & L2_OFFSET_MASK.lo)) !== 0;
  }

  private hostOf(l2: U64TableView, i: number): number {
    return l2.getMasked(i, L2_OFFSET_MASK);
  }

  /** Write [pos, pos + src.length), which lies inside one L2 table's range. */
  private async writeChunk(pos: number, src: Uint8Array): Promise<void> {
    const w = this.w!;
    const cs = this.clusterSize;
    const end = pos + src.length;
    const g0 = Math.floor(pos / cs);
    const g1 = Math.floor((end - 1) / cs);
    const l1Index = Math.floor(g0 / this.l2Entries);
    const base = l1Index * this.l2Entries;
    // Fast path: the L2 table is cached and every cluster is writable in place, so no metadata
    // changes and no lock are needed (the host offsets are taken before the first await).
    if (!this.extendedL2 && this.l1.test(l1Index, OFLAG_COPIED)) {
      const cached = this.l2Cache.peek(this.l1.getMasked(l1Index, L1_OFFSET_MASK));
      if (cached) {
        const l2 = new U64TableView(cached.bytes, "big");
        const h = this.hostOf(l2, g0 - base);
        let ok = this.inPlace(l2, g0 - base);
        for (let g = g0 + 1; ok && g <= g1; g++) {
          ok = this.inPlace(l2, g - base) && this.hostOf(l2, g - base) === h + (g - g0) * cs;
        }
        if (ok) {
          const hostStart = h + (pos - g0 * cs);
          if (!this.hasDataFile) {
            for (
              let c = Math.floor(hostStart / cs);
              c <= Math.floor((hostStart + src.length - 1) / cs);
              c++
            ) {
              if (w.metadata.has(c)) await this.checkOverlap(c * cs, cs);
            }
          }
          await this.dataBackend.write(hostStart, src);
          return;
        }
      }
    }
    if (w.lazy) await this.markDirtyOnDisk();
    const table = await w.meta.run(() => this.l2ForWrite(l1Index));
    try {
      const l2 = new U64TableView(table.bytes, "big");
      if (this.extendedL2) {
        for (let g = g0; g <= g1; g++) {
          const cStart = Math.max(pos, g * cs);
          const cEnd = Math.min(end, (g + 1) * cs);
          await this.writeClusterExtended(
            table,
            l2,
            g - base,
            g,
            cStart,
            src.subarray(cStart - pos, cEnd - pos),
          );
        }
        return;
      }
      let g = g0;
      while (g <= g1) {
        const i = g - base;
        if (this.inPlace(l2, i)) {
          const h = this.hostOf(l2, i);
          let gEnd = g + 1;
          while (
            gEnd <= g1 &&
            this.inPlace(l2, gEnd - base) &&
            this.hostOf(l2, gEnd - base) === h + (gEnd - g) * cs
          ) {
            gEnd++;
          }
          const runStart = Math.max(pos, g * cs);
          const runEnd = Math.min(end, gEnd * cs);
          const hostStart = h + (runStart - g * cs);
          await this.checkData(hostStart, runEnd - runStart);
          await this.dataBackend.write(hostStart, src.subarray(runStart - pos, runEnd - pos));
          g = gEnd;
        } else {
          let gEnd = g + 1;
          while (gEnd <= g1 && !this.inPlace(l2, gEnd - base)) gEnd++;
          await this.allocatingWrite(table, l2, base, g, gEnd, pos, src);
          g = gEnd;
        }
      }
    } finally {
      this.l2Cache.release(table);
    }
  }

  /**
   * Allocate fresh clusters for guest clusters [g0, g1), fill them with the new data plus the
   * old contents around it (copy on write), then point the L2 entries at them.
   */
  private async allocatingWrite(
    table: CachedTable,
    l2: U64TableView,
    base: number,
    g0: number,
    g1: number,
    pos: number,
    src: Uint8Array,
  ): Promise<void> {
    const w = this.w!;
    const cs = this.clusterSize;
    const n = g1 - g0;
    const end = pos + src.length;
    let host: number;
    if (this.hasDataFile) {
      host = g0 * cs; // clusters in an external data file sit at their guest offset
    } else {
      host = await w.meta.run(async () => {
        const h = await w.refcounts.allocate(n);
        this.refreshRefcountBlocks(h + n * cs);
        return h;
      });
      await this.checkOverlap(host, n * cs);
    }
    const runStart = g0 * cs;
    const runEnd = g1 * cs;
    const dataStart = Math.max(pos, runStart);
    const dataEnd = Math.min(end, runEnd);
    const body = src.subarray(dataStart - pos, dataEnd - pos);
    const headLen = dataStart - runStart;
    const tailLen = runEnd - dataEnd;
    if (headLen === 0 && tailLen === 0) {
      await this.dataBackend.write(host, body);
    } else if (n * cs <= 4 * 1024 * 1024) {
      const buf = new Uint8Array(n * cs);
      if (headLen > 0) await this.readGuest(runStart, buf.subarray(0, headLen));
      buf.set(body, headLen);
      if (tailLen > 0) await this.readGuest(dataEnd, buf.subarray(n * cs - tailLen));
      await this.dataBackend.write(host, buf);
    } else {
      if (headLen > 0) {
        const head = new Uint8Array(headLen);
        await this.readGuest(runStart, head);
        await this.dataBackend.write(host, head);
      }
      await this.dataBackend.write(host + headLen, body);
      if (tailLen > 0) {
        const tail = new Uint8Array(tailLen);
        await this.readGuest(dataEnd, tail);
        await this.dataBackend.write(host + n * cs - tailLen, tail);
      }
    }
    this.fileSize = Math.max(this.fileSize, this.hasDataFile ? this.fileSize : host + n * cs);
    await w.meta.run(async () => {
      for (let k = 0; k < n; k++) {
        const i = g0 + k - base;
        this.queueFree(l2, i);
        const h = host + k * cs;
        l2.setWords(i, (Math.floor(h / TWO_32) | OFLAG_COPIED.hi) >>> 0, h >>> 0);
      }
      await this.l2Cache.markDirty(table);
    });
  }

  /** Extended L2: write inside one cluster at subcluster granularity. */
  private async writeClusterExtended(
    table: CachedTable,
    l2: U64TableView,
    index: number,
    g: number,
    start: number,
    src: Uint8Array,
  ): Promise<void> {
    const w = this.w!;
    const cs = this.clusterSize;
    const scs = this.subclusterSize;
    const i = index * 2;
    const hi = l2.hi(i);
    const within = start - g * cs;
    const sc0 = Math.floor(within / scs);
    const sc1 = Math.floor((within + src.length - 1) / scs);
    const touched =
      (sc1 === 31 ? 0xffff_ffff : ((1 << (sc1 + 1)) >>> 0) - 1) & ~(((1 << sc0) >>> 0) - 1);
    const off = this.hostOf(l2, i);
    const reusable =
      (hi & OFLAG_COMPRESSED.hi) === 0 &&
      (hi & OFLAG_COPIED.hi) !== 0 &&
      (off !== 0 || this.hasDataFile);
    if (reusable) {
      const alloc = l2.lo(i + 1);
      if ((alloc & touched) >>> 0 === touched >>> 0) {
        await this.checkData(off + within, src.length);
        await this.dataBackend.write(off + within, src);
        return;
      }
      // Fill the touched subclusters: old contents around the new data, then mark them allocated.
      const regionStart = sc0 * scs;
      const buf = new Uint8Array((sc1 + 1) * scs - regionStart);
      await this.readGuest(g * cs + regionStart, buf);
      buf.set(src, within - regionStart);
      await this.checkData(off + regionStart, buf.length);
      await this.dataBackend.write(off + regionStart, buf);
      await w.meta.run(async () => {
        l2.setWords(i + 1, (l2.hi(i + 1) & ~touched) >>> 0, (l2.lo(i + 1) | touched) >>> 0);
        await this.l2Cache.markDirty(table);
      });
      return;
    }
    // A new cluster: copy the whole cluster's current contents and allocate every subcluster.
    let host: number;
    if (this.hasDataFile) {
      host = g * cs;
    } else {
      host = await w.meta.run(async () => {
        const h = await w.refcounts.allocate(1);
        this.refreshRefcountBlocks(h + cs);
        return h;
      });
      await this.checkOverlap(host, cs);
    }
    const buf = new Uint8Array(cs);
    await this.readGuest(g * cs, buf);
    buf.set(src, within);
    await this.dataBackend.write(host, buf);
    if (!this.hasDataFile) this.fileSize = Math.max(this.fileSize, host + cs);
    await w.meta.run(async () => {
      this.queueFree(l2, i);
      l2.setWords(i, (Math.floor(host / TWO_32) | OFLAG_COPIED.hi) >>> 0, host >>> 0);
      l2.setWords(i + 1, 0, 0xffff_ffff);
      await this.l2Cache.markDirty(table);
    });
  }

  /**
   * Make [offset, +length) read as zeros. Whole clusters (subclusters with extended L2) get
   * the zero flag on version 3 images (released when `mayUnmap`); partial ones are written
   * with zero bytes.
   */
  async writeZeroes(
    offset: number,
    length: number,
    options: { mayUnmap?: boolean } = {},
  ): Promise<void> {
    this.checkWritable();
    checkRequest(offset, length, this.virtualSize);
    if (length === 0) return;
    this.pbm?.setDirty(offset, length);
    const cs = this.clusterSize;
    await this.withClusters(
      Math.floor(offset / cs),
      Math.floor((offset + length - 1) / cs),
      async () => {
        // QEMU's request loop: a piece up to the first granule boundary, then the aligned
        // middle, then the tail. Each piece is zeroed through the metadata when the format
        // can express it; otherwise (a compressed cluster partly covered, a version 2 image
        // over a backing file, a partial granule holding data) the whole piece is written
        // as zero bytes, at most 16 MiB at a time before the metadata is tried again.
        const gran = this.hdr.version === 2 ? cs : this.subclusterSize;
        const unmap = options.mayUnmap ?? false;
        let head = offset % gran;
        const tail = (offset + length) % gran;
        let pos = offset;
        let bytes = length;
        let zeros: Uint8Array | undefined;
        while (bytes > 0) {
          let num = bytes;
          if (head) {
            num = Math.min(bytes, gran - head);
            head = (head + num) % gran;
          } else if (tail && num > gran) {
            num -= tail;
          }
          if (!(await this.zeroPiece(pos, num, gran, unmap))) {
            num = Math.min(num, ZERO_FALLBACK_MAX);
            if (!zeros || zeros.length < num) zeros = new Uint8Array(num);
            await this.writeLocked(pos, zeros.subarray(0, num));
          }
          pos += num;
          bytes -= num;
        }
      },
    );
    if (this.w?.writethrough) await this.flush();
  }

  /**
   * Zero [start, start + n) through the metadata, as QEMU's driver does; false when the
   * format cannot (the caller writes zero bytes). A piece that is not granule aligned is
   * widened to its granule when the rest of the granule reads as zeros and the granule
   * holds no data. Version 2 has no zero flag: without a backing file the clusters are
   * released (they read as zeros); over a backing file nothing can be done.
   */
  private async zeroPiece(
    start: number,
    n: number,
    gran: number,
    unmap: boolean,
  ): Promise<boolean> {
    let end = start + n;
    const h = start % gran;
    let t = end === this.virtualSize ? 0 : (gran - (end % gran)) % gran;
    if (h || t) {
      t = Math.min(t, this.virtualSize - end);
      if (!(await this.readsAsZeros(start - h, start)) || !(await this.readsAsZeros(end, end + t)))
        return false;
      start -= h;
      const e = await this.resolve(start, gran);
      if (e.kind !== Kind.Unallocated && e.kind !== Kind.Zero) return false;
      end = Math.min(start + gran, this.virtualSize);
    }
    if (this.hdr.version === 2 && this.hasBackingFile()) return false;
    return this.zeroAligned(start, end, "zero", unmap);
  }

  /**
   * True when guest bytes [pos, end) read as zeros and nothing is stored for them here: zero
   * (sub)clusters, or unallocated ones over no backing data (or backing data that reads as
   * zeros).
   */
  private async readsAsZeros(pos: number, end: number): Promise<boolean> {
    while (pos < end) {
      const e = await this.resolve(pos, end - pos);
      if (e.kind !== Kind.Zero) {
        if (e.kind !== Kind.Unallocated) return false;
        const b = this.backing;
        if (!b && this.backingFilename !== undefined) return false; // not opened: unknown
        if (b && pos < b.virtualSize) {
          const stop = Math.min(pos + e.length, b.virtualSize);
          for (let p = pos; p < stop;) {
            const st = await b.blockStatus(p, stop - p);
            if (!st.zero) return false;
            p += st.length;
          }
        }
      }
      pos += e.length;
    }
    return true;
  }

  /**
   * Discard [offset, +length): whole clusters only (as QEMU). The clusters are released; they
   * read as zeros afterwards (unallocated without a backing file on version 2). A version 2
   * image with a backing file has no way to make a released cluster read as zeros (no zero
   * flag), so there the discard does nothing, as QEMU's (which reports success).
   */
  async discard(offset: number, length: number): Promise<void> {
    this.checkWritable();
    checkRequest(offset, length, this.virtualSize);
    // QEMU dirties the whole requested range, even where nothing is released.
    this.pbm?.setDirty(offset, length);
    if (
      this.hdr.version === 2 &&
      (this.backing !== undefined || this.backingFilename !== undefined)
    )
      return;
    const cs = this.clusterSize;
    const end = offset + length;
    const alignedStart = Math.ceil(offset / cs) * cs;
    const alignedEnd = end === this.virtualSize ? end : Math.floor(end / cs) * cs;
    if (alignedStart >= alignedEnd) return;
    await this.withClusters(alignedStart / cs, Math.floor((alignedEnd - 1) / cs), () =>
      this.zeroAligned(alignedStart, alignedEnd, "discard", true),
    );
    if (this.w?.writethrough) await this.flush();
  }

  /**
   * Zero or discard [start, end) in the L2 entries (granule aligned, or ending at the end of
   * the disk). False when a zero write reaches part of a compressed cluster, which has no
   * subcluster bits: the entries before it are done, the rest is left (as QEMU's driver).
   */
  private async zeroAligned(
    start: number,
    end: number,
    mode: "zero" | "discard",
    mayUnmap: boolean,
  ): Promise<boolean> {
    const w = this.w!;
    const cs = this.clusterSize;
    {
      // A raw external data file equals the guest disk at all times: zero it first (as QEMU
      // does), for discards as well as zero writes.
      if (this.dataFileRaw) await this.zeroDataFile(start, end);
      if (w.lazy) await this.markDirtyOnDisk();
      const span = this.l2Entries * cs;
      let pos = start;
      while (pos < end) {
        const chunkEnd = Math.min(end, (Math.floor(pos / span) + 1) * span);
        const l1Index = Math.floor(pos / span);
        const base = l1Index * this.l2Entries;
        // Nothing to do for a discard where no L2 table exists and nothing shows through.
        if (
          this.l1.getMasked(l1Index, L1_OFFSET_MASK) === 0 &&
          (mode === "discard" || this.hdr.version === 2) &&
          !this.backing
        ) {
          pos = chunkEnd;
          continue;
        }
        // Guest ranges the L2 entries cannot express as zeros: zero bytes are written there
        // (QEMU's fallback when its zeroing reports "not supported").
        const fallback: [number, number][] = [];
        let supported = true;
        await w.meta.run(async () => {
          const table = await this.l2ForWrite(l1Index);
          try {
            const l2 = new U64TableView(table.bytes, "big");
            for (let p = pos; p < chunkEnd;) {
              const g = Math.floor(p / cs);
              const i = g - base;
              const cEnd = Math.min(chunkEnd, (g + 1) * cs);
              if (this.extendedL2) {
                if (!this.zeroExtended(l2, i, g, p - g * cs, cEnd - g * cs, mode, mayUnmap)) {
                  supported = false;
                  break;
                }
              } else {
                this.zeroStandard(l2, i, g, mode, mayUnmap, fallback);
              }
              p = cEnd;
            }
            await this.l2Cache.markDirty(table);
          } finally {
            this.l2Cache.release(table);
          }
        });
        for (const [o, n] of fallback) {
          await this.writeChunk(o, new Uint8Array(n));
        }
        if (!supported) return false;
        pos = chunkEnd;
      }
    }
    return true;
  }

  private hasBackingFile(): boolean {
    return this.backing !== undefined || this.backingFilename !== undefined;
  }

  /** Write zeros into the external data file over guest bytes [start, end). */
  private async zeroDataFile(start: number, end: number): Promise<void> {
    const chunk = Math.min(end - start, 1024 * 1024);
    const zeros = new Uint8Array(chunk);
    for (let pos = start; pos < end; pos += chunk) {
      const n = Math.min(chunk, end - pos);
      await this.dataBackend.write(pos, n === chunk ? zeros : zeros.subarray(0, n));
    }
  }

  private zeroStandard(
    l2: U64TableView,
    i: number,
    g: number,
    mode: "zero" | "discard",
    mayUnmap: boolean,
    fallback: [number, number][],
  ): void {
    const cs = this.clusterSize;
    const hi = l2.hi(i);
    const lo = l2.lo(i);
    const compressed = (hi & OFLAG_COMPRESSED.hi) !== 0;
    const host = compressed ? 0 : this.hostOf(l2, i);
    const allocated =
      compressed || host !== 0 || (this.hasDataFile && (hi & OFLAG_COPIED.hi) !== 0);
    const v3 = this.hdr.version === 3;
    if (mode === "discard") {
      if (!this.backing && !allocated) return;
      if (allocated) this.queueFree(l2, i);
      l2.setWords(i, 0, v3 ? OFLAG_ZERO.lo : 0);
      return;
    }
    if (!v3) {
      // No zero flag. Without a backing file a released cluster reads as zeros, so QEMU
      // zeroes by discarding (the cluster is freed, with or without unmap); over a backing
      // file only zero bytes can hide its data.
      if (!this.hasBackingFile()) {
        if (allocated) this.queueFree(l2, i);
        l2.setWords(i, 0, 0);
        return;
      }
      fallback.push([g * cs, Math.min(cs, this.virtualSize - g * cs)]);
      return;
    }
    if (allocated && !mayUnmap && !compressed && !this.hasDataFile) {
      // Keep the cluster allocated (zero-alloc), as QEMU does without unmap, also when it is
      // shared with a snapshot (not COPIED: a later write allocates a new cluster).
      l2.setWords(i, hi, (lo | OFLAG_ZERO.lo) >>> 0);
      return;
    }
    if (allocated) this.queueFree(l2, i);
    l2.setWords(i, 0, OFLAG_ZERO.lo);
  }

  private zeroExtended(
    l2: U64TableView,
    index: number,
    g: number,
    from: number,
    to: number,
    mode: "zero" | "discard",
    mayUnmap: boolean,
  ): boolean {
    const scs = this.subclusterSize;
    const cs = this.clusterSize;
    const i = index * 2;
    // The last cluster of the disk may be shorter than a cluster: covering it from its start
    // to the end of the disk counts as covering the whole cluster (as QEMU takes it).
    const toEnd = from === 0 && g * cs + to >= this.virtualSize;
    const sc0 = Math.floor(from / scs);
    const sc1 = toEnd ? 31 : Math.ceil(to / scs) - 1;
    const mask =
      (sc1 === 31 ? 0xffff_ffff : ((1 << (sc1 + 1)) >>> 0) - 1) & ~(((1 << sc0) >>> 0) - 1);
    const whole = mask >>> 0 === 0xffff_ffff;
    const hi = l2.hi(i);
    const compressed = (hi & OFLAG_COMPRESSED.hi) !== 0;
    const host = compressed ? 0 : this.hostOf(l2, i);
    if (whole && (mayUnmap || mode === "discard" || compressed)) {
      if (compressed || host !== 0) this.queueFree(l2, i);
      l2.setWords(i, 0, 0);
      l2.setWords(i + 1, 0xffff_ffff, 0);
      return true;
    }
    // A compressed cluster has no subcluster bits: QEMU's zeroing reports "not supported"
    // and zero bytes are written instead (copy on write of the decompressed cluster).
    if (compressed) return mode !== "zero";
    l2.setWords(i + 1, (l2.hi(i + 1) | mask) >>> 0, (l2.lo(i + 1) & ~mask) >>> 0);
    return true;
  }

  /**
   * Write one whole cluster compressed (the last cluster of the disk may be shorter and is
   * padded). Falls back to a normal write when compression does not pay.
   */
  async writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    const w = this.checkWritable();
    const cs = this.clusterSize;
    // QEMU refuses a misaligned compressed write, or one with a data file, after its bitmaps
    // took the range as dirty (the refusal comes from inside the request): so do we.
    if (Number.isSafeInteger(offset) && offset >= 0 && offset + data.length <= this.virtualSize)
      this.pbm?.setDirty(offset, data.length);
    if (
      offset % cs !== 0 ||
      (data.length !== cs && offset + data.length !== this.virtualSize) ||
      data.length > cs
    ) {
      throw new InvalidArgumentError(
        `compressed writes must cover exactly one whole cluster (${cs} bytes)`,
      );
    }
    if (this.hasDataFile) {
      throw new InvalidArgumentError(
        "compressed writes are not supported with an external data file",
      );
    }
    checkRequest(offset, data.length, this.virtualSize);
    const g = offset / cs;
    await this.withClusters(g, g, async () => {
      let full = data;
      if (data.length < cs) {
        full = new Uint8Array(cs);
        full.set(data);
      }
      const packed = await w.compress(full, this.hdr.compressionType);
      // Data that does not shrink below a cluster is stored as it is (QEMU's limit too: with
      // 512-byte clusters most data still compresses).
      if (!packed || packed.length >= cs) {
        await this.writeLocked(offset, data);
        return;
      }
      // Compressed data never overwrites a cluster that has a host cluster (data, compressed,
      // or preallocated zeros): QEMU fails such a write with EIO, and so do we.
      const e = await this.resolve(offset, data.length);
      if (e.kind === Kind.Compressed || e.host >= 0) {
        throw new IoError(
          `compressed write at guest offset ${hex(offset)}: the cluster is already allocated (compressed data cannot overwrite it)`,
        );
      }
      await this.storeCompressed(g, packed);
    });
    if (w.writethrough) await this.flush();
  }

  /** Under the claim of guest cluster `g`: store `packed` as its compressed cluster. */
  private async storeCompressed(g: number, packed: Uint8Array): Promise<void> {
    const w = this.w!;
    if (w.lazy) await this.markDirtyOnDisk();
    const l1Index = Math.floor(g / this.l2Entries);
    const table = await w.meta.run(() => this.l2ForWrite(l1Index));
    try {
      const host = await w.meta.run(() => this.allocateBytes(packed.length));
      await this.checkOverlap(host, packed.length);
      await this.backend.write(host, packed);
      this.fileSize = Math.max(this.fileSize, host + packed.length);
      await w.meta.run(async () => {
        const l2 = new U64TableView(table.bytes, "big");
        const i = (g - l1Index * this.l2Entries) * (this.extendedL2 ? 2 : 1);
        this.queueFree(l2, i);
        const sectors = Math.floor((host + packed.length - 1) / 512) - Math.floor(host / 512);
        const d = encodeCompressed(host, sectors, this.layout);
        l2.setWords(i, d.hi, d.lo);
        if (this.extendedL2) l2.setWords(i + 1, 0, 0);
        await this.l2Cache.markDirty(table);
      });
    } finally {
      this.l2Cache.release(table);
    }
  }

  /** Under the metadata lock: byte-granular space for compressed data (QEMU's alloc_bytes). */
  private async allocateBytes(size: number): Promise<number> {
    const w = this.w!;
    const cs = this.clusterSize;
    // Another compressed cluster may share the current host cluster (one more reference),
    // unless its refcount is at the width's maximum (refcount_bits 1 or 2): then a new
    // cluster is started, as QEMU's byte allocator does.
    const cur = w.compressedCluster;
    const shareable = cur >= 0 && (await w.refcounts.get(cur)) < w.refcounts.maxRefcount;
    if (shareable && w.compressedNext + size <= cs) {
      const at = cur * cs + w.compressedNext;
      await w.refcounts.update(cur, 1);
      w.compressedNext += size;
      if (w.compressedNext === cs) w.compressedCluster = -1;
      return at;
    }
    const n = Math.ceil(size / cs);
    const host = await w.refcounts.allocate(n);
    this.refreshRefcountBlocks(host + n * cs);
    let at = host;
    if (shareable && host === (cur + 1) * cs) {
      // The new clusters follow the current one: the data starts in its free tail and runs on
      // (QEMU packs the same way); clusters it does not reach are given back.
      at = cur * cs + w.compressedNext;
      const reached = Math.ceil((at + size - host) / cs);
      if (reached < n) await w.refcounts.free(host + reached * cs, n - reached);
      await w.refcounts.update(cur, 1);
    }
    const end = at + size;
    w.compressedCluster = end % cs !== 0 ? Math.floor(end / cs) : -1;
    w.compressedNext = end % cs;
    return at;
  }

  /**
   * Grow the disk to `newSize` bytes (a multiple of 512). When the L1 table is too small, a
   * larger one is written and synced before the header points at it; the old one is freed
   * afterwards. Shrinking is refused (data would be lost).
   */
  async resize(newSize: number): Promise<void> {
    const w = this.checkWritable();
    if (!Number.isSafeInteger(newSize) || newSize < 0 || newSize % 512 !== 0) {
      throw new InvalidArgumentError(`The new size must be a multiple of 512 (got ${newSize})`);
    }
    if (newSize < this.size) {
      throw new InvalidArgumentError(
        `qcow2 images cannot be shrunk (from ${this.size} to ${newSize} bytes): data past the new end would be lost`,
      );
    }
    this.pbm?.checkResize();
    // A backing file that reaches past the old end would show through the new area: QEMU
    // then zeroes the whole new area, with zero flags from the first granule boundary at or
    // after the old end (a subcluster; a cluster on version 2) and zero bytes before it.
    // Version 2 has no zero flag: QEMU refuses when the new end passes that boundary (before
    // changing anything, here); a grow inside the old last cluster only writes zero bytes.
    const oldSize = this.size;
    const backingEnd =
      this.backing !== undefined
        ? this.backing.virtualSize
        : this.backingFilename !== undefined
          ? newSize
          : 0;
    const zeroNew = newSize > oldSize && backingEnd > oldSize;
    const zeroGran = this.hdr.version === 2 ? this.clusterSize : this.subclusterSize;
    const zeroStart = Math.ceil(oldSize / zeroGran) * zeroGran;
    if (zeroNew && this.hdr.version === 2 && newSize > zeroStart) {
      throw new UnsupportedFeatureError(
        `Failed to zero out new clusters: a version 2 image (compat=0.10) cannot hide its backing file's data past its last cluster (${zeroStart} bytes) without zero clusters`,
        ["zero clusters"],
      );
    }
    await w.claims.drain();
    await w.meta.run(async () => {
      await this.flushLocked();
      const cs = this.clusterSize;
      const needed = Math.ceil(newSize / (cs * this.l2Entries));
      if (needed * 8 > 32 * 1024 * 1024) {
        throw new InvalidArgumentError(
          `${newSize} bytes is too large for this image's cluster size ${cs}`,
        );
      }
      if (needed > this.l1.length) {
        const clusters = Math.ceil((needed * 8) / cs);
        const offset = await w.refcounts.allocate(clusters);
        this.refreshRefcountBlocks(offset + clusters * cs);
        await this.checkOverlap(offset, clusters * cs);
        const grown = new U64TableView(new Uint8Array(needed * 8), "big");
        grown.bytes.set(this.l1.bytes);
        const padded = new Uint8Array(clusters * cs);
        padded.set(grown.bytes);
        await w.refcountCache.flush();
        await this.backend.write(offset, padded);
        await this.backend.flush();
        const oldOffset = this.hdr.l1TableOffset;
        const oldClusters = Math.ceil((this.hdr.l1Size * 8) / cs);
        await this.rewriteHeader({ l1TableOffset: offset, l1Size: needed, size: newSize });
        this.l1 = grown;
        this.fileSize = Math.max(this.fileSize, offset + clusters * cs);
        if (oldClusters > 0) await w.refcounts.free(oldOffset, oldClusters);
        await w.refcountCache.flush();
        this.buildMetadataMap();
      } else {
        await this.rewriteHeader({ size: newSize });
      }
      this.size = newSize;
      this.pbm?.resize(newSize);
    });
    if (zeroNew) {
      const cs = this.clusterSize;
      await this.withClusters(
        Math.floor(oldSize / cs),
        Math.floor((newSize - 1) / cs),
        async () => {
          if (newSize > zeroStart) await this.zeroAligned(zeroStart, newSize, "zero", false);
          if (zeroStart > oldSize)
            await this.writeLocked(oldSize, new Uint8Array(Math.min(zeroStart, newSize) - oldSize));
        },
      );
      await this.flush();
    }
  }

  /**
   * Make every completed write durable, in the order that keeps the image consistent: refcount
   * blocks, then L2 tables, then the L1 table, then a sync; only then are freed clusters'
   * refcounts lowered.
   */
  async flush(): Promise<void> {
    this.checkOpen();
    const w = this.w;
    if (!w) return;
    if (w.corrupted) return;
    await w.meta
      .run(() => this.flushLocked())
      .catch((e: unknown) => {
        throw this.corruptCause(e);
      });
  }

  private async flushLocked(): Promise<void> {
    const w = this.w!;
    if (this.dataBackend !== this.backend) await this.dataBackend.flush();
    // With lazy refcounts and the dirty bit on disk, refcounts need not be accurate on disk
    // (a crash makes the next open rebuild them), so a flush leaves them cached, as QEMU
    // does (qcow2_need_accurate_refcounts); a clean close writes them.
    if (!w.lazy || !w.dirtyOnDisk) await w.refcountCache.flush();
    await this.l2Cache.flush();
    if (w.l1DirtyHi > w.l1DirtyLo) {
      const from = w.l1DirtyLo * 8;
      const to = w.l1DirtyHi * 8;
      await this.checkOverlap(this.hdr.l1TableOffset + from, to - from, Meta.activeL1);
      await this.backend.write(this.hdr.l1TableOffset + from, this.l1.bytes.subarray(from, to));
      w.l1DirtyLo = Number.MAX_SAFE_INTEGER;
      w.l1DirtyHi = 0;
      for (const off of w.retiredL2) w.metadata.remove(off / this.clusterSize, Meta.activeL2);
      w.retiredL2 = [];
    }
    await this.backend.flush();
    const frees = w.pendingFrees;
    w.pendingFrees = [];
    for (const [off, n] of frees) {
      await w.refcounts.free(off, n);
      // A freed cluster may be reused for anything: no more compressed data goes into it.
      const c = w.compressedCluster;
      if (
        c >= 0 &&
        c * this.clusterSize >= off &&
        c * this.clusterSize < off + n * this.clusterSize
      )
        w.compressedCluster = -1;
    }
  }

  /** Flush everything, apply the postponed refcount changes, and clear the dirty bit. */
  private async closeClean(): Promise<void> {
    const w = this.w!;
    // Let requests still in flight finish first.
    await w.claims.drain();
    await w.meta.run(async () => {
      await this.flushLocked();
      // Bitmaps go back to disk (IN_USE cleared) before the image is marked clean.
      if (this.pbm) await this.pbm.store();
      await w.refcountCache.flush();
      if (IncompatibleFeatures.decode(this.hdr.incompatibleFeatures).has("dirty")) {
        await this.rewriteHeader({
          incompatibleFeatures:
            this.hdr.incompatibleFeatures & ~IncompatibleFeatures.maskOf("dirty"),
        });
      }
    });
  }
}

function checkRequest(offset: number, length: number, size: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new InvalidArgumentError(`invalid request: offset ${offset}, length ${length}`);
  }
  if (offset + length > size) {
    throw new InvalidArgumentError(
      `request [${offset}, +${length}) is past the end of the ${size}-byte disk`,
    );
  }
}

/** Open a qcow2 image (read-only). */
export function openQcow2(
  backend: BlockBackend,
  options: Qcow2OpenOptions = {},
): Promise<Qcow2Image> {
  return Qcow2Image.open(backend, options);
}

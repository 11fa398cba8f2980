import {
  CorruptImageError,
  FormatError,
  InvalidArgumentError,
  UnsupportedFeatureError,
  U64TableView,
  hex,
} from "@qimg/structs";
import type { BlockBackend, BlockStatus, DiskImage } from "@qimg/io";
import { ClusterCache } from "@qimg/cluster-cache";
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
import type { BackingOpener, Qcow2Info } from "./types.js";

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

const TWO_32 = 0x1_0000_0000;
const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;

/**
 * A qcow2 image opened for reading. Implements {@link DiskImage}: reads return exactly the
 * bytes QEMU returns, `blockStatus` gives the facts `qemu-img map` prints.
 */
export class Qcow2Image implements DiskImage {
  readonly format = "qcow2";
  readonly readOnly = true;
  readonly virtualSize: number;
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly extensions: readonly HeaderExtension[];
  readonly featureNames: readonly FeatureName[];
  readonly snapshots: readonly SnapshotEntry[];
  readonly bitmaps: readonly BitmapEntry[];
  readonly backingFilename: string | undefined;
  readonly backingFormat: string | undefined;
  readonly dataFileName: string | undefined;
  backing: DiskImage | undefined;

  private readonly l1: U64TableView;
  private readonly l2Cache: ClusterCache;
  private readonly l2Entries: number;
  private readonly extendedL2: boolean;
  private readonly subclusterSize: number;
  private readonly layout: CompressedLayout;
  private readonly decompress: Decompressor;
  private readonly hasDataFile: boolean;
  private dataBackend: BlockBackend;
  private fileSize: number;
  private closed = false;
  private readonly scratch: Extent = {
    kind: Kind.Unallocated,
    length: 0,
    host: -1,
    compressedLength: 0,
  };
  /** The last decompressed cluster, so sequential small reads decompress once. */
  private lastCompressed: { host: number; data: Uint8Array } | undefined;

  private constructor(
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
    },
  ) {
    const h = init.header;
    this.header = h;
    this.virtualSize = h.size;
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
      backend,
      tableSize: this.clusterSize,
      capacity: tables,
      name: "L2",
    });
  }

  /** Open a qcow2 image. Validates the header, L1 table and snapshot table. */
  static async open(backend: BlockBackend, options: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
    const fileSize = await backend.size();
    const first = new Uint8Array(Math.min(fileSize, 2 * 1024 * 1024));
    await backend.read(0, first);
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
    if (options.readOnly === false) {
      if (incompat.has("corrupt")) {
        throw new CorruptImageError("image is corrupt; cannot be opened read/write", {
          offset: 72,
        });
      }
      throw new InvalidArgumentError(
        "this qcow2 driver opens images read-only; read-write opens are not supported yet",
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
    if (incompat.has("externalDataFile") && backingFilename !== undefined) {
      throw new FormatError("qcow2 image has both an external data file and a backing file");
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
    return image;
  }

  /** The facts `qemu-img info` shows. */
  info(): Qcow2Info {
    const h = this.header;
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
            : Number(s.icount),
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
          await this.dataBackend.read(e.host, dst, { zeroPastEof: true });
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
          length: b ? n : n,
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

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.closeSide();
    await this.backend.close();
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
    const out =
      last?.data.length === this.clusterSize
        ? new Uint8Array(this.clusterSize)
        : new Uint8Array(this.clusterSize);
    await this.decompress(src, out);
    this.lastCompressed = { host, data: out };
    return out;
  }

  /**
   * Resolve the run of guest bytes starting at `pos` (at most `max` bytes) that share one kind,
   * walking contiguous entries of one L2 table. Returns a reused object.
   */
  private async resolve(pos: number, max: number): Promise<Extent> {
    const e = this.scratch;
    const cs = this.clusterSize;
    const guestCluster = Math.floor(pos / cs);
    const l1Index = Math.floor(guestCluster / this.l2Entries);
    let l2Index = guestCluster % this.l2Entries;
    // Bytes until the end of the range this L2 table maps (or the request).
    const tableEnd = (l1Index + 1) * this.l2Entries * cs;
    const limit = Math.min(max, tableEnd - pos, this.virtualSize - pos);
    if (l1Index >= this.l1.length) {
      return set(e, Kind.Unallocated, limit, -1, 0);
    }
    const l2Offset = this.l1.getMasked(l1Index, L1_OFFSET_MASK);
    if (l2Offset === 0) return set(e, Kind.Unallocated, limit, -1, 0);
    if (l2Offset % cs !== 0) {
      throw new CorruptImageError(
        `L2 table offset ${hex(l2Offset)} in L1 entry ${l1Index} is not aligned to the cluster size ${cs}`,
        { offset: this.header.l1TableOffset + l1Index * 8 },
      );
    }
    if (l2Offset + cs > this.fileSize) {
      throw new CorruptImageError(
        `L2 table at ${hex(l2Offset)} (L1 entry ${l1Index}) is past the end of the file (${this.fileSize} bytes)`,
        { offset: this.header.l1TableOffset + l1Index * 8 },
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
    return set(
      e,
      kind === -1 ? Kind.Unallocated : kind,
      Math.min(length, limit),
      host,
      compressedLength,
    );
  }
}

function set(
  e: Extent,
  kind: Kind,
  length: number,
  host: number,
  compressedLength: number,
): Extent {
  e.kind = kind;
  e.length = length;
  e.host = host;
  e.compressedLength = compressedLength;
  return e;
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

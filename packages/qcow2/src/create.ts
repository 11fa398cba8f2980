import { InvalidArgumentError, UnsupportedFeatureError } from "@qimg/structs";
import type { BlockBackend } from "@qimg/io";
import { rebuildRefcounts } from "@qimg/refcount";
import {
  AutoclearFeatures,
  CompatibleFeatures,
  FEATURE_NAMES,
  IncompatibleFeatures,
  MAX_BACKING_NAME,
  MAX_L1_BYTES,
} from "./spec/header.js";
import type { Qcow2Header } from "./spec/header.js";
import { ExtensionType, encodeFeatureNames, encodeStringExtension } from "./spec/extensions.js";
import type { FeatureName } from "./spec/extensions.js";
import { encodeHeaderArea, headerAreaLength } from "./spec/header-area.js";
import { U64TableView } from "@qimg/structs";
import { l2Format, l2Word, withCopied } from "./spec/l2.js";

const TWO_32 = 0x1_0000_0000;

/** qemu-img's `preallocation` option: none, metadata only, fallocate'd data, or written zeros. */
export type Preallocation = "off" | "metadata" | "falloc" | "full";

/** qemu-img's qcow2 creation options. */
export interface Qcow2CreateOptions {
  /** Virtual size in bytes (rounded up to a multiple of 512, as qemu-img does). */
  readonly size: number;
  /** "0.10" (version 2) or "1.1" (version 3, the default); "v2"/"v3" also accepted. */
  readonly compat?: "0.10" | "1.1" | "v2" | "v3";
  /** Power of two, 512 B .. 2 MiB; default 64 KiB. */
  readonly clusterSize?: number;
  /** Power of two, 1..64; default 16 (version 2 only supports 16). */
  readonly refcountBits?: number;
  /** Set the lazy-refcounts compatible bit (version 3 only); default off. */
  readonly lazyRefcounts?: boolean;
  /** Extended L2 entries with 32 subclusters per cluster (version 3 only); default off. */
  readonly extendedL2?: boolean;
  /** Compression type for compressed clusters; zstd needs version 3. Default zlib. */
  readonly compressionType?: "zlib" | "zstd";
  /** Backing file name written into the header, as given (not resolved). */
  readonly backingFile?: string;
  /** Backing file format, written as the backing-format extension. */
  readonly backingFormat?: string;
  /** Name of the external data file (which the caller creates and passes separately). */
  readonly dataFile?: string;
  /** The data file is a raw image of the guest disk (the `data_file_raw` autoclear bit). */
  readonly dataFileRaw?: boolean;
  /** What to allocate up front; default off. */
  readonly preallocation?: Preallocation;
}

const QEMU_FEATURE_TABLE: FeatureName[] = [
  ...FEATURE_NAMES.incompatible.map((name, bit) => ({ type: "incompatible" as const, bit, name })),
  ...FEATURE_NAMES.compatible.map((name, bit) => ({ type: "compatible" as const, bit, name })),
  ...FEATURE_NAMES.autoclear.map((name, bit) => ({ type: "autoclear" as const, bit, name })),
];

/**
 * Largest cluster size whose images get no feature-name table. QEMU leaves the table out of
 * images with clusters of 4 KiB and less: its 8 entries (392 bytes with their prefix) would
 * leave almost no room for a backing file name in a 512-byte header cluster. qemu-img 7.2
 * writes images this way, and we write the same header bytes.
 */
export const NO_FEATURE_TABLE_MAX_CLUSTER = 4096;

/** The header extensions a new image gets, in QEMU's order. */
function createExtensions(
  o: Qcow2CreateOptions,
  version: 2 | 3,
  clusterSize: number,
): { type: number; data: Uint8Array }[] {
  const extensions: { type: number; data: Uint8Array }[] = [];
  if (o.backingFormat !== undefined) {
    extensions.push({
      type: ExtensionType.backingFormat,
      data: encodeStringExtension(o.backingFormat),
    });
  }
  if (o.dataFile !== undefined) {
    extensions.push({
      type: ExtensionType.externalDataFile,
      data: encodeStringExtension(o.dataFile),
    });
  }
  if (version === 3 && clusterSize > NO_FEATURE_TABLE_MAX_CLUSTER) {
    extensions.push({
      type: ExtensionType.featureNameTable,
      data: encodeFeatureNames(QEMU_FEATURE_TABLE),
    });
  }
  return extensions;
}

function isPow2(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** Validate options the way qemu-img does, with its reasons. Returns normalized values. */
export function normalizeCreateOptions(o: Qcow2CreateOptions) {
  if (!Number.isSafeInteger(o.size) || o.size < 0) {
    throw new InvalidArgumentError(`image size ${o.size} is not a non-negative integer`);
  }
  const size = Math.ceil(o.size / 512) * 512;
  const compat = o.compat ?? "1.1";
  if (!["0.10", "1.1", "v2", "v3"].includes(compat)) {
    throw new InvalidArgumentError(`Invalid compatibility level: '${compat}'`);
  }
  const version: 2 | 3 = compat === "0.10" || compat === "v2" ? 2 : 3;
  const clusterSize = o.clusterSize ?? 65536;
  if (!isPow2(clusterSize) || clusterSize < 512 || clusterSize > 2 * 1024 * 1024) {
    throw new InvalidArgumentError("Cluster size must be a power of two between 512 and 2048k");
  }
  const clusterBits = Math.log2(clusterSize);
  const refcountBits = o.refcountBits ?? 16;
  if (!isPow2(refcountBits) || refcountBits > 64) {
    throw new InvalidArgumentError(
      "Refcount width must be a power of two and may not exceed 64 bits",
    );
  }
  const needV3 = (what: string): never => {
    throw new InvalidArgumentError(
      `${what} only supported with compatibility level 1.1 and above (use version=v3 or greater)`,
    );
  };
  if (version === 2) {
    // The order of these checks is qemu-img's, so the same message wins.
    if (o.extendedL2) needV3("Extended L2 entries are");
    if (refcountBits !== 16) {
      throw new InvalidArgumentError(
        "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
      );
    }
    if (o.lazyRefcounts) needV3("Lazy refcounts");
    if (o.dataFile !== undefined) needV3("External data files are");
    if (o.compressionType === "zstd") needV3("Non-zlib compression type is");
  }
  if (o.extendedL2 && clusterSize < 16384) {
    throw new InvalidArgumentError(
      "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
    );
  }
  if (o.dataFileRaw && o.dataFile === undefined) {
    throw new InvalidArgumentError("data-file-raw requires data-file");
  }
  if (o.dataFileRaw && o.backingFile !== undefined) {
    throw new InvalidArgumentError(
      "Backing file and data-file-raw cannot be used at the same time",
    );
  }
  if (o.backingFormat !== undefined && o.backingFile === undefined) {
    throw new InvalidArgumentError("Backing format cannot be used without backing file");
  }
  const preallocation = o.preallocation ?? "off";
  if (!["off", "metadata", "falloc", "full"].includes(preallocation)) {
    throw new InvalidArgumentError(`Invalid preallocation mode: '${preallocation}'`);
  }
  if (o.backingFile !== undefined && preallocation !== "off" && !o.extendedL2) {
    throw new InvalidArgumentError(
      "Backing file and preallocation can only be used at the same time if extended_l2 is on",
    );
  }
  if (
    o.compressionType !== undefined &&
    o.compressionType !== "zlib" &&
    o.compressionType !== "zstd"
  ) {
    throw new UnsupportedFeatureError(`Unknown compression type '${String(o.compressionType)}'`, [
      String(o.compressionType),
    ]);
  }
  const l2Entries = l2Format({
    clusterBits,
    extendedL2: !!o.extendedL2,
    hasDataFile: o.dataFile !== undefined,
  }).entriesPerTable;
  const l1Size = Math.ceil(size / (clusterSize * l2Entries));
  if (l1Size * 8 > MAX_L1_BYTES) {
    throw new InvalidArgumentError(
      `The image size is too large for file format 'qcow2' (try using a larger cluster size)`,
    );
  }
  checkHeaderArea(o, version, clusterSize);
  return {
    size,
    version,
    clusterSize,
    clusterBits,
    refcountBits,
    refcountOrder: Math.log2(refcountBits),
    l2Entries,
    l1Size,
    // data_file_raw: the data file must read as the guest disk, so every cluster is mapped to
    // its own offset from the start (QEMU turns preallocation=off into metadata here too).
    preallocation: o.dataFileRaw && preallocation === "off" ? "metadata" : preallocation,
    extendedL2: !!o.extendedL2,
    zstd: o.compressionType === "zstd",
  };
}

/**
 * Fail, with qemu-img's messages, when the header, its extensions and the backing file name
 * do not fit the first cluster (QEMU finds out only after writing; we check before).
 */
function checkHeaderArea(o: Qcow2CreateOptions, version: 2 | 3, clusterSize: number): void {
  const extensions = createExtensions(o, version, clusterSize);
  const start = version === 2 ? 72 : 112;
  const assign = (reason: string): InvalidArgumentError =>
    new InvalidArgumentError(
      `Could not assign backing file '${o.backingFile}'` +
        (o.backingFormat !== undefined ? ` with format '${o.backingFormat}'` : "") +
        `: ${reason}`,
    );
  const withoutName = headerAreaLength(start, extensions, undefined);
  if (withoutName > clusterSize) {
    throw new InvalidArgumentError("Could not update qcow2 header: No space left on device");
  }
  if (o.backingFile === undefined) return;
  if (new TextEncoder().encode(o.backingFile).byteLength > MAX_BACKING_NAME) {
    throw assign("Invalid argument");
  }
  if (headerAreaLength(start, extensions, o.backingFile) > clusterSize) {
    throw assign("No space left on device");
  }
}

/**
 * Create a qcow2 image in `backend` (which should be empty). Layout as QEMU's: header cluster,
 * refcount table, refcount block(s), L1 table, then (with preallocation) L2 tables and data.
 * `dataBackend` is the external data file, when `dataFile` is given (it is sized for
 * preallocation=full/falloc).
 */
export async function createQcow2(
  backend: BlockBackend,
  options: Qcow2CreateOptions,
  dataBackend?: BlockBackend,
): Promise<void> {
  const n = normalizeCreateOptions(options);
  const cs = n.clusterSize;
  await backend.truncate(0);
  let incompatible = 0n;
  if (n.extendedL2) incompatible |= IncompatibleFeatures.maskOf("extendedL2");
  if (n.zstd) incompatible |= IncompatibleFeatures.maskOf("compressionType");
  if (options.dataFile !== undefined)
    incompatible |= IncompatibleFeatures.maskOf("externalDataFile");
  const compatible = options.lazyRefcounts ? CompatibleFeatures.maskOf("lazyRefcounts") : 0n;
  const autoclear = options.dataFileRaw ? AutoclearFeatures.maskOf("rawExternalData") : 0n;
  // A zero-sized disk has an empty L1 table, which needs no cluster (as qemu-img creates it).
  const l1Clusters = Math.ceil((n.l1Size * 8) / cs);
  // Clusters: 0 header; then the refcount structures (placed by rebuild at cluster 1);
  // we compute their size first so the L1 table and data can follow them.
  const header0: Qcow2Header = {
    version: n.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: n.clusterBits,
    size: n.size,
    cryptMethod: 0,
    l1Size: n.l1Size,
    l1TableOffset: 0,
    refcountTableOffset: 0,
    refcountTableClusters: 0,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: incompatible,
    compatibleFeatures: compatible,
    autoclearFeatures: autoclear,
    refcountOrder: n.refcountOrder,
    headerLength: n.version === 3 ? 112 : 72,
    compressionType: n.zstd ? 1 : 0,
    extraBytes: n.version === 3 ? new Uint8Array(7) : new Uint8Array(0),
  };
  const extensions = createExtensions(options, n.version, cs);
  // Metadata preallocation: L2 tables for the whole disk and (without a data file) data clusters.
  const prealloc = n.preallocation !== "off";
  const l2Tables = prealloc ? n.l1Size : 0;
  const guestClusters = Math.ceil(n.size / cs);
  const dataClusters = prealloc && options.dataFile === undefined ? guestClusters : 0;
  // Estimate the refcount area (table + blocks) so the L1 table can follow it, as QEMU lays out.
  const entriesPerBlock = (cs * 8) / n.refcountBits;
  let refArea = 2;
  for (;;) {
    const total = 1 + refArea + l1Clusters + l2Tables + dataClusters;
    const blocks = Math.ceil(total / entriesPerBlock);
    const tableClusters = Math.ceil((blocks * 8) / cs);
    if (tableClusters + blocks <= refArea) break;
    refArea = tableClusters + blocks;
  }
  const l1Offset = (1 + refArea) * cs;
  const l2Start = l1Offset + l1Clusters * cs;
  const dataStart = l2Start + l2Tables * cs;
  const end = dataStart + dataClusters * cs;
  const totalClusters = end / cs;
  const counts = new Uint8Array(totalClusters);
  counts[0] = 1;
  counts.fill(1, 1 + refArea, totalClusters);
  // L1 (and L2) tables.
  const l1 = new U64TableView(new Uint8Array(l1Clusters * cs), "big");
  const fmt = l2Format({
    clusterBits: n.clusterBits,
    extendedL2: n.extendedL2,
    hasDataFile: options.dataFile !== undefined,
  });
  for (let i = 0; i < l2Tables; i++) {
    const l2Off = l2Start + i * cs;
    // COPIED entries: every table and cluster has refcount 1.
    l1.setWords(i, withCopied(Math.floor(l2Off / TWO_32), true), l2Off >>> 0);
    const l2 = new U64TableView(new Uint8Array(cs), "big");
    for (let j = 0; j < n.l2Entries; j++) {
      const guest = i * n.l2Entries + j;
      if (guest >= guestClusters) break;
      // In an external data file clusters map to the same offset (offset 0 is valid there:
      // the COPIED flag alone marks it allocated).
      const host = options.dataFile !== undefined ? guest * cs : dataStart + guest * cs;
      l2.setWords(l2Word(fmt, j), withCopied(Math.floor(host / TWO_32), true), host >>> 0);
      // Extended L2: the subcluster bitmap stays 0 (every subcluster "unallocated" in an
      // allocated cluster), as QEMU preallocates: reads still come from the backing file (or
      // read zeros), and a write only sets the bits of the subclusters it covers.
    }
    await backend.write(l2Off, l2.bytes);
  }
  await backend.write(l1Offset, l1.bytes);
  if (end > l2Start) {
    if (n.preallocation === "full" || n.preallocation === "falloc") {
      const zero = new Uint8Array(Math.min(4 * 1024 * 1024, end - dataStart));
      for (let pos = dataStart; pos < end; pos += zero.length) {
        await backend.write(pos, zero.subarray(0, Math.min(zero.length, end - pos)));
      }
    } else {
      await backend.truncate(Math.max(await backend.size(), end));
    }
  }
  if (dataBackend && prealloc) {
    // The data file reaches the end of the last preallocated (sub)cluster, as QEMU's.
    const unit = n.extendedL2 ? cs / 32 : cs;
    const dataEnd = Math.ceil(n.size / unit) * unit;
    await dataBackend.truncate(Math.max(await dataBackend.size(), dataEnd));
  }
  let header = header0;
  const writeHeader = async (tableOffset: number, tableClusters: number): Promise<void> => {
    const area = encodeHeaderArea(
      {
        ...header,
        l1TableOffset: l1Offset,
        refcountTableOffset: tableOffset,
        refcountTableClusters: tableClusters,
      },
      extensions,
      options.backingFile,
    );
    header = area.header;
    await backend.write(0, area.bytes);
    await backend.flush();
  };
  await rebuildRefcounts({
    backend,
    clusterBits: n.clusterBits,
    refcountOrder: n.refcountOrder,
    counts,
    placeAt: cs,
    onTableMoved: writeHeader,
  });
  await backend.flush();
}

/**
 * The image's metadata without a driver: the header and its extensions, the backing file name
 * and format, the external data file name, the snapshot table and the bitmap directory, read
 * and validated exactly as opening the image does (the same checks, in the same order, with
 * the same typed errors), but nothing is opened, cached or set up for writing. The checker and
 * tools that only look at the metadata use this; {@link readQcow2Metadata} holds no resources,
 * so there is nothing to close.
 */
import {
  CorruptImageError,
  FormatError,
  InvalidArgumentError,
  UnsupportedFeatureError,
  hex,
} from "@qimg/structs";
import type { BlockBackend } from "@qimg/io";
import {
  AutoclearFeatures,
  IncompatibleFeatures,
  MAX_SNAPSHOTS,
  decodeHeader,
  validateHeader,
} from "./spec/header.js";
import type { Qcow2Header } from "./spec/header.js";
import {
  BitmapsExtension,
  ExtensionType,
  FdeExtension,
  decodeExtensions,
  decodeFeatureNames,
  decodeString,
  decodeStringExtension,
} from "./spec/extensions.js";
import type { FeatureName, HeaderExtension } from "./spec/extensions.js";
import { MAX_SNAPSHOT_L1_ENTRIES, decodeSnapshotTable } from "./spec/snapshot.js";
import type { SnapshotEntry } from "./spec/snapshot.js";
import { decodeBitmapDirectory } from "./spec/bitmap-directory.js";
import type { BitmapEntry } from "./spec/bitmap-directory.js";
import { l2Format } from "./spec/l2.js";
import type { L2Format } from "./spec/l2.js";

const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;

/** A byte range of the image file. */
export interface FileRange {
  /** Host offset. */
  readonly offset: number;
  /** Length in bytes. */
  readonly length: number;
}

/** What {@link readQcow2Metadata} reads: everything but the tables. */
export interface Qcow2Metadata {
  /** The decoded header. */
  readonly header: Qcow2Header;
  /** The image file's size when it was read. */
  readonly fileSize: number;
  /** The header extensions, in file order. */
  readonly extensions: readonly HeaderExtension[];
  /** Names from the feature name table extension. */
  readonly featureNames: readonly FeatureName[];
  /** The backing file name, if any. */
  readonly backingFilename: string | undefined;
  /** The backing format (the option given, else the extension's), if any. */
  readonly backingFormat: string | undefined;
  /** The external data file name, if any. */
  readonly dataFileName: string | undefined;
  /** The snapshot table. */
  readonly snapshots: readonly SnapshotEntry[];
  /** Bytes of the snapshot table up to the end of its last entry (0 without snapshots). */
  readonly snapshotsSize: number;
  /**
   * Only with `forCheck`: why the snapshot table cannot be read as QEMU reads it (then
   * `snapshots` is empty): QEMU's check line (after "ERROR ") and its hint; qemu-img check
   * fails with it ("File too large").
   */
  readonly snapshotTableError?: { readonly message: string; readonly hint: string } | undefined;
  /** The bitmap directory (empty unless the bitmaps autoclear bit is set). */
  readonly bitmaps: readonly BitmapEntry[];
  /** Where the bitmap directory is, when the bitmaps extension is valid. */
  readonly bitmapDirectory: FileRange | undefined;
  /** The full-disk encryption header area, when the extension names one. */
  readonly encryptionHeader: FileRange | undefined;
  /** L2 entry decoding facts ({@link l2Format}) for this image. */
  readonly l2: L2Format;
}

/** Options of {@link readQcow2Metadata}, as the matching open options. */
export interface ReadMetadataOptions {
  /** Refuse what a read-write open refuses (a corrupt image, a read-only file). */
  readonly writable?: boolean | undefined;
  /** Backing format to report instead of the extension's. */
  readonly backingFormat?: string | undefined;
  /** Backing and data files are not going to be opened: a data file need not be named. */
  readonly noBacking?: boolean | undefined;
  /**
   * Read for a consistency check, as `qemu-img check` opens an image: tolerate what only the
   * check reports (a refcount table of 0 clusters). Normal opens refuse it.
   */
  readonly forCheck?: boolean | undefined;
}

/**
 * The first snapshot table entry (of `count`, in `bytes`, zeros past its end) whose extra data
 * is longer than QEMU reads (1024 bytes), or that ends past QEMU's 64 MiB table limit: QEMU's
 * check fails on it unless it repairs.
 */
function tooMuchExtra(
  bytes: Uint8Array,
  count: number,
): Qcow2Metadata["snapshotTableError"] | undefined {
  const u = (at: number, n: number): number => {
    let v = 0;
    for (let k = 0; k < n; k++) v = v * 256 + (at + k < bytes.byteLength ? bytes[at + k]! : 0);
    return v;
  };
  let pos = 0;
  for (let i = 0; i < count; i++) {
    const extra = u(pos + 36, 4);
    if (extra > 1024) {
      return {
        message: `failed to read the snapshot table: Too much extra metadata in snapshot table entry ${i}`,
        hint: "You can force-remove this extra metadata with qemu-img check -r all",
      };
    }
    const end = pos + 40 + extra + u(pos + 12, 2) + u(pos + 14, 2);
    if (end > MAX_SNAPSHOT_TABLE_BYTES) {
      return {
        message: "failed to read the snapshot table: Snapshot table is too big",
        hint: `You can force-remove all ${count - i} overhanging snapshots with qemu-img check -r all`,
      };
    }
    pos = Math.ceil(end / 8) * 8;
  }
  return undefined;
}

/** Bytes a snapshot table entry takes, padded to 8 (QEMU's layout). */
function snapshotEntryBytes(s: SnapshotEntry): number {
  const enc = new TextEncoder();
  const bytes =
    40 + s.extraData.byteLength + enc.encode(s.id).byteLength + enc.encode(s.name).byteLength;
  return Math.ceil(bytes / 8) * 8;
}

/**
 * Read and validate a qcow2 image's metadata (everything but the L1/L2 and refcount tables)
 * from its file. Throws the typed errors opening the image throws, in the same order.
 */
export async function readQcow2Metadata(
  backend: BlockBackend,
  options: ReadMetadataOptions = {},
): Promise<Qcow2Metadata> {
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
  // The extensions end where the backing file name starts (QEMU's rule: with a name offset
  // at or before the end of the header there are no extensions at all), else at the cluster's end.
  const extEnd =
    header.backingFileOffset !== 0 ? Math.min(header.backingFileOffset, clusterSize) : clusterSize;
  const extensions = decodeExtensions(area, extStart, extEnd);
  const featureNames: FeatureName[] = [];
  for (const e of extensions) {
    if (e.type === ExtensionType.featureNameTable) featureNames.push(...decodeFeatureNames(e.data));
  }
  // qemu-img check opens an image whose refcount table has 0 clusters (and reports every
  // cluster's refcount as 0); every other open refuses it.
  // So does it with more snapshots than QEMU reads (the check fails on them).
  const check = options.forCheck === true;
  const tolerated = {
    ...header,
    refcountTableClusters:
      check && header.refcountTableClusters === 0 ? 1 : header.refcountTableClusters,
    nbSnapshots: check ? Math.min(header.nbSnapshots, MAX_SNAPSHOTS) : header.nbSnapshots,
  };
  validateHeader(tolerated, {
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
  if (options.writable === true && incompat.has("corrupt")) {
    throw new CorruptImageError("image is corrupt; cannot be opened read/write", { offset: 72 });
  }
  if (options.writable === true && header.refcountTableOffset === 0) {
    throw new CorruptImageError(
      "refcount table offset is 0 (it would overlap the header); cannot be opened read/write",
      { offset: 48 },
    );
  }
  if (options.writable === true && backend.readOnly) {
    throw new InvalidArgumentError(`cannot open ${backend.name} read/write: the file is read-only`);
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
  // QEMU refuses the raw-external-data bit without an external data file when it opens the
  // image's files (qemu-img info, which does not, opens it).
  if (
    AutoclearFeatures.decode(header.autoclearFeatures).has("rawExternalData") &&
    !incompat.has("externalDataFile") &&
    !options.noBacking
  ) {
    throw new FormatError(
      "qcow2 image has the raw external data bit but no external data file (data-file-raw requires a data file)",
      { offset: 88 },
    );
  }
  if (
    AutoclearFeatures.decode(header.autoclearFeatures).has("rawExternalData") &&
    backingFilename !== undefined
  ) {
    throw new FormatError("qcow2 image has both a raw external data file and a backing file");
  }
  // The active L1 table (it is not read here). A read-only open reads what lies past the end
  // of the file as zeros, as QEMU does, and one at offset 0 as the header's bytes (QEMU opens
  // both); a read-write open refuses them rather than write there.
  const l1Bytes = header.l1Size * 8;
  if (options.writable === true && header.l1Size > 0 && header.l1TableOffset + l1Bytes > fileSize) {
    throw new CorruptImageError(
      `L1 table at ${hex(header.l1TableOffset)} (${l1Bytes} bytes) extends past the end of the file (${fileSize} bytes)`,
      { offset: header.l1TableOffset },
    );
  }
  if (options.writable === true && header.l1Size > 0 && header.l1TableOffset === 0) {
    throw new CorruptImageError("L1 table offset is 0 (it would overlap the header)", {
      offset: 40,
    });
  }
  // Snapshot table.
  let snapshots: SnapshotEntry[] = [];
  let snapshotTableError: Qcow2Metadata["snapshotTableError"];
  if (header.nbSnapshots > 0) {
    // What lies past the end of the file reads as zeros, as QEMU reads it: a table there (or
    // entries running off the end) opens with empty entries, which check reports.
    const avail = Math.max(0, fileSize - header.snapshotsOffset);
    const bytes = new Uint8Array(
      Math.min(avail, MAX_SNAPSHOT_TABLE_BYTES, header.nbSnapshots * (40 + 1024 + 2 * 65535 + 8)),
    );
    if (bytes.byteLength > 0) await backend.read(header.snapshotsOffset, bytes);
    if (options.forCheck === true && header.nbSnapshots > MAX_SNAPSHOTS) {
      snapshotTableError = {
        message: "snapshot table too large",
        hint: `You can force-remove all ${header.nbSnapshots - MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all`,
      };
    } else if (options.forCheck === true) {
      snapshotTableError = tooMuchExtra(bytes, header.nbSnapshots);
    }
    if (snapshotTableError === undefined)
      snapshots = decodeSnapshotTable(
        bytes,
        header.nbSnapshots,
        header.snapshotsOffset,
        header.version,
        { zeroPastEnd: true, maxBytes: MAX_SNAPSHOT_TABLE_BYTES },
      );
  }
  // A snapshot L1 table larger than QEMU loads: the image opens read-only (QEMU fails only
  // when the snapshot is loaded, and check reports it); a read-write open refuses it.
  if (options.writable === true) {
    const i = snapshots.findIndex((s) => s.l1Size > MAX_SNAPSHOT_L1_ENTRIES);
    if (i >= 0) {
      throw new CorruptImageError(
        `qcow2 snapshot entry ${i}: L1 table of ${snapshots[i]!.l1Size} entries is larger than 32 MiB; cannot be opened read/write`,
        { offset: snapshots[i]!.offset + 8 },
      );
    }
  }
  let snapshotsSize = 0;
  if (snapshots.length > 0) {
    const last = snapshots[snapshots.length - 1]!;
    snapshotsSize = last.offset + snapshotEntryBytes(last) - header.snapshotsOffset;
  }
  // Persistent bitmaps (only meaningful while the autoclear bit says the extension is valid).
  let bitmaps: BitmapEntry[] = [];
  let bitmapDirectory: FileRange | undefined;
  const autoclear = AutoclearFeatures.decode(header.autoclearFeatures);
  const bmExt = extensions.find((e) => e.type === ExtensionType.bitmaps);
  if (bmExt && autoclear.has("bitmaps")) {
    if (bmExt.data.byteLength < 24) {
      throw new FormatError(`qcow2 bitmaps extension is ${bmExt.data.byteLength} bytes, needs 24`, {
        offset: bmExt.offset,
      });
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
  let encryptionHeader: FileRange | undefined;
  const fde = extensions.find((e) => e.type === ExtensionType.fullDiskEncryption);
  if (fde !== undefined && fde.data.byteLength >= 16) {
    const d = FdeExtension.decode(fde.data, 0, fde.offset + 8);
    encryptionHeader = { offset: d.offset, length: d.length };
  }
  return {
    header,
    fileSize,
    extensions,
    featureNames,
    backingFilename,
    backingFormat,
    dataFileName,
    snapshots,
    snapshotsSize,
    snapshotTableError,
    bitmaps,
    bitmapDirectory,
    encryptionHeader,
    l2: l2Format({
      clusterBits: header.clusterBits,
      extendedL2: incompat.has("extendedL2"),
      hasDataFile: incompat.has("externalDataFile"),
    }),
  };
}

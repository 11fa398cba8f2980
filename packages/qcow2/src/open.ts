/**
 * Opening an image (QEMU's qcow2_do_open): the header and its extensions, the active L1 table,
 * the snapshot table and the bitmap directory are read and validated, then the backing file
 * and the data file are opened, and for read-write opens the write side is set up.
 */
import {
  CorruptImageError,
  FormatError,
  InvalidArgumentError,
  UnsupportedFeatureError,
  U64TableView,
  hex,
} from "@qimg/structs";
import { noBackingOpenerError } from "@qimg/io";
import type { BlockBackend } from "@qimg/io";
import {
  AutoclearFeatures,
  IncompatibleFeatures,
  decodeHeader,
  validateHeader,
} from "./spec/header.js";
import {
  BitmapsExtension,
  ExtensionType,
  decodeExtensions,
  decodeFeatureNames,
  decodeString,
  decodeStringExtension,
} from "./spec/extensions.js";
import type { FeatureName } from "./spec/extensions.js";
import { decodeSnapshotTable } from "./spec/snapshot.js";
import type { SnapshotEntry } from "./spec/snapshot.js";
import { decodeBitmapDirectory } from "./spec/bitmap-directory.js";
import type { BitmapEntry } from "./spec/bitmap-directory.js";
import { Qcow2State } from "./state.js";
import { initWrite } from "./open-write.js";
import { closeSide } from "./flush.js";
import type { Qcow2OpenOptions } from "./types.js";

const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;

/** Open a qcow2 image. Validates the header, L1 table and snapshot table. */
export async function openState(
  backend: BlockBackend,
  options: Qcow2OpenOptions = {},
): Promise<Qcow2State> {
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
    if (e.type === ExtensionType.featureNameTable) featureNames.push(...decodeFeatureNames(e.data));
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
  const image = new Qcow2State(backend, {
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
    decompress: options.decompress,
    bitmapDirectory,
    noBacking: options.noBacking ?? false,
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
      if (backingFilename !== undefined && !options.openBacking) {
        // Read-only: opened without it; a read that reaches it fails (readBacking). A
        // read-write open would copy on write from it: refused.
        if (writable) throw noBackingOpenerError(backingFilename);
      } else if (backingFilename !== undefined && options.openBacking) {
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
      await closeSide(image);
      throw e;
    }
  }
  if (writable) {
    try {
      await initWrite(image, options);
    } catch (e) {
      await closeSide(image);
      throw e;
    }
  }
  return image;
}

/**
 * Opening an image (QEMU's qcow2_do_open): the metadata is read and validated (layout.ts),
 * then the active L1 table is read, the backing file and the data file are opened, and for
 * read-write opens the write side is set up (open-write.ts).
 */
import { InvalidArgumentError, U64TableView } from "@qimg/structs";
import { noBackingOpenerError } from "@qimg/io";
import type { BlockBackend } from "@qimg/io";
import { readQcow2Metadata } from "./layout.js";
import { Qcow2State } from "./state.js";
import { initWrite } from "./open-write.js";
import { closeSide } from "./flush.js";
import { STALE_BITMAPS_WARNING } from "./types.js";
import type { Qcow2OpenOptions } from "./types.js";
import { AutoclearFeatures } from "./spec/header.js";
import { ExtensionType } from "./spec/extensions.js";

/** Open a qcow2 image. Validates the header, L1 table and snapshot table. */
export async function openState(
  backend: BlockBackend,
  options: Qcow2OpenOptions = {},
): Promise<Qcow2State> {
  const writable = options.readOnly === false;
  const meta = await readQcow2Metadata(backend, {
    writable,
    backingFormat: options.backingFormat,
    noBacking: options.noBacking,
  });
  const { header, backingFilename, backingFormat, dataFileName } = meta;
  if (
    (header.autoclearFeatures & AutoclearFeatures.maskOf("bitmaps")) === 0n &&
    meta.extensions.some((e) => e.type === ExtensionType.bitmaps)
  ) {
    options.onWarning?.(STALE_BITMAPS_WARNING);
  }
  // The active L1 table. What lies past the end of the file reads as zeros (only a read-only
  // open gets here with such a table: layout.ts refuses it read-write).
  const l1 = new U64TableView(new Uint8Array(header.l1Size * 8), "big");
  const inFile = Math.max(0, Math.min(l1.bytes.byteLength, meta.fileSize - header.l1TableOffset));
  if (inFile > 0) await backend.read(header.l1TableOffset, l1.bytes.subarray(0, inFile));
  const image = new Qcow2State(backend, {
    header,
    fileSize: meta.fileSize,
    extensions: meta.extensions,
    featureNames: meta.featureNames,
    l1,
    snapshots: meta.snapshots,
    bitmaps: meta.bitmaps,
    backingFilename,
    backingFormat,
    dataFileName,
    l2CacheBytes: options.l2CacheBytes,
    decompress: options.decompress,
    bitmapDirectory: meta.bitmapDirectory,
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

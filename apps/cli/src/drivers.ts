/**
 * The format drivers the CLI dispatches to, in one file: the one place that maps the CLI's
 * open options onto each library's. Every driver returns the same contract,
 * `WritableDiskImage` from `@qimg/io` (read-only opens refuse writes with a READ_ONLY error).
 */
import { RawImage } from "@qimg/io";
import type { BlockBackend, BlockStatus, DiskImage, WritableDiskImage } from "@qimg/io";
import { Qcow2Image, openQcow2 } from "@qimg/qcow2";
import type {
  BackingOpener,
  BackingRequest,
  BitmapInfo,
  Compressor,
  Qcow2Info,
  SnapshotInfo,
} from "@qimg/qcow2";
import { QedImage, openQed } from "@qimg/qed";
import type { QedInfo } from "@qimg/qed";
import { offloadDecompress } from "./util/decompress-offload.js";

export type {
  BackingOpener,
  BackingRequest,
  BitmapInfo,
  BlockBackend,
  BlockStatus,
  DiskImage,
  Qcow2Info,
  QedInfo,
  SnapshotInfo,
  WritableDiskImage,
};

export interface DriverOpenOptions {
  readonly readOnly: boolean;
  /** Opens backing files; undefined means "do not open the backing file or data file". */
  readonly openBacking: BackingOpener | undefined;
  /** Opens an external data file (qcow2 data_file) by recorded name. */
  readonly openDataFile: (name: string, relativeTo: string) => Promise<BlockBackend>;
  /** qcow2 open options for read-write opens of the top image. */
  readonly qcow2?: Qcow2WriteOptions | undefined;
  /** Told what QEMU warns about at the open (qcow2: a stale bitmaps extension). */
  readonly onWarning?: ((message: string) => void) | undefined;
}

/** The qcow2 write-side open options the CLI passes through (`-o lazy-refcounts=...`, `-t`). */
export interface Qcow2WriteOptions {
  readonly lazyRefcounts?: boolean | undefined;
  readonly writethrough?: boolean | undefined;
  readonly compress?: Compressor | undefined;
}

export function openRaw(backend: BlockBackend, readOnly: boolean): Promise<WritableDiskImage> {
  return RawImage.open(backend, { readOnly });
}

export async function openQcow2Image(
  backend: BlockBackend,
  options: DriverOpenOptions,
): Promise<WritableDiskImage> {
  const extra = options.qcow2;
  const write = {
    ...(extra?.lazyRefcounts !== undefined ? { lazyRefcounts: extra.lazyRefcounts } : {}),
    ...(extra?.writethrough !== undefined ? { writethrough: extra.writethrough } : {}),
    ...(extra?.compress !== undefined ? { compress: extra.compress } : {}),
    // Compressed clusters decode in worker threads once a command has many (see the module).
    decompress: offloadDecompress,
  };
  const onWarning = options.onWarning;
  return options.openBacking === undefined
    ? await openQcow2(backend, { readOnly: options.readOnly, noBacking: true, onWarning, ...write })
    : await openQcow2(backend, {
        readOnly: options.readOnly,
        openBacking: options.openBacking,
        openDataFile: options.openDataFile,
        onWarning,
        ...write,
      });
}

export async function openQedImage(
  backend: BlockBackend,
  options: DriverOpenOptions,
): Promise<WritableDiskImage> {
  return options.openBacking === undefined
    ? await openQed(backend, { readOnly: options.readOnly, noBacking: true })
    : await openQed(backend, { readOnly: options.readOnly, openBacking: options.openBacking });
}

/** The qcow2 facts of an image, or undefined when it is not a qcow2 image. */
export function qcow2InfoOf(image: DiskImage): Qcow2Info | undefined {
  return image instanceof Qcow2Image ? image.info() : undefined;
}

/** The QED facts of an image, or undefined when it is not a QED image. */
export function qedInfoOf(image: DiskImage): QedInfo | undefined {
  return image instanceof QedImage ? image.info() : undefined;
}

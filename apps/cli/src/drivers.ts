/**
 * The format drivers the CLI dispatches to, in one file.
 *
 * The libraries' value exports are read through namespace imports and checked at run time,
 * so a build in which a driver is not exported yet still runs (every other format keeps
 * working, and the missing one fails with a clear message instead of a link error).
 */
import * as io from "@qimg/io";
import * as qcow2 from "@qimg/qcow2";
import * as qed from "@qimg/qed";
import type { BlockBackend, BlockStatus, DiskImage } from "@qimg/io";
import type {
  BackingOpener,
  BackingRequest,
  BitmapInfo,
  Compressor,
  Qcow2Info,
  SnapshotInfo,
} from "@qimg/qcow2";
import { UnsupportedFeatureError } from "@qimg/structs";

export type {
  BackingOpener,
  BackingRequest,
  BitmapInfo,
  BlockBackend,
  BlockStatus,
  DiskImage,
  Qcow2Info,
  SnapshotInfo,
};

/** What `openQed(...).info()` reports. */
export interface QedInfo {
  readonly virtualSize: number;
  readonly clusterSize: number;
  readonly tableSize: number;
  readonly backingFilename?: string | undefined;
  readonly backingFormat?: string | undefined;
  readonly needCheck: boolean;
}

export interface DriverOpenOptions {
  readonly readOnly: boolean;
  /** Opens backing files; undefined means "do not open the backing file or data file". */
  readonly openBacking: BackingOpener | undefined;
  /** Opens an external data file (qcow2 data_file) by recorded name. */
  readonly openDataFile: (name: string, relativeTo: string) => Promise<BlockBackend>;
  /** qcow2 open options for read-write opens of the top image. */
  readonly qcow2?: Qcow2WriteOptions | undefined;
}

/** The qcow2 write-side open options the CLI passes through (`-o lazy-refcounts=...`, `-t`). */
export interface Qcow2WriteOptions {
  readonly lazyRefcounts?: boolean | undefined;
  readonly writethrough?: boolean | undefined;
  readonly compress?: Compressor | undefined;
}

function missing(what: string): never {
  throw new UnsupportedFeatureError(`${what} is not available in this build of qimg`, [what]);
}

export async function openRaw(backend: BlockBackend): Promise<DiskImage> {
  const RawImage = (io as Partial<typeof io>).RawImage;
  if (typeof RawImage !== "function") missing("the raw format driver");
  return RawImage.open(backend);
}

export async function openQcow2Image(
  backend: BlockBackend,
  options: DriverOpenOptions,
): Promise<DiskImage> {
  const open = (qcow2 as Partial<typeof qcow2>).openQcow2;
  if (typeof open !== "function") missing("the qcow2 format driver");
  const extra = options.qcow2;
  const write = {
    ...(extra?.lazyRefcounts !== undefined ? { lazyRefcounts: extra.lazyRefcounts } : {}),
    ...(extra?.writethrough !== undefined ? { writethrough: extra.writethrough } : {}),
    ...(extra?.compress !== undefined ? { compress: extra.compress } : {}),
  };
  return options.openBacking === undefined
    ? open(backend, { readOnly: options.readOnly, noBacking: true, ...write })
    : open(backend, {
        readOnly: options.readOnly,
        openBacking: options.openBacking,
        openDataFile: options.openDataFile,
        ...write,
      });
}

export async function openQedImage(
  backend: BlockBackend,
  options: DriverOpenOptions,
): Promise<DiskImage> {
  const open = (qed as Partial<typeof qed>).openQed;
  if (typeof open !== "function") missing("the QED format driver");
  return open(backend, { readOnly: options.readOnly, openBacking: options.openBacking });
}

/** The qcow2 facts of an image opened by {@link openQcow2Image}. */
export function qcow2InfoOf(image: DiskImage): Qcow2Info {
  return (image as DiskImage & { info(): Qcow2Info }).info();
}

/** The QED facts of an image opened by {@link openQedImage}. */
export function qedInfoOf(image: DiskImage): QedInfo {
  return (image as DiskImage & { info(): QedInfo }).info();
}

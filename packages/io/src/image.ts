import type { BlockBackend } from "./backend.js";

/**
 * The guest-visible status of one extent of a disk image, the facts `qemu-img map` prints.
 */
export interface BlockStatus {
  /** Guest offset where the extent starts. */
  readonly offset: number;
  /** Length of the extent in bytes (> 0). */
  readonly length: number;
  /** Allocated in some layer of the chain (qemu-img map "present"). */
  readonly present: boolean;
  /** Reads as zeros. */
  readonly zero: boolean;
  /** Backed by data in a file (qemu-img map "data"). */
  readonly data: boolean;
  /** Backing depth of the layer that answers (0 = this image). */
  readonly depth: number;
  /** Host offset of the data in `file`, when the data is stored uncompressed and contiguous. */
  readonly hostOffset?: number | undefined;
  /** Name of the file that holds the data, when there is one. */
  readonly file?: string | undefined;
  /** Stored compressed (qcow2 only). */
  readonly compressed?: boolean | undefined;
}

/**
 * A disk image as a guest sees it: every format driver (raw, qcow2, QED) implements this, so
 * images can be backing files of each other and the CLI can treat them alike.
 */
export interface DiskImage {
  /** Format name as qemu-img spells it: "qcow2", "qed", "raw". */
  readonly format: string;
  /** Guest-visible size in bytes. */
  readonly virtualSize: number;
  /** True when the image was opened read-only (writes are refused). */
  readonly readOnly: boolean;
  /** The file the image lives in. */
  readonly backend: BlockBackend;
  /** The image this one reads unallocated ranges from, if any. */
  readonly backing: DiskImage | undefined;

  /** Read `buf.length` guest bytes at `offset`; past `virtualSize` is an error. */
  read(offset: number, buf: Uint8Array): Promise<void>;
  /**
   * Status of the extent that starts at `offset`, at most `length` bytes long (shorter when
   * the status changes). Looks through backing files.
   */
  blockStatus(offset: number, length: number): Promise<BlockStatus>;
  /** Release this image and its backing chain. */
  close(): Promise<void>;
}

/** Options of {@link WritableDiskImage.writeZeroes}. */
export interface WriteZeroesOptions {
  /**
   * Let the format release the clusters instead of writing zeros (qemu-io's `write -z -u`,
   * qemu-img's `BDRV_REQ_MAY_UNMAP`). Default false: the range stays allocated where it was.
   */
  readonly mayUnmap?: boolean | undefined;
}

/**
 * The one contract every format driver implements (raw, qcow2, QED), whether it was opened
 * read-write or not: an image opened read-only refuses every write with an `IoError` of code
 * `READ_ONLY`; any call after `close()` fails with an `IoError` of code `CLOSED`; a request
 * outside `[0, virtualSize]` fails with an `InvalidArgumentError` (see {@link checkRequest}).
 *
 * Every driver opens read-only unless asked for `readOnly: false`.
 */
export interface WritableDiskImage extends DiskImage {
  /**
   * Allocation unit in bytes: the cluster size (qcow2, QED), 512 for raw. Writes aligned to
   * it never need copy-on-write.
   */
  readonly clusterSize: number;
  /** Write `data` at guest offset `offset` (inside `virtualSize`). */
  write(offset: number, data: Uint8Array): Promise<void>;
  /**
   * Make `length` guest bytes at `offset` read as zeros; `mayUnmap` lets the format release
   * the clusters instead of writing zeros.
   */
  writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void>;
  /** Tell the format the range's contents are no longer needed (they may read as zeros or old data). */
  discard(offset: number, length: number): Promise<void>;
  /** Make every completed write durable (metadata in the format's safe order, then a sync). */
  flush(): Promise<void>;
  /**
   * Change the virtual size to `newSize` bytes. Formats refuse what they cannot do (qcow2 and
   * QED do not shrink) with a typed error, before anything changes.
   */
  resize(newSize: number): Promise<void>;
  /**
   * Write one whole cluster compressed (the last cluster of the disk may be shorter). Only
   * formats that store compressed clusters have it (qcow2); a request that is not exactly one
   * cluster fails with an `InvalidArgumentError`.
   */
  writeCompressed?(offset: number, data: Uint8Array): Promise<void>;
}

/**
 * What a format driver asks for when an image names a backing file. Every driver uses this one
 * shape, so a single opener (the CLI's opens files by path and dispatches on format) serves
 * qcow2 and QED alike, and the format packages stay free of Node APIs and of each other.
 */
export interface BackingRequest {
  /** The backing file name exactly as recorded in the image. */
  readonly filename: string;
  /** The recorded (or caller-forced) backing format; undefined when none is known. */
  readonly format: string | undefined;
  /** Name of the image that refers to it (resolve relative names against its directory). */
  readonly relativeTo: string;
  /** Open read-only (backing files always are, unless committing). */
  readonly readOnly: boolean;
  /** How deep this backing file is (1 = direct backing file of the top image). */
  readonly depth: number;
  /** Names of the images already open above it, top first (for cycle detection). */
  readonly chain: readonly string[];
}

/** Opens a backing file for a driver. */
export type BackingOpener = (request: BackingRequest) => Promise<DiskImage>;

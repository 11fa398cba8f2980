/**
 * The public qcow2 driver: {@link Qcow2Image} and {@link openQcow2}. This file is a facade; the
 * driver lives in modules around one shared {@link Qcow2State} (state.ts), split by concern
 * as QEMU splits its own:
 *
 * - open.ts, open-write.ts: opening (header, L1, snapshots, bitmaps; the write side)
 * - cluster-map.ts: guest offset -> extent, the read path, block status
 * - write.ts, alloc.ts, cow.ts: guest writes, L2 allocation, copy on write
 * - zero.ts, compressed.ts, resize.ts: zero writes and discards, compressed writes, growing
 * - flush.ts, dirty.ts: flush and close, lazy refcounts (header fields via header-update.ts)
 * - overlap.ts, bitmap.ts: metadata overlap checks, persistent dirty bitmaps
 */
import type {
  BlockBackend,
  BlockStatus,
  DiskImage,
  WritableDiskImage,
  WriteZeroesOptions,
} from "@qimg/io";
import type { Qcow2Header } from "./spec/header.js";
import type { FeatureName, HeaderExtension } from "./spec/extensions.js";
import type { SnapshotEntry } from "./spec/snapshot.js";
import type { BitmapEntry } from "./spec/bitmap-directory.js";
import type { Qcow2State } from "./state.js";
import { openState } from "./open.js";
import { info } from "./info.js";
import { guestBlockStatus, guestRead } from "./cluster-map.js";
import { guestWrite } from "./write.js";
import { guestDiscard, guestWriteZeroes } from "./zero.js";
import { guestWriteCompressed } from "./compressed.js";
import { resizeImage, resizeWith } from "./resize.js";
import type { Qcow2ResizeOptions } from "./resize.js";
import { closeImage, flushImage } from "./flush.js";
import type { Qcow2Info, Qcow2OpenOptions } from "./types.js";
import { applySnapshot, createSnapshot, deleteSnapshot, openSnapshotView } from "./snapshot.js";
import type { CreateSnapshotOptions, SnapshotSelector, SnapshotViewOptions } from "./snapshot.js";
import {
  addBitmap,
  bitmapDirtyRanges,
  bitmapStatus,
  clearBitmap,
  disableBitmap,
  enableBitmap,
  listBitmaps,
  mergeBitmap,
  removeBitmap,
} from "./bitmap-manage.js";
import type { AddBitmapOptions, DirtyRange, Qcow2BitmapInfo } from "./bitmap-manage.js";
import { amendImage } from "./amend.js";
import type { Qcow2AmendOptions } from "./amend.js";
import { changeBackingFile } from "./backing.js";
import type { BackingFileChange } from "./backing.js";
import { makeEmpty } from "./make-empty.js";

export type { Compressor, Qcow2OpenOptions } from "./types.js";

/**
 * A qcow2 image. Implements {@link WritableDiskImage}: reads return exactly the bytes QEMU
 * returns, `blockStatus` gives the facts `qemu-img map` prints; read-write opens also write,
 * zero, discard, write compressed clusters, resize and flush as QEMU's driver does. Opens are
 * read-only unless `readOnly: false`; read-only opens refuse writes (`READ_ONLY`), and every
 * call after `close()` fails with `CLOSED`.
 */
export class Qcow2Image implements WritableDiskImage {
  readonly format = "qcow2";
  readonly #s: Qcow2State;

  private constructor(s: Qcow2State) {
    this.#s = s;
  }

  /** Open a qcow2 image. Validates the header, L1 table and snapshot table. */
  static async open(backend: BlockBackend, options: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
    return new Qcow2Image(await openState(backend, options));
  }

  /** The file the image lives in. */
  get backend(): BlockBackend {
    return this.#s.backend;
  }

  /** True unless opened read-write (and not since marked corrupt). */
  get readOnly(): boolean {
    return this.#s.readOnly;
  }

  /** The opened backing image, if any. */
  get backing(): DiskImage | undefined {
    return this.#s.backing;
  }

  set backing(image: DiskImage | undefined) {
    this.#s.backing = image;
  }

  /** Location of the bitmap directory, when the bitmaps extension is valid. */
  get bitmapDirectory(): { readonly offset: number; readonly length: number } | undefined {
    return this.#s.bitmapDirectory;
  }

  /** Cluster size in bytes (2^clusterBits). */
  get clusterSize(): number {
    return this.#s.clusterSize;
  }

  /** log2 of the cluster size, from the header. */
  get clusterBits(): number {
    return this.#s.clusterBits;
  }

  /** Header extensions as found at open, unknown ones included (kept on header rewrites). */
  get extensions(): readonly HeaderExtension[] {
    return this.#s.extensions;
  }

  /** The feature-name table extension's entries (empty when the image has none). */
  get featureNames(): readonly FeatureName[] {
    return this.#s.featureNames;
  }

  /** Internal snapshots as found at open, in table order. */
  get snapshots(): readonly SnapshotEntry[] {
    return this.#s.snapshots;
  }

  /** Persistent dirty bitmaps' directory entries as found at open (empty when not valid). */
  get bitmaps(): readonly BitmapEntry[] {
    return this.#s.bitmaps;
  }

  /** The backing file name stored in the header, if any. */
  get backingFilename(): string | undefined {
    return this.#s.backingFilename;
  }

  /** The backing format from the backing-format extension, if any. */
  get backingFormat(): string | undefined {
    return this.#s.backingFormat;
  }

  /** The external data file's name from its extension, if the image has one. */
  get dataFileName(): string | undefined {
    return this.#s.dataFileName;
  }

  /** Guest-visible size in bytes (whole 512-byte sectors). */
  get virtualSize(): number {
    return this.#s.size;
  }

  /** The current header (it changes on read-write opens: dirty bit, moved tables). */
  get header(): Qcow2Header {
    return this.#s.hdr;
  }

  /** The facts `qemu-img info` shows. */
  info(): Qcow2Info {
    return info(this.#s);
  }

  /** Read guest bytes. Ranges past `virtualSize` are refused. */
  read(offset: number, buf: Uint8Array): Promise<void> {
    return guestRead(this.#s, offset, buf);
  }

  /** The status of the extent at `offset` (at most `length` bytes), looking through backing files. */
  blockStatus(offset: number, length: number): Promise<BlockStatus> {
    return guestBlockStatus(this.#s, offset, length);
  }

  /** Write guest bytes. Allocates (copying on write) where the clusters are not writable in place. */
  write(offset: number, data: Uint8Array): Promise<void> {
    return guestWrite(this.#s, offset, data);
  }

  /**
   * Make [offset, +length) read as zeros. Whole clusters (subclusters with extended L2) get
   * the zero flag on version 3 images (released when `mayUnmap`); partial ones are written
   * with zero bytes.
   */
  writeZeroes(offset: number, length: number, options: WriteZeroesOptions = {}): Promise<void> {
    return guestWriteZeroes(this.#s, offset, length, options);
  }

  /**
   * Discard [offset, +length): whole clusters only (as QEMU). The clusters are released; they
   * read as zeros afterwards (unallocated without a backing file on version 2). A version 2
   * image with a backing file has no way to make a released cluster read as zeros (no zero
   * flag), so there the discard does nothing, as QEMU's (which reports success).
   */
  discard(offset: number, length: number): Promise<void> {
    return guestDiscard(this.#s, offset, length);
  }

  /**
   * Write one whole cluster compressed (the last cluster of the disk may be shorter and is
   * padded). Falls back to a normal write when compression does not pay.
   */
  writeCompressed(offset: number, data: Uint8Array): Promise<void> {
    return guestWriteCompressed(this.#s, offset, data);
  }

  /**
   * Grow the disk to `newSize` bytes (a multiple of 512). When the L1 table is too small, a
   * larger one is written and synced before the header points at it; the old one is freed
   * afterwards. Shrinking is refused (data would be lost).
   */
  resize(newSize: number): Promise<void> {
    return resizeImage(this.#s, newSize);
  }

  /**
   * Make every completed write durable, in the order that keeps the image consistent: refcount
   * blocks, then L2 tables, then the L1 table, then a sync; only then are freed clusters'
   * refcounts lowered.
   */
  flush(): Promise<void> {
    return flushImage(this.#s);
  }

  /**
   * Close the image. A read-write image is closed cleanly: every cache is flushed, pending
   * refcount decrements are applied, and the dirty bit is cleared.
   */
  close(): Promise<void> {
    return closeImage(this.#s);
  }

  // Internal snapshots (snapshot.ts).

  /**
   * Create an internal snapshot named `name` of the active image (read-write opens; as
   * `qemu-img snapshot -c`). Returns the new table entry (its ID is the largest numeric ID
   * + 1). Crash-safe: a crash leaves the old or the new snapshot table in effect.
   */
  createSnapshot(name: string, options: CreateSnapshotOptions = {}): Promise<SnapshotEntry> {
    return createSnapshot(this.#s, name, options);
  }

  /**
   * Revert the active image to a snapshot (as `qemu-img snapshot -a`): a string is an ID
   * first, else a name; the disk size becomes the snapshot's. Returns the snapshot applied.
   */
  applySnapshot(snapshot: SnapshotSelector | string): Promise<SnapshotEntry> {
    return applySnapshot(this.#s, snapshot);
  }

  /**
   * Delete a snapshot (`qemu-img snapshot -d NAME` is `{ name }`), freeing the clusters only
   * it used. Returns the deleted entry.
   */
  deleteSnapshot(snapshot: SnapshotSelector): Promise<SnapshotEntry> {
    return deleteSnapshot(this.#s, snapshot);
  }

  /**
   * A read-only view of a snapshot (a string is an ID first, else a name): its guest bytes
   * and block status, at the snapshot's disk size (or the image's, `size: "image"`, as
   * `qemu-img convert -l` reads it). Closing the view leaves this image open.
   */
  openSnapshot(
    snapshot: SnapshotSelector | string,
    options: SnapshotViewOptions = {},
  ): Promise<DiskImage & { readonly snapshot: SnapshotEntry }> {
    return openSnapshotView(this.#s, snapshot, options);
  }

  // Persistent bitmap management (bitmap-manage.ts).

  /**
   * Every persistent bitmap (name, granularity, flags). On a read-write open this is the
   * list as this open changed it (added and removed bitmaps included); `inUse` marks a bitmap
   * that was already in use on disk when opened (inconsistent: it can only be removed).
   */
  listBitmaps(): Qcow2BitmapInfo[] {
    return listBitmaps(this.#s);
  }

  /**
   * The dirty extents of bitmap `name` overlapping guest bytes [offset, +length) (default:
   * the whole disk), clipped to that window, merged, in order. On a read-write open the live
   * bits: stored ones plus those this open's writes set. Refuses an unknown or inconsistent
   * bitmap with QEMU's message.
   */
  bitmapDirtyRanges(name: string, offset = 0, length?: number): Promise<DirtyRange[]> {
    return bitmapDirtyRanges(this.#s, name, offset, length);
  }

  /**
   * One extent of bitmap `name` from `offset`: whether it is dirty and for how many bytes
   * (at most `length`, clipped to the disk) — NBD block status for `qemu:dirty-bitmap:NAME`.
   */
  bitmapStatus(
    name: string,
    offset: number,
    length: number,
  ): Promise<{ length: number; dirty: boolean }> {
    return bitmapStatus(this.#s, name, offset, length);
  }

  /** Add an empty persistent bitmap (read-write opens; stored at the clean close). */
  addBitmap(name: string, options: AddBitmapOptions = {}): void {
    addBitmap(this.#s, name, options);
  }

  /** Remove a persistent bitmap, inconsistent or not (its clusters are freed at the close). */
  removeBitmap(name: string): void {
    removeBitmap(this.#s, name);
  }

  /** Clear every bit of a bitmap. */
  clearBitmap(name: string): void {
    clearBitmap(this.#s, name);
  }

  /** Let guest writes set the bitmap's bits (the AUTO flag). */
  enableBitmap(name: string): void {
    enableBitmap(this.#s, name);
  }

  /** Stop guest writes from setting the bitmap's bits. */
  disableBitmap(name: string): void {
    disableBitmap(this.#s, name);
  }

  /**
   * Set in bitmap `target` the bits covering every dirty range of bitmap `source` — of this
   * image, or of `from` (same virtual size; granularities may differ).
   */
  mergeBitmap(target: string, source: string, from?: Qcow2Image): Promise<void> {
    return mergeBitmap(this.#s, target, source, from ? from.#s : this.#s);
  }

  // qemu-img amend (amend.ts).

  /**
   * Change image options as `qemu-img amend -o` does (compat, lazy_refcounts, refcount_bits,
   * data_file, data_file_raw, size; the backing file only to itself). Every refusal comes
   * before the first write. See {@link Qcow2AmendOptions}.
   */
  amend(options: Qcow2AmendOptions): Promise<void> {
    return amendImage(this.#s, options);
  }

  // Resizing with shrink and preallocation (resize.ts, shrink.ts).

  /**
   * Resize with qemu-img's options: a smaller size needs `{ shrink: true }` and then discards
   * everything past the new end, frees the L2 tables and refcount blocks no longer needed and
   * truncates the file after the last cluster in use (QEMU's qcow2_co_truncate); a larger
   * size may preallocate the new area (`preallocation`). Refusals use qemu-img's wording.
   */
  resizeWith(newSize: number, options: Qcow2ResizeOptions = {}): Promise<void> {
    return resizeWith(this.#s, newSize, options);
  }

  // Backing file changes and making the image empty (backing.ts, make-empty.ts).

  /**
   * Record a new backing file name and format in the header, or remove the backing file
   * (`filename` undefined), crash-safely (read-write opens only; see backing.ts). Guest data
   * is not touched: assign {@link Qcow2Image.backing} to read through the new backing image.
   */
  changeBackingFile(change: BackingFileChange): Promise<void> {
    return changeBackingFile(this.#s, change);
  }

  /**
   * Make every guest cluster unallocated (QEMU's bdrv_make_empty, full discard), so the image
   * reads as its backing file; the freed clusters' refcounts drop once the change is durable.
   */
  makeEmpty(): Promise<void> {
    return makeEmpty(this.#s);
  }

  /** @internal The shared driver state, for the package's own modules (not exported from index.ts). */
  static stateOf(image: Qcow2Image): Qcow2State {
    return image.#s;
  }
}

/** @internal The driver state behind `image`, for modules of this package that work on a whole image. */
export function qcow2State(image: Qcow2Image): Qcow2State {
  return Qcow2Image.stateOf(image);
}

/** Open a qcow2 image (read-only unless `readOnly: false`). */
export function openQcow2(
  backend: BlockBackend,
  options: Qcow2OpenOptions = {},
): Promise<Qcow2Image> {
  return Qcow2Image.open(backend, options);
}

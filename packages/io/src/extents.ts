/**
 * Walking an image's block status: the one loop every copy, map and compare uses.
 *
 * {@link StatusCursor} asks the driver for the status at an offset and remembers the answer, so
 * a caller that steps through the image in pieces smaller than the driver's extents (a copy in
 * 2 MiB chunks, a compare limited by the other image) asks once per extent, not once per piece.
 * {@link ExtentIterator} merges what the cursor sees into runs that read as zeros and runs that
 * hold data, each at most `maxLength` long. Both keep their state in a few numbers that they
 * update in place: walking allocates nothing per extent beyond what the driver's `blockStatus`
 * returns.
 */
import { InvalidArgumentError } from "@qimg/structs";
import type { BlockStatus, DiskImage } from "./image.js";

/** What the walkers need of an image. */
export type StatusSource = Pick<DiskImage, "blockStatus" | "virtualSize">;

/** The longest range one `blockStatus` call is asked about (qemu-img's map asks for 1 GiB). */
export const MAX_STATUS_PROBE = 1024 ** 3;

/**
 * The block status of an image at increasing (or repeated) offsets, one driver call per
 * extent: {@link StatusCursor.at} answers from the last status while the offset lies inside it.
 */
export class StatusCursor {
  /** The last status the driver returned (undefined before the first call). */
  status: BlockStatus | undefined = undefined;
  /** Where {@link status} ends (its offset plus length). */
  end = 0;
  private readonly limit: number;

  /**
   * @param image the image to ask.
   * @param end where the walk stops (default: the virtual size); statuses are asked for no
   *   further than this.
   * @param probe the longest range asked about in one call (default {@link MAX_STATUS_PROBE}).
   */
  constructor(
    private readonly image: StatusSource,
    end: number = image.virtualSize,
    private readonly probe: number = MAX_STATUS_PROBE,
  ) {
    if (!Number.isSafeInteger(end) || end < 0 || end > image.virtualSize) {
      throw new InvalidArgumentError(
        `extent walk end ${end} is outside the ${image.virtualSize}-byte image`,
      );
    }
    if (!Number.isSafeInteger(probe) || probe <= 0) {
      throw new InvalidArgumentError(`invalid block status probe length ${probe}`);
    }
    this.limit = end;
  }

  /**
   * The status covering `offset` (which must be below the walk's end): the cached one when
   * `offset` lies inside it, else the driver's answer for `[offset, min(end, offset + probe))`.
   * The result may start before `offset`; it ends at {@link end}.
   */
  async at(offset: number): Promise<BlockStatus> {
    const s = this.status;
    if (s !== undefined && offset >= s.offset && offset < this.end) return s;
    if (offset < 0 || offset >= this.limit) {
      throw new InvalidArgumentError(
        `block status asked at ${offset}, outside [0, ${this.limit}) of the walk`,
      );
    }
    const next = await this.image.blockStatus(offset, Math.min(this.probe, this.limit - offset));
    const end = next.offset + next.length;
    if (next.length <= 0 || next.offset > offset || end <= offset) {
      throw new InvalidArgumentError(
        `blockStatus at ${offset} returned the extent [${next.offset}, +${next.length}), which does not cover it`,
      );
    }
    this.status = next;
    this.end = Math.min(end, this.limit);
    return next;
  }

  /** Whether `[offset, end)` reads as zeros throughout (asks no further than needed). */
  async allZero(offset: number, end: number): Promise<boolean> {
    let pos = offset;
    while (pos < end) {
      const s = await this.at(pos);
      if (!s.zero) return false;
      pos = this.end;
    }
    return true;
  }
}

/** Options of {@link ExtentIterator}. */
export interface ExtentIteratorOptions {
  /** Where the walk starts (default 0). */
  readonly from?: number;
  /** Where it ends (default: the virtual size). */
  readonly to?: number;
  /** The longest run returned at once (default: unbounded); longer runs come in pieces. */
  readonly maxLength?: number;
  /** The longest range asked about in one `blockStatus` call. */
  readonly probe?: number;
  /**
   * Do not ask for block status: everything is one data run (cut at `maxLength`). For images
   * whose block status costs as much as reading the data (a raw file has no allocation
   * metadata: its status is found by reading), when the caller reads the data anyway.
   */
  readonly assumeData?: boolean;
}

/**
 * The runs of an image that read as zeros and those that hold data, in order, adjacent
 * extents of the same kind merged (a compressed cluster is an extent of its own; a run of
 * them is one data run), each run at most `maxLength` long.
 *
 * ```ts
 * const it = new ExtentIterator(image, { maxLength: 2 << 20 });
 * while (await it.next()) if (!it.zero) copy(it.offset, it.length);
 * ```
 */
export class ExtentIterator {
  /** Start of the current run. */
  offset: number;
  /** Length of the current run (0 before the first {@link next} and after the last). */
  length = 0;
  /** Whether the current run reads as zeros. */
  zero = false;
  private readonly cursor: StatusCursor | undefined;
  private readonly to: number;
  private readonly maxLength: number;
  /** Where the next run starts. */
  private pos: number;

  constructor(image: StatusSource, options: ExtentIteratorOptions = {}) {
    const from = options.from ?? 0;
    this.to = options.to ?? image.virtualSize;
    this.maxLength = options.maxLength ?? Number.MAX_SAFE_INTEGER;
    if (!Number.isSafeInteger(from) || from < 0 || from > this.to) {
      throw new InvalidArgumentError(`extent walk start ${from} is outside [0, ${this.to}]`);
    }
    if (!Number.isSafeInteger(this.maxLength) || this.maxLength <= 0) {
      throw new InvalidArgumentError(`invalid extent length limit ${this.maxLength}`);
    }
    this.cursor =
      options.assumeData === true ? undefined : new StatusCursor(image, this.to, options.probe);
    this.offset = from;
    this.pos = from;
  }

  /** Step to the next run; false (and `length` 0) at the end. */
  async next(): Promise<boolean> {
    const start = this.pos;
    this.offset = start;
    if (start >= this.to) {
      this.length = 0;
      return false;
    }
    const limit = Math.min(this.to, start + this.maxLength);
    const cursor = this.cursor;
    if (cursor === undefined) {
      this.zero = false;
    } else {
      const zero = (await cursor.at(start)).zero;
      this.zero = zero;
      let end = cursor.end;
      // Join the following extents of the same kind, up to the limit.
      while (end < limit && (await cursor.at(end)).zero === zero) end = cursor.end;
      this.pos = Math.min(end, limit);
      this.length = this.pos - start;
      return true;
    }
    this.pos = limit;
    this.length = limit - start;
    return true;
  }

  /** Whether `[offset, end)` (at or past the current run's start) reads as zeros throughout. */
  allZero(offset: number, end: number): Promise<boolean> {
    if (this.cursor === undefined) return Promise.resolve(offset >= end);
    return this.cursor.allZero(offset, end);
  }
}

/**
 * The one copy engine of the CLI: `convert` (to raw, qcow2 and QED) and `dd` copy a guest
 * range of a source image into a sink through {@link copy}.
 *
 * The range is cut into chunks on a fixed grid (2 MiB, or the sink's block size when larger).
 * A chunk the source reports as zeros (its block status, walked once per extent) is not read;
 * the others are read ahead, several at once on the thread pool, and scanned in blocks of the
 * sink's size: runs of data blocks are written together, runs of zero blocks are skipped (or
 * handed to the sink's `zero` when the sink would not read zeros there, e.g. over a backing
 * file). Writes are issued in guest order (an image sink allocates its clusters
 * sequentially), several in flight; with `outOfOrder` (qemu-img's `-W`) a chunk is written as
 * soon as its read finishes.
 *
 * The options carry qemu-img convert's knobs: `minSparse` (`-S`: the shortest run of zeros left
 * unwritten; 0 writes every byte), `inFlight`/`readAhead` (`-m`), `rateLimit` (`-r`),
 * `onReadError` (`--salvage`: unreadable sectors are copied as zeros and reported) and
 * `leaveAlone` (`-B`: ranges the target already shows through its backing file).
 */
import { alignedBuffers, ExtentIterator, StatusCursor, type WritableDiskImage } from "@qimg/io";
import type { BlockBackend, DiskImage } from "../drivers.js";
import { inFile } from "../errors.js";
import { RateLimiter } from "./rate-limit.js";
import { isZero } from "./zero.js";

/** Read size: qemu-img uses 2 MiB buffers too. */
export const COPY_CHUNK = 2 * 1024 * 1024;
/** Zero-detection granularity of a raw sink (a file system block). */
export const RAW_ZERO_BLOCK = 4096;
/**
 * Writes in flight by default. With the reads ahead that keeps every thread of libuv's pool
 * (4) busy, and the chunk buffers at 8 x 2 MiB (qemu-img convert's 8 requests of 2 MiB).
 */
const WRITES_IN_FLIGHT = 4;
/** Chunks read ahead of the one being written. */
const READ_AHEAD = 3;
/** The unit in which a salvaging copy re-reads a chunk that failed (qemu-img: a sector). */
export const SALVAGE_UNIT = 512;

/** A byte range `[start, end)`. */
export interface CopyRange {
  readonly start: number;
  readonly end: number;
}

/** Where a copy writes. */
export interface CopySink {
  /**
   * Zero-detection granularity and alignment (relative to the start of the copy): blocks of
   * this size that read as zeros are not written. An image's cluster size; 4 KiB for a file.
   */
  readonly blockSize: number;
  /** Write `data` at `offset` (relative to the sink). */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Write one block compressed (only asked for when the copy compresses). */
  readonly writeCompressed?: ((offset: number, data: Uint8Array) => Promise<void>) | undefined;
  /**
   * Make `[offset, +length)` read as zeros. Undefined when the sink reads zeros wherever
   * nothing is written (a new file, an image without a backing file): zeros are then skipped.
   */
  readonly zero?: ((offset: number, length: number) => Promise<void>) | undefined;
}

/** Options of {@link copy}. */
export interface CopyOptions {
  /** First source byte to copy (default 0). */
  readonly from?: number;
  /** End of the source range (default: the source's virtual size). */
  readonly to?: number;
  /**
   * Bytes of the sink the copy covers, from its offset 0 (default `to - from`). Past the
   * source range the sink is given zeros: a last partial block is written padded with them.
   */
  readonly length?: number;
  /** Write data blocks compressed (the sink must have `writeCompressed`). */
  readonly compress?: boolean;
  /** Writes in flight at most (default 4). */
  readonly inFlight?: number;
  /** Chunks read ahead of the one being written (default 3). */
  readonly readAhead?: number;
  /** Write each chunk as soon as it is read, in any order (qemu-img convert `-W`). */
  readonly outOfOrder?: boolean;
  /**
   * The shortest run of zero bytes left unwritten (qemu-img convert `-S`): shorter runs of
   * zero blocks are written like data. 0 writes every byte, zero ranges of the source
   * included. Default: every zero block of the sink's size is left unwritten.
   */
  readonly minSparse?: number;
  /** Bytes per second handed to the sink at most (qemu-img `-r`); undefined: no limit. */
  readonly rateLimit?: number | undefined;
  /**
   * Salvage mode (qemu-img convert `--salvage`): a chunk whose read fails is read again in
   * sectors of {@link SALVAGE_UNIT} bytes; each sector that still fails is copied as zeros and
   * passed here (its source offset and the error), and the copy goes on. A block-status
   * failure makes the chunk read as data. Undefined: the first error ends the copy.
   */
  readonly onReadError?: ((offset: number, error: unknown) => void) | undefined;
  /**
   * With `onReadError` (salvage mode): told of each sector whose block status cannot be read,
   * as qemu-img warns of them: once in a first walk over the whole range (qemu-img's count of
   * the work), then again during the copy, just before that sector's read.
   */
  readonly onStatusError?: ((offset: number, error: unknown) => void) | undefined;
  /**
   * The parts of a data chunk (source offsets; given the bytes read there) that the sink
   * already shows as they are, so they are not written (`convert -B`: ranges the target's
   * backing file provides). Blocks wholly inside them are left alone.
   */
  readonly leaveAlone?:
    ((offset: number, data: Uint8Array) => Promise<readonly CopyRange[]>) | undefined;
  /** Wrap the source's read and block-status errors with this file name (CLI messages). */
  readonly sourceName?: string;
  /** Called with the number of sink bytes handled so far, in order. */
  readonly onProgress?: (done: number) => void;
}

/**
 * Whether asking `image` for block status saves work. A raw image has no allocation metadata:
 * its block status reads the data to find zeros, so a copy that reads the data anyway would
 * read it twice; copies detect zeros in the data they read instead.
 */
export function blockStatusPays(image: DiskImage): boolean {
  return !(image.format === "raw" && image.backing === undefined);
}

/**
 * A raw file as a sink: holes read as zeros (the file was freshly truncated). `blockSize` is
 * the zero-detection granularity (default {@link RAW_ZERO_BLOCK}).
 */
export function rawSink(target: BlockBackend, blockSize = RAW_ZERO_BLOCK): CopySink {
  return { blockSize, write: (offset, data) => target.write(offset, data) };
}

/** `e` as an Error (rejections are errors here; anything else is wrapped). */
function asError(e: unknown): Error {
  return e instanceof Error ? e : new Error("request failed", { cause: e });
}

/** `ranges` sorted, with touching and overlapping ones joined. */
function mergeRanges(ranges: readonly CopyRange[]): CopyRange[] {
  const out: CopyRange[] = [];
  for (const r of [...ranges].sort((a, b) => a.start - b.start)) {
    const last = out[out.length - 1];
    if (last !== undefined && r.start <= last.end) {
      out[out.length - 1] = { start: last.start, end: Math.max(last.end, r.end) };
    } else {
      out.push(r);
    }
  }
  return out;
}

/** One chunk on its way: read (or known zero), then written. */
interface Chunk {
  readonly offset: number;
  readonly end: number;
  /** The chunk's buffer (undefined for a chunk the source reports as zeros). */
  readonly buf: Uint8Array | undefined;
  readonly slot: number;
  readonly read: Promise<void> | undefined;
  /** Set once `read` has settled (out-of-order copies take the first ready chunk). */
  ready: boolean;
}

/** Block kinds of a chunk being written. */
const DATA = 0;
const ZERO = 1;
const KEEP = 2;

/** Copy guest bytes `[from, to)` of `source` to `sink` at offset 0 (see the module comment). */
export async function copy(
  source: DiskImage,
  sink: CopySink,
  options: CopyOptions = {},
): Promise<void> {
  const from = options.from ?? 0;
  const to = options.to ?? source.virtualSize;
  const length = options.length ?? to - from;
  const bs = sink.blockSize;
  const chunkSize = Math.max(COPY_CHUNK, bs) - (Math.max(COPY_CHUNK, bs) % bs);
  const compress = options.compress === true;
  const writeCompressed = sink.writeCompressed;
  if (compress && writeCompressed === undefined) throw new Error("sink cannot compress");
  const maxInFlight = Math.max(1, options.inFlight ?? WRITES_IN_FLIGHT);
  const readAhead = Math.max(1, options.readAhead ?? READ_AHEAD);
  const minSparse = options.minSparse;
  const salvage = options.onReadError;
  const leaveAlone = options.leaveAlone;
  const limiter =
    options.rateLimit === undefined || options.rateLimit <= 0
      ? undefined
      : new RateLimiter(options.rateLimit);
  const onSource = <T>(fn: () => Promise<T>): Promise<T> =>
    options.sourceName === undefined ? fn() : inFile(options.sourceName, fn);
  const extents = new ExtentIterator(source, {
    from,
    to,
    assumeData: !blockStatusPays(source),
  });

  // Requests in flight, and the first failure among them.
  const inflight = new Set<Promise<void>>();
  let failure: unknown;
  const settle = (): void => {
    if (failure !== undefined) throw asError(failure);
  };
  const issue = async (p: Promise<void>, slot: number): Promise<void> => {
    if (slot >= 0) slotUsers[slot]!++;
    const tracked: Promise<void> = p.then(
      () => done(tracked, slot),
      (e: unknown) => {
        failure ??= e;
        done(tracked, slot);
      },
    );
    inflight.add(tracked);
    while (inflight.size >= maxInFlight) await Promise.race(inflight);
    settle();
  };
  /** Start a data write (after the rate limit lets it go). */
  const write = async (offset: number, data: Uint8Array, slot: number): Promise<void> => {
    await limiter?.take(data.length);
    await issue(sink.write(offset, data), slot);
  };
  const writeOneCompressed = async (
    offset: number,
    data: Uint8Array,
    slot: number,
  ): Promise<void> => {
    await limiter?.take(data.length);
    await issue(writeCompressed!(offset, data), slot);
  };
  // Page-aligned chunk buffers, mapped once on first use; a slot is free again when every
  // write issued from it has finished.
  const slots = maxInFlight + readAhead + 1;
  let buffers: Uint8Array[] | undefined;
  const slotUsers = new Array<number>(slots).fill(0);
  const freeSlots: number[] = [];
  let slotWaiter: (() => void) | undefined;
  let nextFresh = 0;
  /** Drop one user of `slot` (a write from it, or the chunk's own hold while it is issued). */
  const release = (slot: number): void => {
    if (slot >= 0 && --slotUsers[slot]! === 0) {
      freeSlots.push(slot);
      slotWaiter?.();
    }
  };
  const done = (p: Promise<void>, slot: number): void => {
    inflight.delete(p);
    release(slot);
  };
  const takeSlot = async (): Promise<number> => {
    if (nextFresh < slots) return nextFresh++;
    while (freeSlots.length === 0) {
      await new Promise<void>((resolve) => (slotWaiter = resolve));
      slotWaiter = undefined;
    }
    return freeSlots.pop()!;
  };

  const onStatusError = options.onStatusError;
  /** A salvage warning: a sector whose read (or block status) failed. */
  type Failure = { readonly status: boolean; readonly offset: number; readonly error: unknown };
  /** Read `buf` at `offset` sector by sector: each one that fails is zeros and noted. */
  const readSectors = async (offset: number, buf: Uint8Array, out: Failure[]): Promise<void> => {
    for (let pos = 0; pos < buf.length; pos += SALVAGE_UNIT) {
      const piece = buf.subarray(pos, Math.min(buf.length, pos + SALVAGE_UNIT));
      try {
        await source.read(offset + pos, piece);
      } catch (e) {
        piece.fill(0);
        out.push({ status: false, offset: offset + pos, error: e });
      }
    }
  };
  /**
   * Read `buf` at `offset`. Salvaging, a chunk whose read (or block status) failed is read
   * again extent by extent as qemu-img does: a sector whose status fails is noted and read
   * alone, a failed read is retried sector by sector (zeros where that fails too). What failed
   * is reported once the chunk before (`before`) has reported, so warnings come in offset
   * order while reads still run in parallel.
   */
  const readChunk = async (
    offset: number,
    buf: Uint8Array,
    statusBroken: boolean,
    before: Promise<void>,
    reported: () => void,
  ): Promise<void> => {
    if (!statusBroken) {
      try {
        await onSource(() => source.read(offset, buf));
        void before.then(reported); // nothing to report
        return;
      } catch (e) {
        if (salvage === undefined) {
          void before.then(reported);
          throw e;
        }
      }
    }
    const failures: Failure[] = [];
    const end = offset + buf.length;
    for (let pos = offset; pos < end;) {
      let stop: number;
      try {
        const s = await source.blockStatus(pos, end - pos);
        stop = Math.min(end, Math.max(pos + 1, s.offset + s.length));
      } catch (e) {
        failures.push({ status: true, offset: pos, error: e });
        stop = Math.min(end, pos + SALVAGE_UNIT);
      }
      const part = buf.subarray(pos - offset, stop - offset);
      try {
        await source.read(pos, part);
      } catch {
        await readSectors(pos, part, failures);
      }
      pos = stop;
    }
    await before;
    for (const f of failures) {
      if (f.status) onStatusError?.(f.offset, f.error);
      else salvage!(f.offset, f.error);
    }
    reported();
  };
  /** Settles once the last data chunk has reported its salvage warnings (in offset order). */
  let lastReport: Promise<void> = Promise.resolve();
  /** Whether the source reports `[offset, end)` as zeros; undefined when its status failed (salvaging). */
  const knownZero = async (offset: number, end: number): Promise<boolean | undefined> => {
    // -S 0 writes every byte: zero ranges are read (as zeros) and written like data.
    if (minSparse === 0) return false;
    try {
      return await onSource(() => extents.allZero(offset, end));
    } catch (e) {
      if (salvage === undefined) throw e;
      return undefined;
    }
  };
  /** Salvaging: qemu-img's first walk, reporting each sector whose status cannot be read. */
  const walkStatus = async (): Promise<void> => {
    const stop = Math.min(to, from + length);
    for (let pos = from; pos < stop;) {
      try {
        const s = await source.blockStatus(pos, Math.min(stop - pos, 1024 ** 3));
        pos = Math.max(pos + 1, s.offset + s.length);
      } catch (e) {
        onStatusError!(pos, e);
        pos = Math.min(stop, Math.floor(pos / SALVAGE_UNIT) * SALVAGE_UNIT + SALVAGE_UNIT);
      }
    }
  };

  const ahead: Chunk[] = [];
  let planned = from;
  const end = from + length;
  const srcStop = Math.min(to, end);
  /** Plan the next chunk: note it as zero, or start reading it. False at the end. */
  const startNext = async (): Promise<boolean> => {
    if (planned >= end) return false;
    const offset = planned;
    const chunkEnd = Math.min(end, offset + chunkSize);
    planned = chunkEnd;
    const dataEnd = Math.min(chunkEnd, srcStop);
    const zeroChunk = offset >= dataEnd ? minSparse !== 0 : await knownZero(offset, dataEnd);
    if (zeroChunk === true) {
      ahead.push({ offset, end: chunkEnd, buf: undefined, slot: -1, read: undefined, ready: true });
      return true;
    }
    const slot = await takeSlot();
    slotUsers[slot] = 1; // held until every write from it has been issued
    buffers ??= alignedBuffers(slots, chunkSize);
    const buf = buffers[slot]!.subarray(0, chunkEnd - offset);
    // Past the source's range the sink gets zeros (the buffer is reused: clear it).
    buf.fill(0, Math.max(0, dataEnd - offset));
    let read: Promise<void> | undefined;
    if (offset < dataEnd) {
      const before = lastReport;
      let reported!: () => void;
      lastReport = new Promise<void>((resolve) => (reported = resolve));
      read = readChunk(
        offset,
        buf.subarray(0, dataEnd - offset),
        zeroChunk === undefined,
        before,
        reported,
      );
    }
    const chunk: Chunk = { offset, end: chunkEnd, buf, slot, read, ready: read === undefined };
    read?.then(
      () => (chunk.ready = true),
      () => (chunk.ready = true),
    );
    ahead.push(chunk);
    return true;
  };
  /** The next chunk to write: the first one, or (out of order) the first one read. */
  const takeNext = async (): Promise<Chunk> => {
    if (options.outOfOrder === true) {
      for (;;) {
        const i = ahead.findIndex((c) => c.ready);
        if (i >= 0) return ahead.splice(i, 1)[0]!;
        await Promise.race(ahead.map((c) => (c.read ?? Promise.resolve()).catch(() => undefined)));
      }
    }
    return ahead.shift()!;
  };

  // Zero runs shorter than this (in bytes) are written like data.
  const sparseMin = minSparse === undefined || minSparse === 0 ? 0 : minSparse;
  const zero = sink.zero;
  let progressed = 0;
  if (salvage !== undefined && onStatusError !== undefined && blockStatusPays(source)) {
    await walkStatus();
  }
  try {
    while (ahead.length < readAhead && (await startNext()));
    while (ahead.length > 0) {
      const chunk = await takeNext();
      const base = chunk.offset - from;
      const buf = chunk.buf;
      if (buf === undefined) {
        if (zero !== undefined) await issue(zero(base, chunk.end - chunk.offset), -1);
      } else {
        await chunk.read;
        const slot = chunk.slot;
        const n = buf.length;
        const blocks = Math.ceil(n / bs);
        const kind = new Uint8Array(blocks);
        for (let i = 0; i < blocks; i++) {
          kind[i] = minSparse !== 0 && isZero(buf, i * bs, Math.min(n, (i + 1) * bs)) ? ZERO : DATA;
        }
        if (leaveAlone !== undefined && chunk.offset < srcStop) {
          const dataEnd = Math.min(chunk.end, srcStop);
          const ranges = await onSource(() =>
            leaveAlone(chunk.offset, buf.subarray(0, dataEnd - chunk.offset)),
          );
          for (const r of mergeRanges(ranges)) {
            const first = Math.ceil((r.start - chunk.offset) / bs);
            const last = Math.floor((Math.min(r.end, dataEnd) - chunk.offset) / bs);
            const tail = Math.min(r.end, dataEnd) === chunk.end ? blocks : last;
            for (let i = Math.max(0, first); i < tail; i++) kind[i] = KEEP;
          }
        }
        // Runs of zero blocks shorter than -S are written like data.
        if (sparseMin > bs) {
          for (let i = 0; i < blocks;) {
            if (kind[i] !== ZERO) {
              i++;
              continue;
            }
            let j = i;
            while (j < blocks && kind[j] === ZERO) j++;
            if (Math.min(n, j * bs) - i * bs < sparseMin) kind.fill(DATA, i, j);
            i = j;
          }
        }
        // Runs of data blocks are written together; runs of zero blocks only need work when
        // the sink would not read zeros there; kept blocks are left alone.
        for (let i = 0; i < blocks;) {
          const k = kind[i]!;
          let j = i + 1;
          while (j < blocks && kind[j] === k) j++;
          const a = i * bs;
          const b = Math.min(n, j * bs);
          if (k === DATA) {
            if (compress) {
              for (let p = a; p < b; p += bs) {
                await writeOneCompressed(base + p, buf.subarray(p, Math.min(b, p + bs)), slot);
              }
            } else {
              await write(base + a, buf.subarray(a, b), slot);
            }
          } else if (k === ZERO && zero !== undefined) {
            await issue(zero(base + a, b - a), -1);
          }
          i = j;
        }
        release(slot);
      }
      progressed += chunk.end - chunk.offset;
      options.onProgress?.(progressed);
      while (ahead.length < readAhead && (await startNext()));
    }
  } finally {
    // Nothing may still write from the buffers (or into the sink), nor read from the source,
    // once the copy returns: the caller closes both.
    await Promise.all(inflight);
    for (const c of ahead) if (c.read !== undefined) await c.read.catch(() => undefined);
  }
  settle();
}

/** Options of {@link imageSink}. */
export interface ImageSinkOptions {
  /**
   * Whether the image reads as zeros wherever the copy writes nothing (a new image, or
   * `--target-is-zero`). Default true. When false (`convert -n` into an existing image), the
   * ranges the copy finds zero are zeroed explicitly.
   */
  readonly zeroed?: boolean;
}

/**
 * An image as a sink: blocks are its clusters. Ranges the copy finds zero are zeroed
 * explicitly where the image would not read zeros: where its backing file shows through
 * (so the target reads as the source), and everywhere when it is not known to be zeroed.
 */
export function imageSink(image: WritableDiskImage, options: ImageSinkOptions = {}): CopySink {
  const zeroed = options.zeroed ?? true;
  const zero =
    image.backing === undefined
      ? zeroed
        ? undefined
        : (offset: number, length: number): Promise<void> =>
            image.writeZeroes(offset, length, { mayUnmap: true })
      : async (offset: number, length: number): Promise<void> => {
          const status = new StatusCursor(image, offset + length);
          for (let pos = offset; pos < offset + length; pos = status.end) {
            if (!(await status.at(pos)).zero) {
              await image.writeZeroes(pos, status.end - pos, { mayUnmap: false });
            }
          }
        };
  return {
    blockSize: image.clusterSize,
    write: (offset, data) => image.write(offset, data),
    writeCompressed:
      image.writeCompressed === undefined
        ? undefined
        : (offset, data) => image.writeCompressed!(offset, data),
    zero,
  };
}

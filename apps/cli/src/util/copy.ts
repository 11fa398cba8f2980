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
 * sequentially), several in flight.
 */
import { alignedBuffers, ExtentIterator, StatusCursor, type WritableDiskImage } from "@qimg/io";
import type { BlockBackend, DiskImage } from "../drivers.js";
import { inFile } from "../errors.js";
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

/** A raw file as a sink: holes read as zeros (the file was freshly truncated). */
export function rawSink(target: BlockBackend): CopySink {
  return { blockSize: RAW_ZERO_BLOCK, write: (offset, data) => target.write(offset, data) };
}

/** `e` as an Error (rejections are errors here; anything else is wrapped). */
function asError(e: unknown): Error {
  return e instanceof Error ? e : new Error("request failed", { cause: e });
}

/** One chunk on its way: read (or known zero), then written. */
interface Chunk {
  readonly offset: number;
  readonly end: number;
  /** The chunk's buffer (undefined for a chunk the source reports as zeros). */
  readonly buf: Uint8Array | undefined;
  readonly slot: number;
  readonly read: Promise<void> | undefined;
}

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
  const maxInFlight = options.inFlight ?? WRITES_IN_FLIGHT;
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
  // Page-aligned chunk buffers, mapped once on first use; a slot is free again when every
  // write issued from it has finished.
  const slots = maxInFlight + READ_AHEAD + 1;
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
    if (offset >= dataEnd || (await onSource(() => extents.allZero(offset, dataEnd)))) {
      ahead.push({ offset, end: chunkEnd, buf: undefined, slot: -1, read: undefined });
      return true;
    }
    const slot = await takeSlot();
    slotUsers[slot] = 1; // held until every write from it has been issued
    buffers ??= alignedBuffers(slots, chunkSize);
    const buf = buffers[slot]!.subarray(0, chunkEnd - offset);
    // Past the source's range the sink gets zeros (the buffer is reused: clear it).
    buf.fill(0, dataEnd - offset);
    const read = onSource(() => source.read(offset, buf.subarray(0, dataEnd - offset)));
    read.catch(() => undefined); // awaited in order below
    ahead.push({ offset, end: chunkEnd, buf, slot, read });
    return true;
  };

  const zero = sink.zero;
  try {
    while (ahead.length < READ_AHEAD && (await startNext()));
    while (ahead.length > 0) {
      const chunk = ahead.shift()!;
      const base = chunk.offset - from;
      const buf = chunk.buf;
      if (buf === undefined) {
        if (zero !== undefined) await issue(zero(base, chunk.end - chunk.offset), -1);
      } else {
        await chunk.read;
        const slot = chunk.slot;
        const n = buf.length;
        // Runs of data blocks are written together; runs of zero blocks only need work when
        // the sink would not read zeros there.
        let dataStart = -1;
        let zeroStart = -1;
        for (let b = 0; b < n; b += bs) {
          const e = Math.min(b + bs, n);
          if (isZero(buf, b, e)) {
            if (dataStart >= 0) {
              await issue(sink.write(base + dataStart, buf.subarray(dataStart, b)), slot);
              dataStart = -1;
            }
            if (zeroStart < 0) zeroStart = b;
          } else {
            if (zeroStart >= 0) {
              if (zero !== undefined) await issue(zero(base + zeroStart, b - zeroStart), -1);
              zeroStart = -1;
            }
            if (compress) await issue(writeCompressed!(base + b, buf.subarray(b, e)), slot);
            else if (dataStart < 0) dataStart = b;
          }
        }
        if (dataStart >= 0) {
          await issue(sink.write(base + dataStart, buf.subarray(dataStart, n)), slot);
        }
        if (zeroStart >= 0 && zero !== undefined) {
          await issue(zero(base + zeroStart, n - zeroStart), -1);
        }
        release(slot);
      }
      options.onProgress?.(chunk.end - from);
      while (ahead.length < READ_AHEAD && (await startNext()));
    }
  } finally {
    // Nothing may still write from the buffers (or into the sink), nor read from the source,
    // once the copy returns: the caller closes both.
    await Promise.all(inflight);
    for (const c of ahead) if (c.read !== undefined) await c.read.catch(() => undefined);
  }
  settle();
}

/**
 * A new image as a sink: blocks are its clusters. When it has a backing file, ranges the copy
 * finds zero are zeroed explicitly where the backing file would show through (so the target
 * reads as the source).
 */
export function imageSink(image: WritableDiskImage): CopySink {
  const zero =
    image.backing === undefined
      ? undefined
      : async (offset: number, length: number): Promise<void> => {
          const status = new StatusCursor(image, offset + length);
          for (let pos = offset; pos < offset + length; pos = status.end) {
            const zero = (await status.at(pos)).zero;
            if (!zero) await image.writeZeroes(pos, status.end - pos, { mayUnmap: false });
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

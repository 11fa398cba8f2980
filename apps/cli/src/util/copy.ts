/**
 * Copy a guest range of an image into a raw file, sparsely: ranges the image reports as zero
 * are not read, and blocks of zeros are not written (the target is freshly truncated, so they
 * read back as zeros).
 */
import { alignedBuffers } from "@qimg/io";
import type { BlockBackend, DiskImage } from "../drivers.js";
import { isZero } from "./zero.js";

/** Read size: qemu-img uses 2 MiB buffers too. */
export const COPY_CHUNK = 2 * 1024 * 1024;
/** Granularity of the all-zero check on data that was read. */
const ZERO_BLOCK = 4096;

/**
 * Copy guest bytes `[from, to)` of `image` to `target` at `targetOffset + (x - from)`.
 * `onProgress` is called with the number of bytes handled so far.
 */
/**
 * Whether asking `image` for block status saves work. A raw image has no allocation metadata:
 * its block status reads the data to find zeros, so a copy that reads the data anyway would
 * read it twice; copies detect zeros in the data they read instead.
 */
export function blockStatusPays(image: DiskImage): boolean {
  return !(image.format === "raw" && image.backing === undefined);
}

export async function copySparse(
  image: DiskImage,
  from: number,
  to: number,
  target: BlockBackend,
  targetOffset: number,
  onProgress?: (done: number) => void,
): Promise<void> {
  const raw = !blockStatusPays(image);
  let offset = from;
  let extentEnd = from;
  let done = 0;
  /** The next data chunk to copy, skipping extents that read as zeros; undefined at the end. */
  const nextChunk = async (): Promise<[number, number] | undefined> => {
    while (offset >= extentEnd) {
      if (offset >= to) return undefined;
      const status = raw
        ? { offset, length: to - offset, zero: false }
        : await image.blockStatus(offset, Math.min(to - offset, 1024 ** 3));
      const end = Math.min(to, status.offset + status.length);
      if (status.zero) {
        done += end - offset;
        onProgress?.(done);
        offset = end;
        continue;
      }
      extentEnd = end;
      // Adjacent data extents (compressed clusters are one extent each) join into one chunk.
      while (!raw && extentEnd < to && extentEnd - offset < COPY_CHUNK) {
        const next = await image.blockStatus(extentEnd, Math.min(to - extentEnd, COPY_CHUNK));
        if (next.zero) break;
        extentEnd = Math.min(to, next.offset + next.length);
      }
    }
    const n = Math.min(COPY_CHUNK, extentEnd - offset);
    const chunk: [number, number] = [offset, n];
    offset += n;
    return chunk;
  };
  // Chunks are handed out in order (the block-status walk is serialised through a promise
  // chain); several workers read, scan and write at once, like qemu-img's parallel requests.
  let queue: Promise<unknown> = Promise.resolve();
  const take = (): Promise<[number, number] | undefined> => {
    const p = queue.then(nextChunk);
    queue = p.catch(() => undefined);
    return p;
  };
  // Page-aligned buffers (the kernel copies to and from them faster), one mapping for all.
  const buffers = alignedBuffers(WORKERS, COPY_CHUNK);
  const worker = async (buf: Uint8Array): Promise<void> => {
    for (;;) {
      const c = await take();
      if (c === undefined) return;
      const [at, n] = c;
      const chunk = buf.subarray(0, n);
      await image.read(at, chunk);
      const base = targetOffset + (at - from);
      // Write the non-zero runs of ZERO_BLOCK-sized blocks, coalesced.
      let runStart = -1;
      for (let b = 0; b < n; b += ZERO_BLOCK) {
        const zero = isZero(chunk, b, Math.min(b + ZERO_BLOCK, n));
        if (!zero && runStart < 0) runStart = b;
        if (zero && runStart >= 0) {
          await target.write(base + runStart, chunk.subarray(runStart, b));
          runStart = -1;
        }
      }
      if (runStart >= 0) await target.write(base + runStart, chunk.subarray(runStart, n));
      done += n;
      onProgress?.(done);
    }
  };
  await Promise.all(buffers.map(worker));
}

/** Chunks copied at once (qemu-img convert's default is 8 parallel requests). */
const WORKERS = 8;

/**
 * Copy a guest range of an image into a raw file, sparsely: ranges the image reports as zero
 * are not read, and blocks of zeros are not written (the target is freshly truncated, so they
 * read back as zeros).
 */
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
export async function copySparse(
  image: DiskImage,
  from: number,
  to: number,
  target: BlockBackend,
  targetOffset: number,
  onProgress?: (done: number) => void,
): Promise<void> {
  const buf = new Uint8Array(COPY_CHUNK);
  let offset = from;
  while (offset < to) {
    const status = await image.blockStatus(offset, Math.min(to - offset, 1024 ** 3));
    const extentEnd = Math.min(to, status.offset + status.length);
    if (status.zero) {
      offset = extentEnd;
      onProgress?.(offset - from);
      continue;
    }
    while (offset < extentEnd) {
      const n = Math.min(COPY_CHUNK, extentEnd - offset);
      const chunk = buf.subarray(0, n);
      await image.read(offset, chunk);
      // Write the non-zero runs of ZERO_BLOCK-sized blocks, coalesced.
      let runStart = -1;
      for (let b = 0; b < n; b += ZERO_BLOCK) {
        const zero = isZero(chunk, b, Math.min(b + ZERO_BLOCK, n));
        if (!zero && runStart < 0) runStart = b;
        if (zero && runStart >= 0) {
          await target.write(
            targetOffset + (offset - from) + runStart,
            chunk.subarray(runStart, b),
          );
          runStart = -1;
        }
      }
      if (runStart >= 0)
        await target.write(targetOffset + (offset - from) + runStart, chunk.subarray(runStart, n));
      offset += n;
      onProgress?.(offset - from);
    }
  }
}

/**
 * `qimg compare [-f fmt] [-F fmt] [-s] [-q] [-p] [-U] A B`: compare the guest content of two
 * images with qemu-img compare's algorithm, messages and exit codes:
 *   0 identical, 1 different, 2 error opening an image (or any other error), 3 block status
 *   error, 4 read error.
 */
import { alignedBuffers, StatusCursor } from "@qimg/io";
import type { Command } from "commander";
import { stringOpt, type CommandDef } from "../command.js";
import type { CliContext } from "../context.js";
import type { BlockStatus, DiskImage } from "../drivers.js";
import { CliError, inFile } from "../errors.js";
import { openImage } from "../open.js";
import { startProgress } from "../util/progress.js";
import { isZero } from "../util/zero.js";

export interface CompareOptions {
  readonly a: string;
  readonly b: string;
  readonly formatA?: string | undefined;
  readonly formatB?: string | undefined;
  readonly strict?: boolean;
  readonly quiet?: boolean;
  readonly progress?: boolean;
  /** qemu-img -U. */
  readonly forceShare?: boolean;
}

export const COMPARE_EXIT = {
  IDENTICAL: 0,
  DIFFERENT: 1,
  ERROR: 2,
  STATUS_ERROR: 3,
  READ_ERROR: 4,
} as const;

/** qemu-img's IO_BUF_SIZE. */
const IO_BUF_SIZE = 2 * 1024 * 1024;
const SECTOR = 512;

/** Byte index (relative to the buffers) of the first 512-byte sector that differs, or -1. */
export function firstDifferingSector(a: Uint8Array, b: Uint8Array, length: number): number {
  for (let i = 0; i < length; i += SECTOR) {
    const end = Math.min(i + SECTOR, length);
    for (let j = i; j < end; j++) if (a[j] !== b[j]) return i;
  }
  return -1;
}

/** Byte index of the first 512-byte sector of `buf[0, length)` that is not all zero, or -1. */
export function firstNonZeroSector(buf: Uint8Array, length: number): number {
  for (let i = 0; i < length; i += SECTOR) {
    if (!isZero(buf, i, Math.min(i + SECTOR, length))) return i;
  }
  return -1;
}

/**
 * The block status covering `offset` (one driver call per extent: the cursor keeps the last
 * one), with qemu-img's message and exit code on failure.
 */
async function status(cursor: StatusCursor, name: string, offset: number): Promise<BlockStatus> {
  try {
    return await cursor.at(offset);
  } catch (e) {
    throw new CliError(
      `Sector allocation test failed for ${name}: ${e instanceof Error ? e.message : String(e)}`,
      {
        exitCode: COMPARE_EXIT.STATUS_ERROR,
        cause: e,
      },
    );
  }
}

async function read(
  image: DiskImage,
  name: string,
  offset: number,
  buf: Uint8Array,
): Promise<void> {
  try {
    await image.read(offset, buf);
  } catch (e) {
    throw new CliError(
      `Error while reading offset ${offset} of ${name}: ${e instanceof Error ? e.message : String(e)}`,
      {
        exitCode: COMPARE_EXIT.READ_ERROR,
        cause: e,
      },
    );
  }
}

export async function runCompare(ctx: CliContext, options: CompareOptions): Promise<number> {
  const say = (text: string): void => {
    if (options.quiet !== true) ctx.stdout(text);
  };
  const imageA = await inFile(
    options.a,
    () => openImage(options.a, { format: options.formatA, ctx, forceShare: options.forceShare }),
    COMPARE_EXIT.ERROR,
  );
  try {
    const imageB = await inFile(
      options.b,
      () => openImage(options.b, { format: options.formatB, ctx, forceShare: options.forceShare }),
      COMPARE_EXIT.ERROR,
    );
    try {
      return await compareImages(ctx, imageA, imageB, options, say);
    } finally {
      await imageB.close();
    }
  } finally {
    await imageA.close();
  }
}

async function compareImages(
  ctx: CliContext,
  imageA: DiskImage,
  imageB: DiskImage,
  options: CompareOptions,
  say: (text: string) => void,
): Promise<number> {
  const sizeA = imageA.virtualSize;
  const sizeB = imageB.virtualSize;
  const total = Math.min(sizeA, sizeB);
  if (options.strict === true && sizeA !== sizeB) {
    say("Strict mode: Image size mismatch!\n");
    return COMPARE_EXIT.DIFFERENT;
  }
  const [bufA, bufB] = alignedBuffers(2, IO_BUF_SIZE) as [Uint8Array, Uint8Array];
  const progress = startProgress(ctx, options.progress === true, Math.max(sizeA, sizeB));
  try {
    /** qemu-img's check_empty_sectors(): 0 when the range reads as zeros. */
    const checkEmpty = async (
      image: DiskImage,
      name: string,
      offset: number,
      chunk: number,
    ): Promise<number> => {
      const buf = bufA.subarray(0, chunk);
      await read(image, name, offset, buf);
      const idx = firstNonZeroSector(buf, chunk);
      if (idx >= 0) {
        say(`Content mismatch at offset ${offset + idx}!\n`);
        return COMPARE_EXIT.DIFFERENT;
      }
      return 0;
    };

    // Block status as qemu-img asks for it: from the offset to the image's end.
    const cursorA = new StatusCursor(imageA, sizeA, Number.MAX_SAFE_INTEGER);
    const cursorB = new StatusCursor(imageB, sizeB, Number.MAX_SAFE_INTEGER);
    let offset = 0;
    while (offset < total) {
      const s1 = await status(cursorA, options.a, offset);
      const s2 = await status(cursorB, options.b, offset);
      let chunk = Math.min(cursorA.end - offset, cursorB.end - offset, total - offset);
      if (
        options.strict === true &&
        (s1.present !== s2.present || s1.zero !== s2.zero || s1.data !== s2.data)
      ) {
        say(`Strict mode: Offset ${offset} block status mismatch!\n`);
        return COMPARE_EXIT.DIFFERENT;
      }
      if (s1.zero && s2.zero) {
        // both read as zeros
      } else if (s1.present === s2.present) {
        if (s1.present) {
          chunk = Math.min(chunk, IO_BUF_SIZE);
          await read(imageA, options.a, offset, bufA.subarray(0, chunk));
          await read(imageB, options.b, offset, bufB.subarray(0, chunk));
          const idx = firstDifferingSector(bufA, bufB, chunk);
          if (idx >= 0) {
            say(`Content mismatch at offset ${offset + idx}!\n`);
            return COMPARE_EXIT.DIFFERENT;
          }
        }
      } else {
        chunk = Math.min(chunk, IO_BUF_SIZE);
        const r = s1.present
          ? await checkEmpty(imageA, options.a, offset, chunk)
          : await checkEmpty(imageB, options.b, offset, chunk);
        if (r !== 0) return r;
      }
      offset += chunk;
      progress.update(offset);
    }

    if (sizeA !== sizeB) {
      say("Warning: Image size mismatch!\n");
      const [over, cursor, name, end] =
        sizeA > sizeB ? [imageA, cursorA, options.a, sizeA] : [imageB, cursorB, options.b, sizeB];
      while (offset < end) {
        const s = await status(cursor, name, offset);
        let chunk = cursor.end - offset;
        if (s.present && !s.zero) {
          chunk = Math.min(chunk, IO_BUF_SIZE);
          const r = await checkEmpty(over, name, offset, chunk);
          if (r !== 0) return r;
        }
        offset += chunk;
        progress.update(offset);
      }
    }
    say("Images are identical.\n");
  } finally {
    // As qemu-img: the verdict follows the last progress line, then the newline.
    progress.end();
  }
  return COMPARE_EXIT.IDENTICAL;
}

export const compareCommand: CommandDef = {
  name: "compare",
  errorExitCode: COMPARE_EXIT.ERROR,
  configure(cmd: Command) {
    cmd
      .description(
        "compare the guest content of two images (qemu-img compare); exit 0 same, 1 different, 2 error",
      )
      .argument("<filename1>", "first image")
      .argument("<filename2>", "second image")
      .option("-f, --format <fmt>", "format of the first image; probed when omitted")
      .option("-F, --second-format <fmt>", "format of the second image; probed when omitted")
      .option("-s, --strict", "strict mode: fail on different sizes or allocation")
      .option("-q, --quiet", "print nothing, only set the exit code")
      .option("-p, --progress", "show a progress bar on stderr (when it is a terminal)")
      .option(
        "-U, --force-share",
        "open read-only images even while another process writes them (qemu-img -U: shares every lock; read-only opens only)",
      );
  },
  run(ctx, args, opts) {
    return runCompare(ctx, {
      a: args[0] ?? "",
      b: args[1] ?? "",
      formatA: stringOpt(opts, "format"),
      formatB: stringOpt(opts, "secondFormat"),
      strict: opts.strict === true,
      quiet: opts.quiet === true,
      progress: opts.progress === true,
      forceShare: opts.forceShare === true,
    });
  },
};

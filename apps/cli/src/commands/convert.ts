/**
 * `qimg convert [-f fmt] [-O raw|qcow2|qed] [-o opts] [-c] [-p] [-W] [-U] SRC DST`: write the
 * guest content of SRC to a new image DST.
 *
 * - raw: a sparse file (zero and unallocated ranges are not written).
 * - qcow2/QED: created like `qimg create` (with `-o` options), then written in 2 MiB chunks,
 *   several in flight; zero and unallocated ranges of the source and all-zero clusters stay
 *   unallocated. `-c` (qcow2) writes every cluster compressed with the image's compression
 *   type, deflating on a pool of worker threads (one per core) while the main thread reads
 *   and writes.
 */
import {
  closeSync,
  fstatSync,
  ftruncateSync,
  openSync,
  realpathSync,
  statSync,
  unlinkSync,
  type BigIntStats,
} from "node:fs";
import type { Command } from "commander";
import { ExtentIterator } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import { stringOpt, type CommandDef } from "../command.js";
import type { CliContext } from "../context.js";
import {
  acceptedOptionsOf,
  checkCreateFormat,
  optionsOf,
  writeNewImage,
  type CreateFormat,
} from "../create-image.js";
import type { DiskImage } from "../drivers.js";
import { CliError, inFile, messageOf } from "../errors.js";
import { openImage, sameFile, writeTarget } from "../open.js";
import { cacheMode } from "../util/cache-mode.js";
import { collect, joinedOptions } from "../util/cli-options.js";
import { CompressPool } from "../util/compress-pool.js";
import { blockStatusPays, copy, imageSink, rawSink } from "../util/copy.js";
import { preallocate, PREALLOCATE_MIN, type FileRange } from "../util/preallocate.js";
import { startProgress } from "../util/progress.js";
import { isHelpRequest, optionsHelp, parseOptions } from "../util/qemu-opts.js";
import { roundUp } from "../util/size.js";

export interface ConvertOptions {
  readonly source: string;
  readonly target: string;
  readonly format?: string | undefined;
  /** Output format: raw (default), qcow2, qed. */
  readonly outputFormat?: string | undefined;
  /** `-o` creation options for the target, joined. */
  readonly options?: string | undefined;
  /** `-c`: compressed clusters (qcow2). */
  readonly compress?: boolean;
  readonly progress?: boolean;
  /** Compression threads (default: one per core). */
  readonly threads?: number | undefined;
  /** `-t`: cache mode of the target; qemu-img convert's default is "unsafe" (no flushes). */
  readonly cache?: string | undefined;
  /** `-U`: share every lock of the source (read-only), as qemu-img. */
  readonly forceShare?: boolean;
}

/** True when the target's flushes are skipped (cache=unsafe, the default). */
function targetNoFlush(cache: string | undefined): boolean {
  return cacheMode(cache ?? "unsafe").noFlush;
}

export async function runConvert(ctx: CliContext, options: ConvertOptions): Promise<number> {
  const outFormat = checkCreateFormat(options.outputFormat ?? "raw");
  const optText = options.options ?? "";
  if (isHelpRequest(optText)) {
    ctx.stdout(optionsHelp(outFormat, optionsOf(outFormat)));
    return 0;
  }
  if (options.compress === true && outFormat !== "qcow2") {
    throw new CliError("Compression not supported for this file format");
  }
  if (sameFile(options.source, options.target)) {
    throw new CliError("the output file is the input file", { file: options.target });
  }
  const opts = parseOptions(optText, acceptedOptionsOf(outFormat), options.target);
  opts.delete("size");
  const noFlush = targetNoFlush(options.cache);
  // Every file the source opens (the image, its backing chain, data files): none of them may
  // be written (the target, or the target's data file), however it is named.
  const opened: string[] = [];
  const image = await openImage(options.source, {
    format: options.format,
    ctx,
    onOpen: (path) => opened.push(path),
    forceShare: options.forceShare === true,
  });
  try {
    const dataFile = opts.get("data_file")?.text;
    const written = dataFile === undefined ? [options.target] : [options.target, dataFile];
    for (const out of written) {
      const used = opened.find((path) => sameFile(path, out));
      if (used !== undefined) {
        throw new CliError(
          `refusing to overwrite '${used}': the source image '${options.source}' reads it`,
          { file: out },
        );
      }
    }
    // From here on a failure removes what the convert created or truncated.
    const guard = new OutputGuard(written);
    /** The preallocation of the target, running beside the copy (never rejects). */
    let reserving: Promise<number> = Promise.resolve(0);
    try {
      if (outFormat === "raw") {
        await convertToRaw(ctx, image, options);
        return 0;
      }
      await inFile(options.target, async () => {
        try {
          await writeNewImage(options.target, outFormat, opts, image.virtualSize, { noFlush });
        } catch (e) {
          throw new CliError(
            `error while converting ${outFormat}: ${messageOf(e, options.target)}`,
            { cause: e },
          );
        }
      });
      // Preallocate room for the data past the new image's end (the file keeps its size),
      // while the copy starts, and give back what the copy did not use at the end.
      if (options.compress !== true) {
        const end = statSync(options.target).size;
        reserving = dataBytes(image, options).then(
          (length) => preallocate(options.target, [{ offset: end, length }], { keepSize: true }),
          () => 0, // the copy reports the source's errors
        );
      }
      await convertToImage(ctx, image, outFormat, options);
      if ((await reserving) > 0) trimPastEnd(options.target);
      return 0;
    } catch (e) {
      // fallocate(1) creates the file it is given: let it finish before removing the target.
      await reserving;
      guard.undo();
      throw e;
    }
  } finally {
    await image.close();
  }
}

/**
 * The output files of a convert as they were before it began, to remove on failure the ones
 * it created or changed (a half-written target is never left behind; a file the convert did
 * not get to touch stays as it was).
 */
class OutputGuard {
  private readonly before: (BigIntStats | undefined | null)[];

  constructor(private readonly paths: readonly string[]) {
    // A name that cannot be looked up (too long, a file in the way of a directory...) is
    // left alone: nothing can have been made under it.
    this.before = paths.map((p) => {
      try {
        return statSync(p, { bigint: true, throwIfNoEntry: false });
      } catch {
        return null;
      }
    });
  }

  undo(): void {
    this.paths.forEach((path, i) => {
      const was = this.before[i];
      if (was === null) return;
      const now = statSync(path, { bigint: true, throwIfNoEntry: false });
      if (now === undefined || !now.isFile()) return;
      const unchanged =
        was !== undefined &&
        was.ino === now.ino &&
        was.dev === now.dev &&
        was.size === now.size &&
        was.mtimeNs === now.mtimeNs &&
        was.ctimeNs === now.ctimeNs;
      if (unchanged) return;
      try {
        // Through a symlink, the file it names is the one that was written.
        unlinkSync(realpathSync(path));
      } catch {
        // Best effort: the error that made the convert fail is the one to report.
      }
    });
  }
}

async function convertToRaw(
  ctx: CliContext,
  image: DiskImage,
  options: ConvertOptions,
): Promise<void> {
  const size = image.virtualSize;
  const target = await inFile(options.target, async () => {
    try {
      return await FileBackend.open(options.target, {
        create: true,
        truncate: true,
        noFlush: targetNoFlush(options.cache),
      });
    } catch (e) {
      throw new CliError(`error while converting raw: ${messageOf(e, options.target)}`, {
        cause: e,
      });
    }
  });
  try {
    await inFile(options.target, () => target.truncate(roundUp(size, 512)));
    // The large data extents are preallocated while the copy starts (see preallocate.ts).
    const reserving = blockStatusPays(image)
      ? dataExtents(image).then(
          (extents) => preallocate(options.target, extents.large),
          () => 0, // the copy reports the source's errors
        )
      : Promise.resolve(0);
    try {
      const progress = startProgress(ctx, options.progress === true, size);
      try {
        await inFile(options.source, () =>
          copy(image, rawSink(target), { onProgress: (done) => progress.update(done) }),
        );
      } finally {
        progress.stop();
      }
    } finally {
      // fallocate(1) creates the file it is given: it must be done before a failed convert
      // removes the target.
      await reserving;
    }
    await inFile(options.target, () => target.flush());
  } finally {
    await target.close();
  }
}

/**
 * The data (not zero) of `image`, from its metadata (block status): how many bytes there are,
 * and the extents (adjacent ones merged) of at least PREALLOCATE_MIN bytes. Smaller extents
 * are counted but not kept, so memory stays bounded however fragmented the image is.
 */
async function dataExtents(image: DiskImage): Promise<{ bytes: number; large: FileRange[] }> {
  const large: FileRange[] = [];
  let bytes = 0;
  const runs = new ExtentIterator(image);
  while (await runs.next()) {
    if (runs.zero) continue;
    bytes += runs.length;
    if (runs.length >= PREALLOCATE_MIN) large.push({ offset: runs.offset, length: runs.length });
  }
  return { bytes, large };
}

/**
 * About how many bytes of data a copy of `image` writes: the allocated size of a raw file, or
 * the data extents of an image with metadata (plus 1/64 for the target's tables).
 */
async function dataBytes(image: DiskImage, options: ConvertOptions): Promise<number> {
  const bytes = blockStatusPays(image)
    ? (await dataExtents(image)).bytes
    : Math.min(image.virtualSize, statSync(options.source).blocks * 512);
  return bytes + Math.ceil(bytes / 64);
}

/** Free blocks preallocated past the end of `path` (truncating to its own size does that). */
function trimPastEnd(path: string): void {
  const fd = openSync(path, "r+");
  try {
    ftruncateSync(fd, fstatSync(fd).size);
  } finally {
    closeSync(fd);
  }
}

async function convertToImage(
  ctx: CliContext,
  source: DiskImage,
  format: CreateFormat,
  options: ConvertOptions,
): Promise<void> {
  const compress = options.compress === true;
  const pool = compress ? await CompressPool.start(options.threads) : undefined;
  try {
    const target = await openImage(options.target, {
      format,
      readOnly: false,
      ctx,
      noFlush: targetNoFlush(options.cache),
      qcow2: pool === undefined ? undefined : { compress: pool.compress },
    });
    try {
      const w = writeTarget(target);
      if (compress && w.writeCompressed === undefined) {
        throw new CliError("Compression not supported for this file format");
      }
      // The copy covers the target's whole virtual size (the source's rounded up to 512):
      // what lies past the source's end reads as zeros, so a last partial cluster is written
      // (or compressed) padded with zeros.
      const length = Math.max(target.virtualSize, source.virtualSize);
      const progress = startProgress(ctx, options.progress === true, length);
      try {
        await inFile(options.target, () =>
          copy(source, imageSink(w), {
            length,
            compress,
            // Compressed clusters are small requests: many in flight keep the pool's workers busy.
            inFlight: compress ? 4 * (pool?.size ?? 1) + 8 : undefined,
            sourceName: options.source,
            onProgress: (done) => progress.update(done),
          }),
        );
        await inFile(options.target, () => w.flush());
      } finally {
        progress.stop();
      }
    } finally {
      await inFile(options.target, () => target.close());
    }
  } finally {
    await pool?.close();
  }
}

export const convertCommand: CommandDef = {
  name: "convert",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("convert an image to a new raw, qcow2 or QED image (qemu-img convert)")
      // Optional for commander, so that `convert -O qcow2 -o help` needs no file names (as in
      // qemu-img); run() asks for them otherwise.
      .argument("[source]", "image to read")
      .argument("[target]", "file to write (created or truncated)")
      .option("-f, --format <fmt>", "source format (qcow2, qed, raw); probed when omitted")
      .option("-O, --output-format <fmt>", "output format (raw, qcow2, qed)", "raw")
      .option("-o, --options <opts>", "target creation options ('-o help' lists them)", collect)
      .option("-c, --compress", "write compressed clusters (qcow2)")
      .option("-p, --progress", "show progress on stdout, as qemu-img (a bar on a terminal)")
      .option("-q, --quiet", "quiet: no progress, even with -p")
      .option(
        "-W, --out-of-order",
        "allow out-of-order writes (qimg always keeps several in flight)",
      )
      .option(
        "-U, --force-share",
        "open the source even while another process writes it (qemu-img -U: shares every lock)",
      )
      .option(
        "-t, --cache <mode>",
        "target cache mode: unsafe (default, no flushes), writeback, ...",
      )
      .option(
        "-T, --source-cache <mode>",
        "source cache mode (accepted for qemu-img compatibility)",
      );
  },
  run(ctx, args, opts) {
    if (
      (args[0] === undefined || args[1] === undefined) &&
      !isHelpRequest(joinedOptions(opts) ?? "")
    ) {
      throw new CliError("Must specify image file name");
    }
    return runConvert(ctx, {
      cache: stringOpt(opts, "cache"),
      source: args[0] ?? "",
      target: args[1] ?? "",
      format: stringOpt(opts, "format"),
      outputFormat: stringOpt(opts, "outputFormat"),
      options: joinedOptions(opts),
      compress: opts.compress === true,
      progress: opts.progress === true && opts.quiet !== true,
      forceShare: opts.forceShare === true,
    });
  },
};

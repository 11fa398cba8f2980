/**
 * `qimg commit [-f fmt] [-t cache] [-b base] [-d] [-p] [-q] [-r rate] FILE` — qemu-img commit:
 * copy what the image (and, with `-b`, every image between it and `base`) holds into its
 * backing file, then make the image empty (qcow2; formats that cannot, QED included, are
 * left as they are, as qemu-img does). `-b` implies `-d`, as in qemu-img. A base shorter than
 * the image is grown to its size first.
 *
 * What is copied is what QEMU's commit job copies: every range allocated above the base
 * (data, and zero clusters, which become zeros in the base, released where the base can).
 */
import { realpathSync } from "node:fs";
import type { Command } from "commander";
import { StatusCursor } from "@qimg/io";
import { UnsupportedFeatureError } from "@qimg/structs";
import { Qcow2Image } from "@qimg/qcow2";
import type { CommandDef } from "../command.js";
import { stringOpt } from "../command.js";
import type { CliContext } from "../context.js";
import { qcow2InfoOf } from "../drivers.js";
import type { DiskImage, WritableDiskImage } from "../drivers.js";
import { CliError, inFile, requestErrorText } from "../errors.js";
import { combinePath, openImage, writeTarget } from "../open.js";
import { cacheMode } from "../util/cache-mode.js";
import { copy } from "../util/copy.js";
import type { CopySink } from "../util/copy.js";
import { startProgress } from "../util/progress.js";
import { cvtsize } from "../util/cvtnum.js";

/** The image below `image` in its backing chain (opened), if any. */
export function backingImageOf(image: DiskImage): DiskImage | undefined {
  return (image as { backing?: DiskImage | undefined }).backing;
}

/** The backing file name stored in `image`'s header, if any. */
export function storedBackingName(image: DiskImage): string | undefined {
  return (
    (image as { backingFilename?: string | undefined }).backingFilename ??
    (image as { info?: () => { backingFilename?: string | undefined } }).info?.().backingFilename
  );
}

function realOrSelf(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return path;
  }
}

/**
 * The chain depth of the image named `name` below `top` (1 = the backing file), as QEMU's
 * bdrv_find_backing_image matches it: the name as stored in the overlay's header, or the same
 * real path once both are taken relative to the overlay.
 */
function findBase(top: DiskImage, name: string): number | undefined {
  let overlay = top;
  for (let depth = 1; ; depth++) {
    const below = backingImageOf(overlay);
    if (below === undefined) return undefined;
    const stored = storedBackingName(overlay);
    if (stored === name) return depth;
    const wanted = realOrSelf(combinePath(overlay.backend.name, name));
    if (wanted === realOrSelf(below.backend.name)) return depth;
    overlay = below;
  }
}

/** qemu-img's `-r` parse (cvtnum: a size with an optional suffix); 0 means no limit. */
export function parseRateLimit(text: string | undefined): number | undefined {
  if (text === undefined) return undefined;
  const rate = cvtsize("rate limit", text);
  return rate === 0 ? undefined : rate;
}

/**
 * The ranges of `top` that are allocated above the image at chain depth `baseDepth`, merged:
 * each with whether it reads as zeros throughout.
 */
async function* allocatedAbove(
  top: DiskImage,
  baseDepth: number,
): AsyncGenerator<{ start: number; end: number; zero: boolean }> {
  const cursor = new StatusCursor(top);
  let run: { start: number; end: number; zero: boolean } | undefined;
  for (let pos = 0; pos < top.virtualSize; pos = cursor.end) {
    const s = await cursor.at(pos);
    const above = s.present && s.depth < baseDepth;
    if (above && run !== undefined && run.end === pos && run.zero === s.zero) {
      run.end = cursor.end;
      continue;
    }
    if (run !== undefined) yield run;
    run = above ? { start: pos, end: cursor.end, zero: s.zero } : undefined;
  }
  if (run !== undefined) yield run;
}

/** A sink that writes into `base` at `at` plus the copy's offsets; zeros are always written. */
function baseSink(base: WritableDiskImage, at: number): CopySink {
  return {
    blockSize: base.clusterSize > 0 ? base.clusterSize : 4096,
    write: (offset, data) => base.write(at + offset, data),
    zero: (offset, length) => base.writeZeroes(at + offset, length, { mayUnmap: true }),
  };
}

/**
 * The data part of a commit: grow `base` to `top`'s size when it is shorter, copy every range
 * of `top` allocated above chain depth `baseDepth` into it (zero ranges as zero writes, which
 * may release clusters), and flush `base`. `top` is read through its chain.
 */
export async function commitInto(
  ctx: CliContext,
  top: DiskImage,
  base: WritableDiskImage,
  baseDepth: number,
  options: { rate?: number | undefined; progress?: boolean; sourceName?: string } = {},
): Promise<void> {
  if (top.virtualSize > base.virtualSize) {
    // QEMU cannot resize a version 2 qcow2 image with snapshots (they do not record their
    // disk size): the job fails before anything is written.
    const info = qcow2InfoOf(base);
    if (info?.compat === "0.10" && info.snapshots.length > 0) {
      throw new CliError("Block job failed: Operation not supported");
    }
    // QEMU grows the base inside its commit job: a refusal is the job's failure.
    await base.resize(top.virtualSize).catch((e: unknown) => {
      // (ENOTSUP for what the driver cannot do, as QEMU's truncate reports it.)
      const why =
        e instanceof UnsupportedFeatureError ? "Operation not supported" : requestErrorText(e);
      throw new CliError(`Block job failed: ${why}`, { cause: e });
    });
  }
  const progress = startProgress(ctx, options.progress === true, top.virtualSize);
  try {
    for await (const r of allocatedAbove(top, baseDepth)) {
      if (r.zero) {
        await base.writeZeroes(r.start, r.end - r.start, { mayUnmap: true });
      } else {
        await copy(top, baseSink(base, r.start), {
          from: r.start,
          to: r.end,
          rateLimit: options.rate,
          // Data is written as data, zero bytes included, as QEMU's commit job copies it.
          minSparse: 0,
          ...(options.sourceName === undefined ? {} : { sourceName: options.sourceName }),
        });
      }
      progress.update(r.end);
    }
  } finally {
    progress.stop();
  }
  await base.flush();
}

async function commitData(
  ctx: CliContext,
  file: string,
  format: string | undefined,
  base: { path: string; format: string; depth: number },
  options: { writethrough: boolean; noFlush: boolean; rate: number | undefined; progress: boolean },
): Promise<void> {
  const target = await openImage(base.path, {
    format: base.format,
    readOnly: false,
    ctx,
    noFlush: options.noFlush,
    qcow2: { writethrough: options.writethrough },
  });
  try {
    writeTarget(target);
    // The top's chain opens the base again, read-only and sharing every permission with the
    // writer above (what the commit copies never reads the base).
    const top = await openImage(file, { format, readOnly: true, ctx, forceShare: true });
    try {
      // (Failures are the commit job's, which qemu-img names without a file.)
      await commitInto(ctx, top, target, base.depth, {
        rate: options.rate,
        progress: options.progress,
        sourceName: file,
      });
    } finally {
      await inFile(file, () => top.close());
    }
  } finally {
    await inFile(base.path, () => target.close());
  }
}

export const commitCommand: CommandDef = {
  name: "commit",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("commit the image's changes into its backing file (qemu-img commit)")
      .argument("<file>", "image whose data goes into its backing file")
      .option("-f, --format <fmt>", "image format (qcow2, qed, raw); probed when omitted")
      .option("-t, --cache <mode>", "cache mode for the files written (default writeback)")
      .option("-b, --base <base>", "commit into this image further down the chain (implies -d)")
      .option("-d, --drop", "leave the image as it is instead of making it empty")
      .option("-p, --progress", "show progress")
      .option("-q, --quiet", "print nothing on success")
      .option("-r, --rate-limit <rate>", "bytes per second at most (k, M, G suffixes)");
  },
  async run(ctx, args, opts) {
    const file = args[0] ?? "";
    const format = stringOpt(opts, "format");
    const mode = cacheMode(stringOpt(opts, "cache") ?? "writeback");
    const rate = parseRateLimit(stringOpt(opts, "rateLimit"));
    const baseName = stringOpt(opts, "base");
    const quiet = opts.quiet === true;
    // qemu-img: "-b implies -d".
    const drop = opts.drop === true || baseName !== undefined;

    // Every refusal is decided on a read-only look at the chain, before anything is written.
    const probe = await openImage(file, { format, readOnly: true, ctx, forceShare: true });
    let base: { path: string; format: string; depth: number };
    const topFormat = probe.format;
    try {
      const below = backingImageOf(probe);
      if (below === undefined) throw new CliError("Image does not have a backing file");
      let depth = 1;
      if (baseName !== undefined) {
        const found = findBase(probe, baseName);
        if (found === undefined) {
          throw new CliError(`Did not find '${baseName}' in the backing chain of '${file}'`);
        }
        depth = found;
      }
      let image: DiskImage = probe;
      for (let i = 0; i < depth; i++) image = backingImageOf(image)!;
      base = { path: image.backend.name, format: image.format, depth };
    } finally {
      await inFile(file, () => probe.close());
    }

    await commitData(ctx, file, format, base, {
      writethrough: mode.writethrough,
      noFlush: mode.noFlush,
      rate,
      progress: opts.progress === true && !quiet,
    });

    // Only qcow2 can make itself empty; QEMU skips the others silently (ENOTSUP).
    if (!drop && topFormat === "qcow2") {
      const top = await openImage(file, {
        format: topFormat,
        readOnly: false,
        openBacking: false,
        ctx,
        noFlush: mode.noFlush,
        qcow2: { writethrough: mode.writethrough },
      });
      try {
        if (top instanceof Qcow2Image) await inFile(file, () => top.makeEmpty());
      } finally {
        await inFile(file, () => top.close());
      }
    }
    if (!quiet) ctx.stdout("Image committed.\n");
    return 0;
  },
};

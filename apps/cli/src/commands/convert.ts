/**
 * `qimg convert [-f fmt | --image-opts] [-O fmt | --target-image-opts] [-o opts] [-c] [-p] [-q]
 * [-n] [--target-is-zero] [-B backing [-F fmt]] [-S size] [-m N] [-W] [-C] [-r rate]
 * [--salvage] [-U] [-t cache] [-T cache] SRC DST`: write the guest content of SRC to DST, with
 * qemu-img convert's options, checks (in its order), messages and exit codes.
 *
 * - raw: a sparse file (zero and unallocated ranges are not written).
 * - qcow2/QED: created like `qimg create` (with `-o` options), then written in 2 MiB chunks,
 *   several in flight; zero and unallocated ranges of the source and all-zero clusters stay
 *   unallocated. `-c` (qcow2) writes every cluster compressed with the image's compression
 *   type, deflating on a pool of worker threads (one per core) while the main thread reads
 *   and writes.
 * - `-n`: DST exists and is written in place (opened as `-O`'s format, raw by default); it
 *   must be at least as large as SRC; ranges SRC reads as zeros are zeroed in it, unless
 *   `--target-is-zero` says it already reads as zeros. A failure part-way leaves DST partly
 *   written, as qemu-img does (it is the user's image: qimg does not remove it).
 * - `-B backing [-F fmt]`: DST is created as an overlay of `backing`; ranges SRC takes from its
 *   own backing chain are not written when `backing` is that same file, or holds the same
 *   bytes there, so DST reads exactly as SRC.
 * - A failed convert without `-n` removes the target it created.
 */
import { closeSync, fstatSync, ftruncateSync, openSync, statSync } from "node:fs";
import type { Command } from "commander";
import { ExtentIterator, StatusCursor } from "@qimg/io";
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
import { copyBitmaps, Qcow2Image, type SnapshotSelector } from "@qimg/qcow2";
import type { DiskImage, WritableDiskImage } from "../drivers.js";
import { CliError, inFile, messageOf } from "../errors.js";
import { openImage, sameFile, writeTarget } from "../open.js";
import { cacheMode } from "../util/cache-mode.js";
import { collect, joinedOptions } from "../util/cli-options.js";
import { CompressPool } from "../util/compress-pool.js";
import {
  blockStatusPays,
  copy,
  imageSink,
  RAW_ZERO_BLOCK,
  rawSink,
  type CopyOptions,
  type CopyRange,
  type CopySink,
} from "../util/copy.js";
import { cvtsize, strtolWhole } from "../util/cvtnum.js";
import { parseImageOpts } from "../util/image-opts.js";
import { OutputGuard } from "../util/output-guard.js";
import { preallocate, PREALLOCATE_MIN, type FileRange } from "../util/preallocate.js";
import { startProgress } from "../util/progress.js";
import { isHelpRequest, optionsHelp, parseOptions, type OptMap } from "../util/qemu-opts.js";
import { roundUp } from "../util/size.js";
import { loadSnapshotView, parseSnapshotParam } from "../util/snapshot-param.js";

/** What `qimg convert` was asked to do (its parsed command line). */
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
  /** `-n`: the target exists; write into it instead of creating it. */
  readonly noCreate?: boolean;
  /** `--target-is-zero` (with `-n`): the existing target reads as zeros. */
  readonly targetIsZero?: boolean;
  /** `-B`: the new target is an overlay of this backing file. */
  readonly backing?: string | undefined;
  /** `-F`: format of the `-B` backing file. */
  readonly backingFormat?: string | undefined;
  /** `-S`: the shortest run of zero bytes left sparse (0: write everything); undefined: 4 KiB. */
  readonly minSparse?: number | undefined;
  /** `-m`: parallel requests (1..16). */
  readonly parallel?: number | undefined;
  /** `-W`: out-of-order writes. */
  readonly outOfOrder?: boolean;
  /** `-C`: copy offloading. */
  readonly copyOffload?: boolean;
  /** `--salvage`: copy unreadable sectors as zeros (with a warning each) and go on. */
  readonly salvage?: boolean;
  /** `-r`: bytes per second at most (0: no limit). */
  readonly rateLimit?: number | undefined;
  /** `--image-opts`: `source` is an option string. */
  readonly imageOpts?: boolean;
  /** `--target-image-opts` (with `-n`): `target` is an option string. */
  readonly targetImageOpts?: boolean;
  /**
   * `-l`: the internal snapshot to convert: `snapshot.id=ID[,snapshot.name=NAME]`,
   * `snapshot.name=NAME`, or an ID or name (ID first, as qemu-img).
   */
  readonly snapshot?: string | undefined;
  /** `-s NAME` (qemu-img's older spelling, gone in 7.2): an ID or name, as a plain `-l`. */
  readonly snapshotName?: string | undefined;
  /** `--bitmaps`: copy every persistent bitmap to the (qcow2) target. */
  readonly bitmaps?: boolean;
  /** `--skip-broken-bitmaps` (with `--bitmaps`): leave out inconsistent bitmaps. */
  readonly skipBrokenBitmaps?: boolean;
}

/** True when the target's flushes are skipped (cache=unsafe, the default). */
function targetNoFlush(cache: string | undefined): boolean {
  return cacheMode(cache ?? "unsafe").noFlush;
}

/** qemu-img's checks of the option combinations, in its order (before any file is opened). */
function checkCombinations(options: ConvertOptions, hasOptions: boolean): void {
  const checks: [boolean, string][] = [
    [
      options.skipBrokenBitmaps === true && options.bitmaps !== true,
      "Use of --skip-broken-bitmaps requires --bitmaps",
    ],
    [
      options.compress === true && options.copyOffload === true,
      "Cannot enable copy offloading when -c is used",
    ],
    [
      options.minSparse !== undefined && options.copyOffload === true,
      "Cannot enable copy offloading when -S is used",
    ],
    [
      options.copyOffload === true && options.salvage === true,
      "Cannot use copy offloading in salvaging mode",
    ],
    [
      options.targetImageOpts === true && options.noCreate !== true,
      "--target-image-opts requires use of -n flag",
    ],
    [options.noCreate === true && hasOptions, "-o has no effect when skipping image creation"],
    [
      options.targetIsZero === true && options.noCreate !== true,
      "--target-is-zero requires use of -n flag",
    ],
  ];
  for (const [bad, message] of checks) if (bad) throw new CliError(message);
}

/** Where an image named on the command line lives, and its format when known. */
interface Named {
  readonly path: string;
  readonly format: string | undefined;
}

/** The file and format of an image argument (a file name, or an option string). */
function named(arg: string, imageOpts: boolean, format: string | undefined): Named {
  if (!imageOpts) return { path: arg, format };
  if (format !== undefined) throw new CliError("--image-opts and --format are mutually exclusive");
  const o = parseImageOpts(arg);
  return { path: o.filename, format: o.driver };
}

/**
 * Run `qimg convert` (see the module comment); resolves to the exit code, throws a
 * {@link CliError} (or a library error) for what qemu-img reports as an error.
 */
export async function runConvert(ctx: CliContext, options: ConvertOptions): Promise<number> {
  const snapshot = snapshotSelector(options);
  const noCreate = options.noCreate === true;
  const optText = options.options ?? "";
  checkCombinations(options, options.options !== undefined);
  const outFormatName =
    options.outputFormat ?? (options.targetImageOpts === true ? undefined : "raw");
  if (isHelpRequest(optText)) {
    if (outFormatName === undefined)
      throw new CliError("Option help requires a format be specified");
    const f = checkCreateFormat(outFormatName);
    ctx.stdout(optionsHelp(f, optionsOf(f)));
    return 0;
  }
  const src = named(options.source, options.imageOpts === true, options.format);
  const dst = named(options.target, options.targetImageOpts === true, outFormatName);
  if (sameFile(src.path, dst.path)) {
    throw new CliError("the output file is the input file", { file: dst.path });
  }
  const noFlush = targetNoFlush(options.cache);
  // Every file the source opens (the image, its backing chain, data files): none of them may
  // be written (the target, or the target's data file), however it is named.
  const opened: string[] = [];
  const image = await openImage(src.path, {
    format: src.format,
    ctx,
    onOpen: (path) => opened.push(path),
    forceShare: options.forceShare === true,
  });
  try {
    const source = snapshot === undefined ? image : await loadSnapshotView(image, snapshot);
    const copyOptions = copyOptionsOf(ctx, options, src.path);
    const bitmaps =
      options.bitmaps === true
        ? { from: image, skipBroken: options.skipBrokenBitmaps === true }
        : undefined;
    if (noCreate) {
      checkNoCreate(options);
      checkBitmaps(bitmaps);
      refuseSourceFiles(opened, [dst.path], src.path);
      await convertInto(ctx, source, dst, options, copyOptions, bitmaps);
      return 0;
    }
    const outFormat = checkCreateFormat(outFormatName ?? "raw");
    // qemu-img convert names no file in these messages.
    const opts = parseOptions(optText, acceptedOptionsOf(outFormat), undefined);
    opts.delete("size");
    addBackingOptions(opts, outFormat, options);
    const backingFile = opts.get("backing_file")?.text;
    if (backingFile !== undefined && opts.get("backing_fmt") === undefined) {
      throw new CliError("Use of backing file requires explicit backing format");
    }
    if (options.compress === true && outFormat !== "qcow2") {
      throw new CliError("Compression not supported for this file format");
    }
    refuseCopyOffload(options);
    checkBitmaps(bitmaps);
    // qemu-img finds this once the target is made; qimg before (and so leaves no file).
    if (bitmaps !== undefined && outFormat !== "qcow2") {
      throw new CliError(`Format driver '${outFormat}' does not support bitmaps`);
    }
    const dataFile = opts.get("data_file")?.text;
    const written = dataFile === undefined ? [dst.path] : [dst.path, dataFile];
    refuseSourceFiles(opened, written, src.path);
    // From here on a failure removes what the convert created or truncated.
    const guard = new OutputGuard(written);
    /** The preallocation of the target, running beside the copy (never rejects). */
    let reserving: Promise<number> = Promise.resolve(0);
    try {
      if (outFormat === "raw") {
        await convertToRaw(ctx, source, options, copyOptions);
        return 0;
      }
      await inFile(dst.path, async () => {
        try {
          await writeNewImage(dst.path, outFormat, opts, image.virtualSize, { noFlush });
        } catch (e) {
          throw new CliError(`error while converting ${outFormat}: ${messageOf(e, dst.path)}`, {
            cause: e,
          });
        }
      });
      // Preallocate room for the data past the new image's end (the file keeps its size),
      // while the copy starts, and give back what the copy did not use at the end.
      if (options.compress !== true) {
        const end = statSync(dst.path).size;
        reserving = dataBytes(source, src.path).then(
          (length) => preallocate(dst.path, [{ offset: end, length }], { keepSize: true }),
          () => 0, // the copy reports the source's errors
        );
      }
      await convertToImage(ctx, source, outFormat, options, copyOptions, backingFile, bitmaps);
      if ((await reserving) > 0) trimPastEnd(dst.path);
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

/** `--bitmaps`: the image whose bitmaps are copied, and `--skip-broken-bitmaps`. */
interface BitmapCopy {
  readonly from: DiskImage;
  readonly skipBroken: boolean;
}

/**
 * qemu-img's checks before it makes the target: only a qcow2 source has bitmaps; an
 * inconsistent (in-use) one is refused unless `--skip-broken-bitmaps` (qemu-img looks at the
 * last one first).
 */
function checkBitmaps(bitmaps: BitmapCopy | undefined): void {
  if (bitmaps === undefined) return;
  if (!(bitmaps.from instanceof Qcow2Image)) throw new CliError("Source lacks bitmap support");
  if (bitmaps.skipBroken) return;
  for (const b of bitmaps.from.listBitmaps().reverse()) {
    if (b.inUse) throw new CliError(`Cannot copy inconsistent bitmap '${b.name}'`);
  }
}

/** Copy the bitmaps into `target` (before it is closed: they are stored at close). */
async function copyBitmapsInto(
  ctx: CliContext,
  bitmaps: BitmapCopy | undefined,
  target: DiskImage,
): Promise<void> {
  if (bitmaps === undefined || !(bitmaps.from instanceof Qcow2Image)) return;
  if (!(target instanceof Qcow2Image)) {
    throw new CliError(`Format driver '${target.format}' does not support bitmaps`);
  }
  await copyBitmaps(bitmaps.from, target, {
    skipBroken: bitmaps.skipBroken,
    onSkip: (name) => ctx.stderr(`qimg: warning: Skipping inconsistent bitmap '${name}'\n`),
  });
}

/**
 * `-l` / `-s`: which snapshot to convert (its view is read at the image's current size, as
 * qemu-img 7.2 converts it), or undefined for the image's active state.
 */
function snapshotSelector(options: ConvertOptions): SnapshotSelector | string | undefined {
  if (options.snapshot !== undefined) return parseSnapshotParam(options.snapshot);
  return options.snapshotName;
}

/** Refuse to write any file the source reads (`written`: the target and its data file). */
function refuseSourceFiles(
  opened: readonly string[],
  written: readonly string[],
  source: string,
): void {
  for (const out of written) {
    const used = opened.find((path) => sameFile(path, out));
    if (used !== undefined) {
      throw new CliError(`refusing to overwrite '${used}': the source image '${source}' reads it`, {
        file: out,
      });
    }
  }
}

/** `-B`/`-F` as the target's backing_file/backing_fmt creation options (qemu's old-style options). */
function addBackingOptions(opts: OptMap, format: CreateFormat, options: ConvertOptions): void {
  const accepted = new Set(acceptedOptionsOf(format).map((o) => o.name));
  if (options.backing !== undefined) {
    if (!accepted.has("backing_file")) {
      throw new CliError(`Backing file not supported for file format '${format}'`);
    }
    opts.set("backing_file", { text: options.backing, value: options.backing });
  }
  if (options.backingFormat !== undefined) {
    if (!accepted.has("backing_fmt")) {
      throw new CliError(`Backing file format not supported for file format '${format}'`);
    }
    opts.set("backing_fmt", { text: options.backingFormat, value: options.backingFormat });
  }
}

/** What `-n` refuses before the target is opened. */
function checkNoCreate(options: ConvertOptions): void {
  if (options.targetIsZero === true && options.backing !== undefined) {
    throw new CliError("Cannot use --target-is-zero when the destination image has a backing file");
  }
  refuseCopyOffload(options);
}

/**
 * `-C` past qemu-img's own refusals: qemu-img hands the copy to copy_file_range(2); Node.js
 * has no call for it on ranges of a file, so qimg refuses rather than pretend.
 */
function refuseCopyOffload(options: ConvertOptions): void {
  if (options.copyOffload === true) {
    throw new CliError(
      "Copy offloading is not available: qimg has no copy_file_range(2) path in Node.js (convert without -C copies the same bytes)",
    );
  }
}

/** The copy engine's options from convert's (`-S`, `-m`, `-W`, `-r`, `--salvage`). */
function copyOptionsOf(ctx: CliContext, options: ConvertOptions, source: string): CopyOptions {
  const m = options.parallel;
  return {
    sourceName: source,
    minSparse: options.minSparse,
    ...(m !== undefined ? { inFlight: m, readAhead: m } : {}),
    outOfOrder: options.outOfOrder === true,
    rateLimit:
      options.rateLimit === undefined || options.rateLimit === 0 ? undefined : options.rateLimit,
    onReadError:
      options.salvage === true
        ? (offset: number, e: unknown) =>
            ctx.stderr(`qimg: warning: error while reading offset ${offset}: ${readErrorText(e)}\n`)
        : undefined,
    onStatusError:
      options.salvage === true
        ? (offset: number, e: unknown) =>
            ctx.stderr(
              `qimg: warning: error while reading block status at offset ${offset}: ${readErrorText(e)}\n`,
            )
        : undefined,
  };
}

/** The strerror()-style words qemu-img prints for a failed read (EIO unless the system said). */
function readErrorText(e: unknown): string {
  const code = (e as { code?: unknown } | undefined)?.code;
  if (typeof code === "string" && /^E[A-Z]+$/.test(code) && code !== "EIO") {
    return messageOf(e, "").replace(/^.*: /, "");
  }
  return "Input/output error";
}

/** `-n`: write into the existing target (see the module comment). */
async function convertInto(
  ctx: CliContext,
  source: DiskImage,
  dst: Named,
  options: ConvertOptions,
  copyOptions: CopyOptions,
  bitmaps: BitmapCopy | undefined,
): Promise<void> {
  const target = await openTarget(dst.path, () =>
    openImage(dst.path, {
      format: dst.format,
      readOnly: false,
      ctx,
      noFlush: targetNoFlush(options.cache),
    }),
  );
  try {
    const w = writeTarget(target);
    if (options.compress === true && w.writeCompressed === undefined) {
      throw new CliError("Compression not supported for this file format");
    }
    if (Math.ceil(w.virtualSize / 512) < Math.ceil(source.virtualSize / 512)) {
      throw new CliError("output file is smaller than input file");
    }
    const length = Math.min(w.virtualSize, roundUp(source.virtualSize, 512));
    const leaveAlone =
      options.backing === undefined ? undefined : await backingShortcut(source, w, true);
    await runCopy(ctx, options, source, imageSink(w, { zeroed: options.targetIsZero === true }), {
      ...copyOptions,
      length,
      compress: options.compress === true,
      leaveAlone,
      targetName: dst.path,
      flush: () => w.flush(),
    });
    await copyBitmapsInto(ctx, bitmaps, w);
  } finally {
    await inFile(dst.path, () => target.close());
  }
}

/** Open the target, with qemu-img's "Could not open" wording when the file cannot be. */
async function openTarget<T>(path: string, open: () => Promise<T>): Promise<T> {
  try {
    return await open();
  } catch (e) {
    if (e instanceof Error && e.message.includes(": open failed: ")) {
      throw new CliError(
        `Could not open '${path}': Could not open '${path}': ${messageOf(e, path)}`,
        {
          cause: e,
        },
      );
    }
    throw e;
  }
}

/**
 * `-B`: the ranges of a data chunk the target already shows as the source: those the source
 * takes from its backing chain (nothing allocated in its top image), when the new target's
 * backing file is the source's own (same file), or where the target reads the same bytes
 * there (always compared for an existing target, `-n`: its own clusters may differ). qemu-img
 * skips these ranges without looking, so with another backing file (or `-n`) its result can
 * differ from the source; qimg's reads as the source.
 */
async function backingShortcut(
  source: DiskImage,
  target: WritableDiskImage,
  existing: boolean,
): Promise<((offset: number, data: Uint8Array) => Promise<readonly CopyRange[]>) | undefined> {
  if (source.backing === undefined || target.backing === undefined) return undefined;
  const same =
    !existing &&
    sameFile(source.backing.backend.name, target.backing.backend.name) &&
    source.backing.format === target.backing.format;
  const bs = target.clusterSize;
  return async (offset, data) => {
    const end = offset + data.length;
    const out: CopyRange[] = [];
    // (The cursor checks that every answer covers the offset asked about.)
    const status = new StatusCursor(source, end);
    for (let pos = offset; pos < end;) {
      const s = await status.at(pos);
      const stop = status.end;
      const inherited = s.depth > 0 || !s.present;
      if (inherited) {
        if (same) {
          out.push({ start: pos, end: stop });
        } else {
          // Compare with what the target shows there (through its backing file), per block.
          const theirs = new Uint8Array(Math.min(stop, target.virtualSize) - pos);
          if (theirs.length > 0) await target.read(pos, theirs);
          for (let b = pos; b < pos + theirs.length;) {
            const e = Math.min(pos + theirs.length, (Math.floor(b / bs) + 1) * bs);
            const mine = data.subarray(b - offset, e - offset);
            if (Buffer.from(mine).equals(theirs.subarray(b - pos, e - pos))) {
              const last = out[out.length - 1];
              if (last !== undefined && last.end === b)
                out[out.length - 1] = { start: last.start, end: e };
              else out.push({ start: b, end: e });
            }
            b = e;
          }
        }
      }
      pos = stop;
    }
    return out;
  };
}

/** The copy with progress, then the target's flush. */
async function runCopy(
  ctx: CliContext,
  options: ConvertOptions,
  source: DiskImage,
  sink: CopySink,
  copyOptions: CopyOptions & {
    readonly length: number;
    readonly targetName: string;
    readonly flush: () => Promise<void>;
  },
): Promise<void> {
  const progress = startProgress(ctx, options.progress === true, copyOptions.length);
  try {
    await inFile(copyOptions.targetName, () =>
      copy(source, sink, { ...copyOptions, onProgress: (done) => progress.update(done) }),
    );
    await inFile(copyOptions.targetName, () => copyOptions.flush());
  } finally {
    progress.stop();
  }
}

async function convertToRaw(
  ctx: CliContext,
  image: DiskImage,
  options: ConvertOptions,
  copyOptions: CopyOptions,
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
      // -S sets the zero-detection granularity of the file (a power of two, 512 to 4 KiB).
      const s = options.minSparse;
      const block =
        s === undefined || s === 0 ? RAW_ZERO_BLOCK : Math.min(RAW_ZERO_BLOCK, pow2floor(s));
      await runCopy(ctx, options, image, rawSink(target, block), {
        ...copyOptions,
        length: size,
        targetName: options.target,
        flush: () => target.flush(),
      });
    } finally {
      // fallocate(1) creates the file it is given: it must be done before a failed convert
      // removes the target.
      await reserving;
    }
  } finally {
    await target.close();
  }
}

/** The largest power of two not above `n` (n >= 1). */
function pow2floor(n: number): number {
  return 2 ** Math.floor(Math.log2(n));
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
async function dataBytes(image: DiskImage, sourcePath: string): Promise<number> {
  const bytes = blockStatusPays(image)
    ? (await dataExtents(image)).bytes
    : Math.min(image.virtualSize, statSync(sourcePath).blocks * 512);
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
  copyOptions: CopyOptions,
  backingFile: string | undefined,
  bitmaps: BitmapCopy | undefined,
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
      const leaveAlone =
        backingFile === undefined ? undefined : await backingShortcut(source, w, false);
      await runCopy(ctx, options, source, imageSink(w), {
        ...copyOptions,
        length,
        compress,
        leaveAlone,
        // Compressed clusters are small requests: many in flight keep the pool's workers busy.
        inFlight: compress
          ? Math.max(copyOptions.inFlight ?? 0, 4 * (pool?.size ?? 1) + 8)
          : copyOptions.inFlight,
        targetName: options.target,
        flush: () => w.flush(),
      });
      await copyBitmapsInto(ctx, bitmaps, w);
    } finally {
      await inFile(options.target, () => target.close());
    }
  } finally {
    await pool?.close();
  }
}

/** `-S`: qemu-img's checks of the sparse size (bytes, a multiple of 512 up to 16 MiB). */
export function parseMinSparse(value: string): number {
  const v = cvtsize("buffer size for sparse output", value);
  if (v % 512 !== 0 || v > 16 * 1024 * 1024) {
    throw new CliError(
      "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).",
    );
  }
  return v;
}

/** `-m`: the number of parallel requests, 1 to 16, read as C's strtol does. */
export function parseParallel(value: string): number {
  const n = strtolWhole(value);
  if (n === undefined || n < 1 || n > 16) {
    throw new CliError(
      "Invalid number of coroutines. Allowed number of coroutines is between 1 and 16",
    );
  }
  return n;
}

/** The `convert` command's definition for the CLI. */
export const convertCommand: CommandDef = {
  name: "convert",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("convert an image to a new raw, qcow2 or QED image (qemu-img convert)")
      // Optional for commander, so that `convert -O qcow2 -o help` needs no file names (as in
      // qemu-img); run() asks for them otherwise.
      .argument("[source]", "image to read")
      .argument("[target]", "file to write (created or truncated; with -n, written in place)")
      .option("-f, --format <fmt>", "source format (qcow2, qed, raw); probed when omitted")
      .option("-O, --output-format <fmt>", "output format (raw, qcow2, qed; default raw)")
      .option("-o, --options <opts>", "target creation options ('-o help' lists them)", collect)
      .option("-c, --compress", "write compressed clusters (qcow2)")
      .option("-p, --progress", "show progress on stdout, as qemu-img (a bar on a terminal)")
      .option("-q, --quiet", "quiet: no progress, even with -p")
      .option("-n, --no-create", "the target exists: write into it instead of creating it")
      .option("--target-is-zero", "with -n: the target already reads as zeros")
      .option("-B, --backing <file>", "create the target as an overlay of this backing file")
      .option("-F, --backing-format <fmt>", "format of the -B backing file")
      .option("-S, --sparse-size <size>", "shortest run of zeros left sparse (0: write everything)")
      .option("-m, --parallel <n>", "parallel requests, 1 to 16")
      .option("-W, --out-of-order", "write chunks as soon as they are read (out-of-order writes)")
      .option("-C, --copy-range", "copy offloading (not available in qimg: refused)")
      .option("-r, --rate-limit <rate>", "I/O rate limit in bytes per second (size suffixes)")
      .option("--salvage", "go on past read errors: unreadable sectors become zeros")
      .option(
        "-l, --snapshot <snapshot>",
        "convert an internal snapshot: snapshot.id=ID[,snapshot.name=NAME], snapshot.name=NAME, or an ID or name",
      )
      .option("-s, --snapshot-name <name>", "convert the internal snapshot with this ID or name")
      .option("--bitmaps", "copy every persistent bitmap to the (qcow2) target")
      .option("--skip-broken-bitmaps", "with --bitmaps: leave out inconsistent bitmaps")
      .option("--image-opts", "the source is an option string (driver=FMT,file.filename=PATH)")
      .option("--target-image-opts", "the target is an option string (with -n)")
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
    const str = (key: string): string | undefined => stringOpt(opts, key);
    // Value checks first, as qemu-img makes them while reading its options.
    const sparse = str("sparseSize");
    const minSparse = sparse === undefined ? undefined : parseMinSparse(sparse);
    const rate = str("rateLimit");
    const rateLimit = rate === undefined ? undefined : cvtsize("rate limit", rate);
    const par = str("parallel");
    const parallel = par === undefined ? undefined : parseParallel(par);
    const options: ConvertOptions = {
      cache: str("cache"),
      source: args[0] ?? "",
      target: args[1] ?? "",
      format: str("format"),
      outputFormat: str("outputFormat"),
      options: joinedOptions(opts),
      compress: opts.compress === true,
      progress: opts.progress === true && opts.quiet !== true,
      forceShare: opts.forceShare === true,
      // commander turns `--no-create` into create=false.
      noCreate: opts.create === false,
      targetIsZero: opts.targetIsZero === true,
      backing: str("backing"),
      backingFormat: str("backingFormat"),
      minSparse,
      parallel,
      outOfOrder: opts.outOfOrder === true,
      copyOffload: opts.copyRange === true,
      salvage: opts.salvage === true,
      rateLimit,
      imageOpts: opts.imageOpts === true,
      targetImageOpts: opts.targetImageOpts === true,
      snapshot: str("snapshot"),
      snapshotName: str("snapshotName"),
      bitmaps: opts.bitmaps === true,
      skipBrokenBitmaps: opts.skipBrokenBitmaps === true,
    };
    if (
      (args[0] === undefined || args[1] === undefined) &&
      !isHelpRequest(joinedOptions(opts) ?? "")
    ) {
      snapshotSelector(options);
      checkCombinations(options, options.options !== undefined);
      throw new CliError("Must specify image file name");
    }
    return runConvert(ctx, options);
  },
};

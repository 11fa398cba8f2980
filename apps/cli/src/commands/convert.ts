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
import { alignedBuffers } from "@qimg/io";
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
import { openImage, sameFile } from "../open.js";
import { CompressPool } from "../util/compress-pool.js";
import { blockStatusPays, copySparse } from "../util/copy.js";
import { preallocate, PREALLOCATE_MIN, type FileRange } from "../util/preallocate.js";
import { startProgress } from "../util/progress.js";
import { isHelpRequest, optionsHelp, parseOptions } from "../util/qemu-opts.js";
import { roundUp } from "../util/size.js";
import { isZero } from "../util/zero.js";
import { writableOf, type WritableImage } from "../writable.js";
import { collect, joinedOptions } from "./create.js";

/** `e` as an Error (rejections are errors here; anything else is wrapped). */
function asError(e: unknown): Error {
  return e instanceof Error ? e : new Error("request failed", { cause: e });
}

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

const CACHE_MODES = ["none", "writeback", "writethrough", "directsync", "unsafe"];

/** True when the target's flushes are skipped (cache=unsafe, the default). */
function targetNoFlush(cache: string | undefined): boolean {
  const mode = cache ?? "unsafe";
  if (!CACHE_MODES.includes(mode)) throw new CliError(`Invalid cache option: ${mode}`);
  return mode === "unsafe";
}

/** Output formats `dd` can write. */
export function checkOutputFormat(format: string, file: string): void {
  if (format === "raw") return;
  if (format === "qcow2" || format === "qed") {
    throw new CliError(`writing ${format} images with dd is not supported (use convert)`, { file });
  }
  throw new CliError(`Unknown file format '${format}'`, { file });
}

/** Bytes read per step; qemu-img uses 2 MiB buffers too. */
export const CONVERT_CHUNK = 2 * 1024 * 1024;
/** Uncompressed writes in flight. */
const WRITES_IN_FLIGHT = 8;

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
      // Preallocate room for the data past the new image's end (the file keeps its size), and
      // give back what the copy did not use at the end.
      const reserved =
        options.compress === true
          ? 0
          : await preallocate(
              options.target,
              [{ offset: statSync(options.target).size, length: await dataBytes(image, options) }],
              { keepSize: true },
            );
      await convertToImage(ctx, image, outFormat, options);
      if (reserved > 0) trimPastEnd(options.target);
      return 0;
    } catch (e) {
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
    if (blockStatusPays(image)) {
      await preallocate(options.target, (await dataExtents(image)).large);
    }
    const progress = startProgress(ctx, options.progress === true, size);
    try {
      await inFile(options.source, () =>
        copySparse(image, 0, size, target, 0, (done) => progress.update(done)),
      );
    } finally {
      progress.stop();
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
  let start = -1;
  let pos = 0;
  const size = image.virtualSize;
  const close = (end: number): void => {
    if (start >= 0) {
      bytes += end - start;
      if (end - start >= PREALLOCATE_MIN) large.push({ offset: start, length: end - start });
    }
    start = -1;
  };
  while (pos < size) {
    const s = await image.blockStatus(pos, size - pos);
    if (s.zero) close(s.offset);
    else if (start < 0) start = s.offset;
    pos = s.offset + s.length;
  }
  close(size);
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

/** Whether the source reads as zeros over [offset, end) (without reading data). */
async function allZero(image: DiskImage, offset: number, end: number): Promise<boolean> {
  let pos = offset;
  while (pos < end) {
    const s = await image.blockStatus(pos, end - pos);
    if (!s.zero) return false;
    pos = s.offset + s.length;
  }
  return true;
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
      const w = writableOf(target);
      if (compress && w.writeCompressed === undefined) {
        throw new CliError("Compression not supported for this file format");
      }
      await inFile(options.target, () =>
        copyInto(ctx, source, w, options, compress ? 4 * (pool?.size ?? 1) + 8 : WRITES_IN_FLIGHT),
      );
    } finally {
      await inFile(options.target, () => target.close());
    }
  } finally {
    await pool?.close();
  }
}

/**
 * Write explicit zeros over the parts of `[offset, offset + length)` where the new target does
 * not read as zeros yet (its backing file has data there), so the target reads as the source.
 */
async function zeroOverBacking(w: WritableImage, offset: number, length: number): Promise<void> {
  const end = offset + length;
  let pos = offset;
  while (pos < end) {
    const s = await w.image.blockStatus(pos, end - pos);
    const next = Math.min(end, s.offset + s.length);
    if (!s.zero) await w.writeZeroes(pos, next - pos, false);
    pos = next;
  }
}

/**
 * Copy `source` into `w` (a new image of at least the source's size, its virtual size rounded
 * up to 512): every cluster that is not all zeros is written, several writes in flight. The
 * copy covers the target's whole virtual size; what lies past the source's end reads as zeros,
 * so a last partial cluster is written (or compressed) padded with zeros. When the target has
 * a backing file, ranges where the source reads zeros but the target would show backing data
 * are zeroed explicitly.
 */
async function copyInto(
  ctx: CliContext,
  source: DiskImage,
  w: WritableImage,
  options: ConvertOptions,
  maxInFlight: number,
): Promise<void> {
  const srcSize = source.virtualSize;
  const size = Math.max(w.image.virtualSize, srcSize);
  const cs = w.clusterSize;
  const chunk = Math.max(CONVERT_CHUNK, cs);
  const compressed = options.compress === true;
  const backed = w.image.backing !== undefined;
  const inflight = new Set<Promise<void>>();
  let failure: unknown;
  const issue = async (p: Promise<void>): Promise<void> => {
    const tracked: Promise<void> = p
      .catch((e: unknown) => {
        failure ??= e;
      })
      .finally(() => inflight.delete(tracked));
    inflight.add(tracked);
    while (inflight.size >= maxInFlight) await Promise.race(inflight);
    if (failure !== undefined) throw asError(failure);
  };
  const progress = startProgress(ctx, options.progress === true, size);
  // A small pool of chunk buffers, reused once every write issued from one has finished
  // (fresh 2 MiB buffers per chunk cost page faults and zeroing on every chunk). They are
  // page-aligned, which makes the kernel's copies faster, and mapped once, on first use.
  const pool: { buf: Uint8Array; pending: Promise<void>[] }[] = [];
  let poolBuffers: Uint8Array[] | undefined;
  // Reads run ahead of the writes (on the thread pool, in parallel), while the writes are
  // issued strictly in guest order so the target allocates its clusters sequentially.
  const READ_AHEAD = 4;
  const poolSize = maxInFlight + READ_AHEAD + 2;
  let next = 0;
  const rawSource = !blockStatusPays(source);
  interface Ahead {
    readonly offset: number;
    readonly end: number;
    /** Undefined for a chunk the source reports as all zeros (nothing read). */
    readonly data?: {
      readonly buf: Uint8Array;
      readonly slot: { buf: Uint8Array; pending: Promise<void>[] };
      readonly read: Promise<void>;
    };
  }
  const ahead: Ahead[] = [];
  let nextOffset = 0;
  /** Start reading the next chunk (or note an all-zero one); false at the end. */
  const startRead = async (): Promise<boolean> => {
    while (nextOffset < size) {
      const offset = nextOffset;
      const end = Math.min(size, offset + chunk);
      nextOffset = end;
      const srcEnd = Math.min(end, srcSize);
      if (
        offset >= srcSize ||
        (!rawSource && (await inFile(options.source, () => allZero(source, offset, srcEnd))))
      ) {
        if (!backed) continue;
        ahead.push({ offset, end });
        return true;
      }
      let slot = pool[next % poolSize];
      if (slot === undefined) {
        poolBuffers ??= alignedBuffers(poolSize, chunk);
        slot = { buf: poolBuffers[pool.length]!, pending: [] };
        pool.push(slot);
      } else {
        await Promise.all(slot.pending);
        slot.pending = [];
      }
      next++;
      const buf = slot.buf.subarray(0, end - offset);
      // Past the source's end the target reads zeros (the buffer is reused: clear it).
      buf.fill(0, srcEnd - offset);
      const read = inFile(options.source, () =>
        source.read(offset, buf.subarray(0, srcEnd - offset)),
      );
      read.catch(() => undefined); // awaited in order below
      ahead.push({ offset, end, data: { buf, slot, read } });
      return true;
    }
    return false;
  };
  try {
    while (ahead.length < READ_AHEAD && (await startRead()));
    while (ahead.length > 0) {
      const { offset, end, data } = ahead.shift()!;
      progress.update(offset);
      if (data === undefined) {
        await issue(zeroOverBacking(w, offset, end - offset));
      } else {
        const { buf, slot, read } = data;
        await read;
        const track = (p: Promise<void>): Promise<void> => {
          slot.pending.push(p.catch(() => undefined));
          return issue(p);
        };
        const n = buf.length;
        // Runs of data clusters are written together; runs of zero clusters only need work
        // when the target has a backing file.
        let dataStart = -1;
        let zeroStart = -1;
        for (let b = 0; b < n; b += cs) {
          const e = Math.min(b + cs, n);
          if (isZero(buf, b, e)) {
            if (dataStart >= 0) {
              await track(w.write(offset + dataStart, buf.subarray(dataStart, b)));
              dataStart = -1;
            }
            if (zeroStart < 0) zeroStart = b;
          } else {
            if (zeroStart >= 0) {
              if (backed) await track(zeroOverBacking(w, offset + zeroStart, b - zeroStart));
              zeroStart = -1;
            }
            if (compressed) await track(w.writeCompressed!(offset + b, buf.subarray(b, e)));
            else if (dataStart < 0) dataStart = b;
          }
        }
        if (dataStart >= 0) await track(w.write(offset + dataStart, buf.subarray(dataStart, n)));
        if (zeroStart >= 0 && backed) {
          await track(zeroOverBacking(w, offset + zeroStart, n - zeroStart));
        }
      }
      while (ahead.length < READ_AHEAD && (await startRead()));
    }
    await Promise.all(inflight);
    if (failure !== undefined) throw asError(failure);
    await w.flush();
  } finally {
    progress.stop();
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

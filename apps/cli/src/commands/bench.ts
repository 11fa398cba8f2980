/**
 * `qimg bench [-c count] [-d depth] [-f fmt] [--flush-interval=N] [--no-drain] [-n]
 * [-o offset] [--pattern=N] [-q] [-s size] [-S step] [-t cache] [-w] [-U] FILE`, as qemu-img
 * bench: `count` requests of `size` bytes (default 4 KiB) with `depth` in flight (default 64),
 * at sequential offsets from `offset` advancing by `step` (default `size`) and wrapping modulo
 * (image size - size), reads or (-w) writes of the byte `pattern` (default 0).
 */
import { alignedBuffers } from "@qimg/io";
import type { Command } from "commander";
import { stringOpt, type CommandDef } from "../command.js";
import type { CliContext } from "../context.js";
import { CliError } from "../errors.js";
import { openImage, writeTarget } from "../open.js";
import { parseSize } from "../util/size.js";
import { cacheWritethrough } from "../util/cache-mode.js";

/** `e` as an Error (rejections are errors here; anything else is wrapped). */
function asError(e: unknown): Error {
  return e instanceof Error ? e : new Error("request failed", { cause: e });
}

export interface BenchOptions {
  readonly file: string;
  readonly format?: string | undefined;
  readonly count?: string | undefined;
  readonly depth?: string | undefined;
  readonly offset?: string | undefined;
  readonly size?: string | undefined;
  readonly step?: string | undefined;
  readonly cache?: string | undefined;
  readonly nocache?: boolean;
  readonly write?: boolean;
  readonly pattern?: string | undefined;
  readonly flushInterval?: string | undefined;
  readonly noDrain?: boolean;
  readonly quiet?: boolean;
  /** qemu-img -U (read benchmarks only). */
  readonly forceShare?: boolean;
}

const INT_MAX = 2147483647;

function intArg(text: string | undefined, fallback: number, what: string, min: number): number {
  if (text === undefined) return fallback;
  if (!/^\d+$/.test(text.trim()) || Number(text) < min || Number(text) > INT_MAX) {
    throw new CliError(`Invalid ${what} specified`);
  }
  return Number(text);
}

function sizeArg(text: string | undefined, fallback: number, what: string, max: number): number {
  if (text === undefined) return fallback;
  let v: number;
  try {
    v = parseSize(text);
  } catch {
    throw new CliError(`Invalid ${what} specified`);
  }
  if (v > max) throw new CliError(`Invalid ${what} specified`);
  return v;
}

export async function runBench(ctx: CliContext, o: BenchOptions): Promise<number> {
  const count = intArg(o.count, 75000, "request count", 1);
  const depth = intArg(o.depth, 64, "queue depth", 1);
  const offset = sizeArg(o.offset, 0, "offset", Number.MAX_SAFE_INTEGER);
  const bufsize = sizeArg(o.size, 4096, "buffer size", INT_MAX);
  if (bufsize === 0) throw new CliError("Invalid buffer size specified");
  const step = sizeArg(o.step, 0, "step size", INT_MAX) || bufsize;
  const pattern = intArg(o.pattern, 0, "pattern byte", 0);
  if (pattern > 255) throw new CliError("Invalid pattern byte specified");
  const flushInterval = intArg(o.flushInterval, 0, "flush interval", 0);
  const isWrite = o.write === true;
  if (flushInterval > 0 && !isWrite)
    throw new CliError("--flush-interval is only available in write tests");
  if (flushInterval > 0 && flushInterval < depth)
    throw new CliError("Flush interval can't be smaller than depth");
  if (o.noDrain === true && flushInterval === 0)
    throw new CliError("--no-drain requires --flush-interval");
  const writethrough = cacheWritethrough(o.nocache === true ? "none" : o.cache);

  const image = await openImage(o.file, {
    format: o.format,
    readOnly: !isWrite,
    ctx,
    qcow2: { writethrough },
    forceShare: o.forceShare === true,
  });
  try {
    const w = isWrite ? writeTarget(image) : undefined;
    const imageSize = image.virtualSize;
    if (!o.quiet) {
      ctx.stdout(
        `Sending ${count} ${isWrite ? "write" : "read"} requests, ${bufsize} bytes each, ${depth} in parallel (starting at offset ${offset}, step size ${step})\n`,
      );
      if (flushInterval > 0) ctx.stdout(`Sending flush every ${flushInterval} requests\n`);
    }
    // Page-aligned request buffers, as qemu-img bench's: the kernel copies to and from them
    // faster.
    const buffers = alignedBuffers(Math.max(1, Math.min(depth, count)), bufsize);
    for (const b of buffers) b.fill(pattern);
    let next = offset;
    let issued = 0;
    let sinceFlush = 0;
    let failure: unknown;
    const inflight = new Set<Promise<void>>();
    const t0 = performance.now();
    const issue = (slot: number): Promise<void> => {
      const at = next;
      next += step;
      next = imageSize <= bufsize ? 0 : next % (imageSize - bufsize);
      issued++;
      const buf = buffers[slot] ?? new Uint8Array(bufsize);
      return w !== undefined ? w.write(at, buf) : image.read(at, buf);
    };
    // `depth` lanes, each issuing its next request when the previous one completes.
    const lane = async (slot: number): Promise<void> => {
      while (issued < count && failure === undefined) {
        if (flushInterval > 0 && sinceFlush >= flushInterval) {
          sinceFlush = 0;
          if (o.noDrain !== true) await Promise.all([...inflight]);
          await w?.flush();
        }
        sinceFlush++;
        const p = issue(slot);
        inflight.add(p);
        try {
          await p;
        } catch (e) {
          failure ??= e;
        } finally {
          inflight.delete(p);
        }
      }
    };
    await Promise.all(buffers.map((_, slot) => lane(slot)));
    if (failure !== undefined) throw asError(failure);
    const seconds = (performance.now() - t0) / 1000;
    if (!o.quiet) ctx.stdout(`Run completed in ${seconds.toFixed(3)} seconds.\n`);
    return 0;
  } finally {
    await image.close();
  }
}

export const benchCommand: CommandDef = {
  name: "bench",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("run a simple sequential I/O benchmark on an image (qemu-img bench)")
      .argument("<filename>", "image to read or write")
      .option("-c, --count <n>", "number of requests (default 75000)")
      .option("-d, --depth <n>", "requests in flight (default 64)")
      .option("-f, --format <fmt>", "image format (qcow2, qed, raw); probed when omitted")
      .option("-n, --nocache", "cache mode none")
      .option("-o, --offset <offset>", "offset of the first request (default 0)")
      .option("-s, --size <size>", "bytes per request (default 4k)")
      .option("-S, --step <size>", "offset increment (default: the request size)")
      .option("-t, --cache <mode>", "cache mode (writeback, writethrough, none, ...)")
      .option("-w, --write", "write instead of read")
      .option("-q, --quiet", "print nothing")
      .option("-i, --aio <mode>", "accepted for qemu-img compatibility")
      .option("--pattern <byte>", "byte written by -w (default 0)")
      .option("--flush-interval <n>", "flush every N write requests")
      .option("--no-drain", "do not wait for requests in flight before a flush")
      .option(
        "-U, --force-share",
        "open read-only images even while another process writes them (qemu-img -U: shares every lock; read-only opens only)",
      );
  },
  run(ctx, args, opts) {
    return runBench(ctx, {
      file: args[0] ?? "",
      format: stringOpt(opts, "format"),
      count: stringOpt(opts, "count"),
      depth: stringOpt(opts, "depth"),
      offset: stringOpt(opts, "offset"),
      size: stringOpt(opts, "size"),
      step: stringOpt(opts, "step"),
      cache: stringOpt(opts, "cache"),
      nocache: opts.nocache === true,
      write: opts.write === true,
      pattern: stringOpt(opts, "pattern"),
      flushInterval: stringOpt(opts, "flushInterval"),
      noDrain: opts.drain === false,
      quiet: opts.quiet === true,
      forceShare: opts.forceShare === true,
    });
  },
};

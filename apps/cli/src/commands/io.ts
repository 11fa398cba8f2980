/**
 * `qimg io [-f fmt] [-r] [-t cache] [-o opt=val,...] -c CMD [-c CMD ...] FILE`: a qemu-io-like
 * scripting tool (see ../io-script.ts for the commands). The image is opened read-write unless
 * -r, and closed cleanly at the end (which clears the dirty bit) — except after `abort` or
 * `sigraise`, which end the process at once, leaving a crash image.
 *
 * Open options (`-o`): `lazy-refcounts=on|off`, `cache=writeback|writethrough|...`. The cache
 * mode (`-t`, `-n`) defaults to qemu-io's, writethrough: a write that completed survives a
 * crash (`abort`, a kill) with its metadata; writeback keeps metadata cached until a flush.
 * Exit status: 0, or 1 when a command failed (qemu-io's); 134 after `abort`.
 */
import type { Command } from "commander";
import { stringOpt, type CommandDef } from "../command.js";
import type { CliContext } from "../context.js";
import { BACKING_FAILED, CliError, messageOf, printCorruptionEvents } from "../errors.js";
import { IoScript, ScriptCrash, type ScriptOpener } from "../io-script.js";
import { openImage, writeTarget } from "../open.js";
import { parseBool, splitOptions } from "../util/qemu-opts.js";
import { cacheMode, type CacheMode } from "../util/cache-mode.js";
import { collect } from "../util/cli-options.js";
import { repairDirtyQcow2 } from "../util/repair-dirty.js";

export interface IoOptions {
  readonly file: string;
  readonly commands: readonly string[];
  readonly format?: string | undefined;
  readonly readOnly?: boolean;
  /** `-o` open options, joined. */
  readonly openOptions?: string | undefined;
  /** `-t` cache mode. */
  readonly cache?: string | undefined;
  /** qemu-io -U (with -r only). */
  readonly forceShare?: boolean;
}

/** qemu-io's default cache mode: every request is durable when it completes. */
export const DEFAULT_IO_CACHE: CacheMode = "writethrough";

export async function runIo(ctx: CliContext, o: IoOptions): Promise<number> {
  let lazyRefcounts: boolean | undefined;
  let mode = cacheMode(o.cache ?? DEFAULT_IO_CACHE);
  for (const [key, value] of splitOptions(o.openOptions ?? "")) {
    switch (key) {
      case "lazy-refcounts":
      case "lazy_refcounts":
        lazyRefcounts = parseBool(key, value ?? "on");
        break;
      case "cache":
      case "cache.mode":
        mode = cacheMode(value ?? "");
        break;
      default:
        throw new CliError(`Invalid parameter '${key}'`, { file: o.file });
    }
  }
  const readOnly = o.readOnly === true;
  // A read-write open of a dirty qcow2 image repairs it first, as qemu-io's does.
  if (!readOnly) await repairDirtyQcow2(ctx, o.file, o.format);
  const stopEvents = printCorruptionEvents(ctx);
  try {
    return await runScript(ctx, o, readOnly, mode, lazyRefcounts);
  } finally {
    stopEvents();
  }
}

async function runScript(
  ctx: CliContext,
  o: IoOptions,
  readOnly: boolean,
  mode: ReturnType<typeof cacheMode>,
  lazyRefcounts: boolean | undefined,
): Promise<number> {
  const image = await openImage(o.file, {
    format: o.format,
    readOnly,
    ctx,
    noFlush: mode.noFlush,
    qcow2: { lazyRefcounts, writethrough: mode.writethrough },
    forceShare: o.forceShare === true,
  }).catch((e: unknown) => {
    // qemu-io's words for an image whose backing file cannot be opened.
    const message = messageOf(e, o.file);
    if (!message.startsWith(BACKING_FAILED)) throw e;
    throw new CliError(`can't open device ${o.file}: ${message}`, { cause: e });
  });
  let crashed = false;
  let script: IoScript | undefined;
  try {
    const writable = readOnly ? undefined : writeTarget(image);
    // Under a write-through cache mode every write, zero write and discard of a QED or raw
    // image is followed by a flush. (The qcow2 driver does this itself, ordering its metadata
    // as QEMU does.)
    const flushEachWrite = mode.writethrough && image.format !== "qcow2";
    const opener: ScriptOpener = async (file, opts) => {
      const m = opts.cache === undefined ? mode : cacheMode(opts.cache);
      const next = await openImage(file, {
        format: opts.format ?? o.format,
        readOnly: opts.readOnly,
        ctx,
        noFlush: m.noFlush,
        qcow2: { lazyRefcounts, writethrough: m.writethrough },
        forceShare: opts.forceShare === true,
      });
      return {
        image: next,
        writable: opts.readOnly ? undefined : writeTarget(next),
        file,
        flushEachWrite: m.writethrough && next.format !== "qcow2",
      };
    };
    script = new IoScript({ image, writable, file: o.file, flushEachWrite }, ctx, opener);
    try {
      for (const line of o.commands) await script.run(line);
      await script.drain();
    } catch (e) {
      if (e instanceof ScriptCrash) {
        crashed = true;
        return e.exitCode;
      }
      throw e;
    }
    return script.failed ? 1 : 0;
  } finally {
    // A crash leaves the image as it is (no flush, no clean close). The script may have
    // closed or reopened it (close, open, reopen).
    if (!crashed) await (script === undefined ? image.close() : script.close());
  }
}

export const ioCommand: CommandDef = {
  name: "io",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("run qemu-io style commands on an image (read, write, discard, map, aio_*...)")
      .argument("<filename>", "image to open")
      .option(
        "-c, --cmd <command>",
        "command to run (repeatable), e.g. 'write -P 0xab 0 64k'",
        collect,
      )
      .option("-f, --format <fmt>", "image format (qcow2, qed, raw); probed when omitted")
      .option("-r, --read-only", "open the image read-only")
      .option(
        "-t, --cache <mode>",
        "cache mode: writethrough (default, as qemu-io), writeback, none, directsync, unsafe",
      )
      .option("-n, --nocache", "short for -t none (as qemu-io)")
      .option("-o, --options <opts>", "open options: lazy-refcounts=on|off, cache=MODE", collect)
      .option(
        "-U, --force-share",
        "open the image even while another process writes it (qemu-io -U: shares every lock; needs -r)",
      );
  },
  run(ctx, args, opts) {
    const cmds = Array.isArray(opts.cmd) ? opts.cmd.map(String) : [];
    const openOptions = Array.isArray(opts.options)
      ? opts.options.map(String).join(",")
      : undefined;
    return runIo(ctx, {
      file: args[0] ?? "",
      commands: cmds,
      format: stringOpt(opts, "format"),
      readOnly: opts.readOnly === true,
      openOptions,
      cache: stringOpt(opts, "cache") ?? (opts.nocache === true ? "none" : undefined),
      forceShare: opts.forceShare === true,
    });
  },
};

/**
 * `qimg amend [-f fmt] [-p] [-q] [-t cache] [--force] -o OPTIONS FILE` — qemu-img amend for
 * qcow2: compat (0.10 / 1.1), lazy_refcounts, refcount_bits, data_file, data_file_raw, size,
 * and backing_file / backing_fmt only to their current values (qemu-img 7.2 refuses changes:
 * use rebase). `-o help` lists the options. Options only for image creation, QED and raw are
 * refused in qemu-img's words (exit 1); a refused amend leaves the file as it was.
 */
import type { Command } from "commander";
import { ErrorCode, isQimgError } from "@qimg/structs";
import { Qcow2Image } from "@qimg/qcow2";
import type { Qcow2AmendOptions } from "@qimg/qcow2";
import type { CommandDef } from "../command.js";
import { stringOpt } from "../command.js";
import { CliError, inFile } from "../errors.js";
import { openImage } from "../open.js";
import { collect } from "../util/cli-options.js";
import { isHelpRequest, parseOptions, splitOptions } from "../util/qemu-opts.js";
import type { OptDesc } from "../util/qemu-opts.js";
import { startProgress } from "../util/progress.js";
import { repairDirtyQcow2 } from "../util/repair-dirty.js";

/** qcow2's amend options, as `qemu-img amend -f qcow2 -o help` lists them. */
export const QCOW2_AMEND_OPTIONS: readonly OptDesc[] = [
  { name: "backing_file", type: "str", help: "File name of a base image" },
  { name: "backing_fmt", type: "str", help: "Image format of the base image" },
  { name: "compat", type: "str", help: "Compatibility level (v2 [0.10] or v3 [1.1])" },
  { name: "data_file", type: "str", help: "File name of an external data file" },
  {
    name: "data_file_raw",
    type: "bool",
    help: "The external data file must stay valid as a raw image",
  },
  { name: "encrypt.iter-time", type: "num", help: "Time to spend in PBKDF in milliseconds" },
  { name: "encrypt.keyslot", type: "num", help: "Select a single keyslot to modify explicitly" },
  {
    name: "encrypt.new-secret",
    type: "str",
    help: "New secret to set in the matching keyslots. Empty string to erase",
  },
  { name: "encrypt.old-secret", type: "str", help: "Select all keyslots that match this password" },
  {
    name: "encrypt.state",
    type: "str",
    help: "Select new state of affected keyslots (active/inactive)",
  },
  { name: "lazy_refcounts", type: "bool", help: "Postpone refcount updates" },
  { name: "refcount_bits", type: "num", help: "Width of a reference count entry in bits" },
  { name: "size", type: "size", help: "Virtual disk size" },
];

const TYPE_LABEL = { str: "<str>", bool: "<bool (on/off)>", size: "<size>", num: "<num>" };

/** `qemu-img amend -f qcow2 -o help`. */
export function amendHelp(): string {
  const lines = QCOW2_AMEND_OPTIONS.map(
    (d) => `  ${`${d.name}=${TYPE_LABEL[d.type]}`.padEnd(22)} - ${d.help}`,
  );
  return `Amend options for 'qcow2':\n${lines.join("\n")}\n`;
}

/** qemu's is_valid_option_list: not empty, no leading comma, no odd run of trailing commas. */
function validOptionList(text: string): boolean {
  if (text === "" || text.startsWith(",")) return false;
  let i = text.length;
  while (i > 0 && text[i - 1] === ",") i--;
  return (text.length - i) % 2 === 0;
}

/** Formats qemu-img 7.2 knows but cannot amend (`-o help` names them in its refusal). */
const QEMU_FORMATS = [
  "raw",
  "qed",
  "qcow",
  "vmdk",
  "vdi",
  "vpc",
  "vhdx",
  "luks",
  "parallels",
  "bochs",
  "cloop",
  "dmg",
  "vvfat",
  "file",
  "host_device",
  "nbd",
  "blkdebug",
  "null-co",
  "throttle",
  "copy-on-read",
];

/** The format's refusal, as qemu-img words it, for anything but qcow2. */
function refuseFormat(format: string, known: boolean): never {
  if (!known && !QEMU_FORMATS.includes(format))
    throw new CliError(`Unknown file format '${format}'`);
  throw new CliError(`Format driver '${format}' does not support option amendment`);
}

/** qemu's QemuOpts: a key without '=' means "on", whatever its type. */
function withBareKeysOn(text: string): string {
  return splitOptions(text)
    .map(([k, v]) => `${k.replaceAll(",", ",,")}=${(v ?? "on").replaceAll(",", ",,")}`)
    .join(",");
}

/** Turn the parsed `-o` values into the driver's amend options. */
function amendOptionsOf(text: string): Qcow2AmendOptions {
  const opts = parseOptions(withBareKeysOn(text), QCOW2_AMEND_OPTIONS, undefined);
  for (const key of opts.keys()) {
    if (key.startsWith("encrypt.")) {
      throw new CliError("Can't amend encryption options - encryption not present");
    }
  }
  const str = (k: string): string | undefined => {
    const v = opts.get(k)?.value;
    return typeof v === "string" ? v : undefined;
  };
  const num = (k: string): number | undefined => {
    const v = opts.get(k)?.value;
    return typeof v === "number" ? v : undefined;
  };
  const bool = (k: string): boolean | undefined => {
    const v = opts.get(k)?.value;
    return typeof v === "boolean" ? v : undefined;
  };
  return {
    compat: str("compat"),
    lazyRefcounts: bool("lazy_refcounts"),
    refcountBits: num("refcount_bits"),
    backingFile: str("backing_file"),
    backingFormat: str("backing_fmt"),
    dataFile: str("data_file"),
    dataFileRaw: bool("data_file_raw"),
    size: num("size"),
  };
}

const ZERO_FAILED = "Failed to zero out new clusters:";

/** A refusal or bad value from the driver: qemu-img prints it without the file name. */
function isRefusal(e: unknown): boolean {
  return (
    isQimgError(e) &&
    (e.code === ErrorCode.INVALID_ARGUMENT ||
      e.code === ErrorCode.UNSUPPORTED_FEATURE ||
      e.code === ErrorCode.RANGE)
  );
}

export const amendCommand: CommandDef = {
  name: "amend",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("change the format options of a qcow2 image (qemu-img amend)")
      .argument("[filename...]", "image to amend")
      .option("-f, --format <fmt>", "image format (only qcow2 can be amended); probed when omitted")
      .option(
        "-o, --options <opts>",
        "options to change, comma separated ('-o help' lists them)",
        collect,
      )
      .option("-p, --progress", "show progress on stdout, as qemu-img (a bar on a terminal)")
      .option("-q, --quiet", "quiet: no progress, even with -p")
      .option("-t, --cache <mode>", "accepted for qemu-img compatibility")
      .option("--force", "accepted for qemu-img compatibility (only encryption changes use it)");
  },
  async run(ctx, args, opts) {
    const list = Array.isArray(opts.options) ? opts.options.map(String) : [];
    if (list.length === 0) throw new CliError("Must specify options (-o)");
    for (const item of list) {
      if (!validOptionList(item)) throw new CliError(`Invalid option list: ${item}`);
    }
    const text = list.join(",");
    const format = stringOpt(opts, "format");
    const help = isHelpRequest(text);
    if (format !== undefined && help) {
      // With -f, qemu-img answers `-o help` without opening the file.
      if (format !== "qcow2") refuseFormat(format, false);
      ctx.stdout(amendHelp());
      return 0;
    }
    if (args.length !== 1) throw new CliError("Expecting one image file name");
    const file = args[0] ?? "";
    // qemu-img amend opens the image read-write, and QEMU repairs a dirty qcow2 image at that
    // open, printing the check's lines on stderr.
    await repairDirtyQcow2(ctx, file, format);
    const image = await openImage(file, { format, readOnly: false, ctx });
    try {
      if (!(image instanceof Qcow2Image)) refuseFormat(image.format, true);
      if (help) {
        ctx.stdout(amendHelp());
        return 0;
      }
      const options = amendOptionsOf(text);
      const quiet = opts.quiet === true;
      const progress = startProgress(ctx, opts.progress === true && !quiet, 100);
      try {
        await image.amend({
          ...options,
          onProgress: (done, total) => progress.update((100 * done) / total),
        });
      } catch (e) {
        if (isRefusal(e)) {
          const message = e instanceof Error ? e.message : String(e);
          // The driver's resize explains why a version 2 image cannot grow over its backing
          // file; qemu-img says only the errno's words (ENOTSUP).
          throw new CliError(
            message.startsWith(ZERO_FAILED) ? `${ZERO_FAILED} Operation not supported` : message,
          );
        }
        throw e;
      } finally {
        progress.stop();
      }
    } finally {
      await inFile(file, () => image.close());
    }
    return 0;
  },
};

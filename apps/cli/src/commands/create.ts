/**
 * `qimg create [-f fmt] [-b backing -F backing_fmt] [-u] [-o opts] [-q] FILE [SIZE]`, as
 * qemu-img create: prints "Formatting 'FILE', fmt=..." (unless -q), defaults the size to the
 * backing file's, and fails with qemu-img's reasons (exit 1).
 */
import type { Command } from "commander";
import { stringOpt, type CommandDef } from "../command.js";
import type { CliContext } from "../context.js";
import { acceptedOptionsOf, checkCreateFormat, createImage, optionsOf } from "../create-image.js";
import { CliError } from "../errors.js";
import { collect, joinedOptions } from "../util/cli-options.js";
import { isHelpRequest, optionsHelp, parseOptions } from "../util/qemu-opts.js";
import { parseSize } from "../util/size.js";

export const SIZE_ERROR =
  "Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.";

export interface CreateOptions {
  readonly file: string | undefined;
  readonly size?: string | undefined;
  readonly format?: string | undefined;
  readonly backingFile?: string | undefined;
  readonly backingFormat?: string | undefined;
  /** `-o` values, joined with commas. */
  readonly options?: string | undefined;
  readonly quiet?: boolean;
  readonly unsafe?: boolean;
}

export async function runCreate(ctx: CliContext, o: CreateOptions): Promise<number> {
  const format = checkCreateFormat(o.format ?? "raw", o.file);
  const optText = o.options ?? "";
  if (isHelpRequest(optText)) {
    ctx.stdout(optionsHelp(format, optionsOf(format)));
    return 0;
  }
  const file = o.file;
  if (file === undefined) throw new CliError("Expecting image file name");
  let size: number | undefined;
  if (o.size !== undefined) {
    try {
      size = parseSize(o.size);
    } catch {
      throw new CliError(SIZE_ERROR);
    }
  }
  const opts = parseOptions(optText, acceptedOptionsOf(format), file);
  if (o.backingFile !== undefined)
    opts.set("backing_file", { text: o.backingFile, value: o.backingFile });
  if (o.backingFormat !== undefined)
    opts.set("backing_fmt", { text: o.backingFormat, value: o.backingFormat });
  await createImage({
    file,
    format,
    opts,
    size,
    quiet: o.quiet === true,
    unsafe: o.unsafe === true,
    ctx,
  });
  return 0;
}

export const createCommand: CommandDef = {
  name: "create",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("create a new qcow2, QED or raw image (qemu-img create)")
      .argument("[filename]", "image file to create (truncated when it exists)")
      .argument("[size]", "virtual size (k, M, G, T suffixes); default: the backing file's")
      .option("-f, --format <fmt>", "image format: qcow2, qed, raw", "raw")
      .option("-b, --backing <file>", "backing file (relative to the new image's directory)")
      .option("-F, --backing-format <fmt>", "backing file format")
      .option(
        "-o, --options <opts>",
        "format options, comma separated ('-o help' lists them)",
        collect,
      )
      .option("-u, --unsafe", "do not open the backing file (needs an explicit size)")
      .option("-q, --quiet", "do not print the Formatting line");
  },
  run(ctx, args, opts) {
    return runCreate(ctx, {
      file: args[0],
      size: args[1],
      format: stringOpt(opts, "format"),
      backingFile: stringOpt(opts, "backing"),
      backingFormat: stringOpt(opts, "backingFormat"),
      options: joinedOptions(opts),
      quiet: opts.quiet === true,
      unsafe: opts.unsafe === true,
    });
  },
};

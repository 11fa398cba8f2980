/**
 * `qimg convert [-f fmt] [-O raw] [-p] [-U] SRC DST`: write the guest content of SRC to a new
 * raw file DST, sparsely (zero and unallocated ranges are not written).
 */
import type { Command } from "commander";
import { FileBackend } from "@qimg/io";
import { stringOpt, type CommandDef } from "../command.js";
import type { CliContext } from "../context.js";
import { CliError, inFile } from "../errors.js";
import { openImage, sameFile } from "../open.js";
import { copySparse } from "../util/copy.js";
import { startProgress } from "../util/progress.js";
import { roundUp } from "../util/size.js";

export interface ConvertOptions {
  readonly source: string;
  readonly target: string;
  readonly format?: string | undefined;
  /** Output format; only "raw" for now. */
  readonly outputFormat?: string | undefined;
  readonly progress?: boolean;
}

/** Output formats `convert` and `dd` can write today. */
export function checkOutputFormat(format: string, file: string): void {
  if (format === "raw") return;
  if (format === "qcow2" || format === "qed") {
    throw new CliError(`writing ${format} images is not supported yet (use -O raw)`, { file });
  }
  throw new CliError(`Unknown file format '${format}'`, { file });
}

export async function runConvert(ctx: CliContext, options: ConvertOptions): Promise<number> {
  checkOutputFormat(options.outputFormat ?? "raw", options.target);
  if (sameFile(options.source, options.target)) {
    throw new CliError("the output file is the input file", { file: options.target });
  }
  const image = await openImage(options.source, { format: options.format, ctx });
  try {
    const size = image.virtualSize;
    const target = await inFile(options.target, () =>
      FileBackend.open(options.target, { create: true, truncate: true }),
    );
    try {
      await inFile(options.target, () => target.truncate(roundUp(size, 512)));
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
    return 0;
  } finally {
    await image.close();
  }
}

export const convertCommand: CommandDef = {
  name: "convert",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("convert an image to a raw file (qemu-img convert)")
      .argument("<source>", "image to read")
      .argument("<target>", "file to write (created or truncated)")
      .option("-f, --format <fmt>", "source format (qcow2, qed, raw); probed when omitted")
      .option("-O, --output-format <fmt>", "output format (raw)", "raw")
      .option("-p, --progress", "show a progress bar on stderr (when it is a terminal)")
      .option("-U, --force-share", "accepted for qemu-img compatibility (qimg takes no locks)");
  },
  run(ctx, args, opts) {
    return runConvert(ctx, {
      source: args[0] ?? "",
      target: args[1] ?? "",
      format: stringOpt(opts, "format"),
      outputFormat: stringOpt(opts, "outputFormat"),
      progress: opts.progress === true,
    });
  },
};

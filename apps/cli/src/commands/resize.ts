/**
 * `qimg resize [-f fmt] [--shrink] [-q] FILE [+|-]SIZE` — qemu-img resize. Growing works on
 * raw, qcow2 and QED; shrinking needs `--shrink` and is supported for raw only (as qemu-img
 * 7.2 for QED; qimg does not shrink qcow2 either).
 */
import type { Command } from "commander";
import type { CommandDef } from "../command.js";
import { stringOpt } from "../command.js";
import { qcow2InfoOf, type DiskImage } from "../drivers.js";
import { CliError, inFile } from "../errors.js";
import { openImage } from "../open.js";
import { parseSize } from "../util/size.js";

/**
 * qemu-img's refusals that depend on the image, checked before anything changes: a version 2
 * qcow2 image does not record each snapshot's disk size, so QEMU will not resize one that has
 * snapshots (they would read past their L1 tables).
 */
function checkResizable(image: DiskImage): void {
  const info = qcow2InfoOf(image);
  if (info?.compat === "0.10" && info.snapshots.length > 0) {
    throw new CliError("Can't resize a v2 image which has snapshots");
  }
}

export const resizeCommand: CommandDef = {
  name: "resize",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("change the virtual size of an image (qemu-img resize)")
      .argument("<file>", "image to resize")
      .argument(
        "<size>",
        "new size, or +SIZE / -SIZE relative to the current one (k, M, G, T suffixes)",
      )
      .option("-f, --format <fmt>", "image format (qcow2, qed, raw); probed when omitted")
      .option("--shrink", "allow making the image smaller (data past the new end is lost)")
      .option("-q, --quiet", "print nothing on success")
      .option(
        "-U, --force-share",
        "accepted for qemu-img compatibility (resize always needs the write lock)",
      );
  },
  async run(ctx, args, opts) {
    const file = args[0] ?? "";
    const sizeText = args[1] ?? "";
    const format = stringOpt(opts, "format");
    // The size is checked before the image is opened.
    const sign = sizeText.startsWith("+") ? 1 : sizeText.startsWith("-") ? -1 : 0;
    let amount: number;
    try {
      amount = parseSize(sign === 0 ? sizeText : sizeText.slice(1));
    } catch {
      throw new CliError(
        `Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`,
      );
    }
    // Every refusal is decided on a read-only open: a read-write open may already change the
    // file (it repairs an image left dirty), and a refused resize changes nothing.
    let size: number;
    // (forceShare: while QEMU writes the image, the read-write open below gives qemu-img's
    // refusal, not this look.)
    const probe = await openImage(file, { format, readOnly: true, ctx, forceShare: true });
    try {
      const current = probe.virtualSize;
      size = sign === 0 ? amount : current + sign * amount;
      if (size < 0) throw new CliError("New image size must be positive.");
      if (size < current) {
        if (opts.shrink !== true) {
          throw new CliError("Use the --shrink option to perform a shrink operation.");
        }
        ctx.stderr(
          "qimg: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.\n",
        );
        if (probe.format !== "raw")
          throw new CliError("Shrinking images is currently not supported", { file });
      }
      checkResizable(probe);
    } finally {
      await inFile(file, () => probe.close());
    }
    const image = await openImage(file, { format, readOnly: false, ctx });
    try {
      // Raw: the file is truncated to the new size; qcow2 and QED grow their tables.
      await inFile(file, () => image.resize(size));
    } finally {
      await inFile(file, () => image.close());
    }
    if (opts.quiet !== true) ctx.stdout("Image resized.\n");
    return 0;
  },
};

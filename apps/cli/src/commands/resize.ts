/**
 * `qimg resize [-f fmt] [--shrink] [--preallocation=MODE] [-q] FILE [+|-]SIZE` — qemu-img
 * resize. Growing works on raw, qcow2 and QED; shrinking needs `--shrink` and works on raw and
 * qcow2 (QED refuses it, as qemu-img 7.2). `--preallocation` (off, metadata, falloc, full)
 * only on grow: qcow2 takes every mode, raw falloc and full, QED none (qemu-img's refusals).
 */
import type { Command } from "commander";
import type { CommandDef } from "../command.js";
import { stringOpt } from "../command.js";
import { qcow2InfoOf, type DiskImage } from "../drivers.js";
import { CliError, inFile } from "../errors.js";
import { Qcow2Image } from "@qimg/qcow2";
import type { Qcow2Preallocation } from "@qimg/qcow2";
import { openSync, closeSync, writeSync } from "node:fs";
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

/** Raw falloc/full preallocation: the new area is written with zeros (allocated on disk). */
function writeZeros(file: string, from: number, to: number): void {
  const fd = openSync(file, "r+");
  try {
    const chunk = new Uint8Array(Math.min(4 * 1024 * 1024, to - from));
    for (let p = from; p < to; p += chunk.length) {
      writeSync(fd, chunk, 0, Math.min(chunk.length, to - p), p);
    }
  } finally {
    closeSync(fd);
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
      .option(
        "--preallocation <mode>",
        "preallocate the new area when growing: off, metadata, falloc or full",
      )
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
    const preallocText = stringOpt(opts, "preallocation") ?? "off";
    if (!["off", "metadata", "falloc", "full"].includes(preallocText)) {
      throw new CliError(`Invalid preallocation mode '${preallocText}'`);
    }
    const prealloc = preallocText as Qcow2Preallocation;
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
      if (size <= 0) throw new CliError("New image size must be positive");
      if (size <= current && prealloc !== "off") {
        throw new CliError("Preallocation can only be used for growing images");
      }
      if (size < current && opts.shrink !== true) {
        ctx.stderr(
          "qimg: Use the --shrink option to perform a shrink operation.\n" +
            "qimg: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.\n",
        );
        return 1;
      }
      if (size < current && probe.format === "qed")
        throw new CliError("Shrinking images is currently not supported");
      if (prealloc !== "off" && probe.format === "qed")
        throw new CliError(`Unsupported preallocation mode '${prealloc}'`);
      if (prealloc === "metadata" && probe.format === "raw")
        throw new CliError("Unsupported preallocation mode: metadata");
      if (probe.format !== "raw" && size % 512 !== 0)
        throw new CliError("The new size must be a multiple of 512");
      checkResizable(probe);
    } finally {
      await inFile(file, () => probe.close());
    }
    const image = await openImage(file, { format, readOnly: false, ctx });
    try {
      // Raw: the file is truncated to the new size; qcow2 and QED change their tables.
      const current = image.virtualSize;
      if (image instanceof Qcow2Image) {
        try {
          await inFile(file, () =>
            image.resizeWith(size, { shrink: true, preallocation: prealloc }),
          );
        } catch (e) {
          // qemu-img reports the driver's refusal to zero the new area by errno, no file name.
          const inner = e instanceof Error && e.cause instanceof Error ? e.cause : e;
          if (inner instanceof Error && inner.message.startsWith("Failed to zero out new clusters"))
            throw new CliError("Failed to zero out new clusters: Operation not supported");
          throw e;
        }
      } else {
        await inFile(file, () => image.resize(size));
        if (prealloc !== "off" && image.format === "raw" && size > current) {
          writeZeros(file, current, size);
        }
      }
    } finally {
      await inFile(file, () => image.close());
    }
    if (opts.quiet !== true) ctx.stdout("Image resized.\n");
    return 0;
  },
};

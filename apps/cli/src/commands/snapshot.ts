/**
 * `qimg snapshot [-U] [-q] [-f fmt] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT] FILE` —
 * qemu-img snapshot: list, create, apply or delete internal snapshots of a qcow2 image, with
 * qemu-img 7.2's output, messages and exit codes. QED and raw have no snapshots: listing
 * prints nothing, the other actions fail as qemu-img's do. (`-f` is a qimg extension:
 * qemu-img 7.2's snapshot command probes the format and has no `-f`.)
 */
import type { Command } from "commander";
import { Qcow2Image } from "@qimg/qcow2";
import type { CommandDef } from "../command.js";
import { stringOpt } from "../command.js";
import { CliError, inFile } from "../errors.js";
import { openImage } from "../open.js";
import { probedRawWarning } from "../probe.js";
import { SNAPSHOT_HEADER, snapshotJson, snapshotRow } from "./info.js";

/** errno numbers Linux gives the codes the library's snapshot errors carry. */
const ERRNO: Readonly<Record<string, [number, string]>> = {
  ENOTSUP: [95, "Operation not supported"],
  EINVAL: [22, "Invalid argument"],
  EFBIG: [27, "File too large"],
  EEXIST: [17, "File exists"],
  ENOENT: [2, "No such file or directory"],
  EIO: [5, "Input/output error"],
  EBUSY: [16, "Device or resource busy"],
  ENOSPC: [28, "No space left on device"],
};

function errnoOf(e: unknown): [number, string] {
  for (let c: unknown = e; c instanceof Error; c = c.cause) {
    const code = (c as { code?: unknown }).code;
    if (typeof code === "string" && ERRNO[code] !== undefined) return ERRNO[code];
  }
  return ERRNO.EIO!;
}

/** qemu-img keeps names in a 256-byte buffer: longer ones are cut to 255 bytes. */
function qemuName(name: string): string {
  const bytes = new TextEncoder().encode(name);
  return bytes.byteLength <= 255 ? name : new TextDecoder().decode(bytes.subarray(0, 255));
}

type Action = "list" | "apply" | "create" | "delete";

export const snapshotCommand: CommandDef = {
  name: "snapshot",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("list, create, apply or delete internal snapshots (qemu-img snapshot)")
      .argument("[file...]", "the image")
      .option("-l", "list the snapshots")
      .option("-a <snapshot>", "apply a snapshot (revert the disk to it): an ID, else a name")
      .option("-c <snapshot>", "create a snapshot with this name")
      .option("-d <snapshot>", "delete the snapshot with this name")
      .option("-f, --format <fmt>", "image format (qcow2, qed, raw); probed when omitted")
      .option("-q, --quiet", "quiet (qemu-img compatibility: nothing is printed on success)")
      .option(
        "-U, --force-share",
        "list while another process writes the image (read-only opens only, as qemu-img -U)",
      );
  },
  async run(ctx, args, opts) {
    const given: [Action, string | undefined][] = [];
    if (opts.l === true) given.push(["list", undefined]);
    for (const [k, a] of [
      ["a", "apply"],
      ["c", "create"],
      ["d", "delete"],
    ] as const) {
      const v = stringOpt(opts, k);
      if (v !== undefined) given.push([a, v]);
    }
    if (given.length > 1) throw new CliError("Cannot mix '-l', '-a', '-c', '-d'");
    if (args.length !== 1) throw new CliError("Expecting one image file name");
    const file = args[0]!;
    const format = stringOpt(opts, "format");
    const [action, name] = given[0] ?? [undefined, undefined];
    // qemu-img with no action opens the image read-write and does nothing.
    const readOnly = action === "list";
    const image = await openImage(file, {
      format,
      readOnly,
      ctx,
      forceShare: opts.forceShare === true,
    });
    try {
      const qcow2 = image instanceof Qcow2Image ? image : undefined;
      const snapName = name ?? "";
      switch (action) {
        case "list": {
          const list = qcow2?.snapshots ?? [];
          if (list.length === 0) break;
          let out = `Snapshot list:\n${SNAPSHOT_HEADER}\n`;
          for (const s of list) {
            // The table entry holds all ones when no icount was recorded.
            const icount =
              s.icount === undefined || s.icount === 0xffff_ffff_ffff_ffffn
                ? undefined
                : BigInt.asIntN(64, s.icount);
            out += snapshotRow(snapshotJson({ ...s, icount })) + "\n";
          }
          ctx.stdout(out);
          break;
        }
        case "create": {
          if (!qcow2) {
            throw new CliError(
              `Could not create snapshot '${snapName}': -95 (Operation not supported)`,
            );
          }
          try {
            // The date: the clock to the microsecond, as qemu-img takes it (the default).
            await qcow2.createSnapshot(qemuName(snapName));
          } catch (e) {
            const [n, text] = errnoOf(e);
            throw new CliError(`Could not create snapshot '${snapName}': -${n} (${text})`, {
              cause: e,
            });
          }
          break;
        }
        case "apply": {
          if (!qcow2) {
            // qemu-img's apply falls back to the file below the format, opened probed again.
            if (format === undefined && image.format === "raw")
              ctx.stderr(probedRawWarning(image.backend.name));
            throw new CliError(
              `Could not apply snapshot '${snapName}': Block driver does not support snapshots`,
            );
          }
          try {
            await qcow2.applySnapshot(snapName);
          } catch (e) {
            // QEMU reports every failure of its goto as "Failed to load snapshot: <errno>";
            // the block layer refuses a disk with persistent bitmaps before that.
            const [, text] = errnoOf(e);
            const busy = e instanceof Error && e.message === "Device has active dirty bitmaps";
            throw new CliError(
              `Could not apply snapshot '${snapName}': ${busy ? e.message : `Failed to load snapshot: ${text}`}`,
              { cause: e },
            );
          }
          break;
        }
        case "delete": {
          if (!qcow2 || !qcow2.snapshots.some((s) => s.name === snapName)) {
            throw new CliError(`Could not delete snapshot '${snapName}': snapshot not found`);
          }
          try {
            await qcow2.deleteSnapshot({ name: snapName });
          } catch (e) {
            throw new CliError(
              `Could not delete snapshot '${snapName}': ${e instanceof Error ? e.message : String(e)}`,
              { cause: e },
            );
          }
          break;
        }
        case undefined:
          break;
      }
    } finally {
      await inFile(file, () => image.close());
    }
    return 0;
  },
};

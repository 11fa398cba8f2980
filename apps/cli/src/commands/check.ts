/**
 * `qimg check [-f fmt] [-r leaks|all] [--output human|json] [-q] FILE` — qemu-img check:
 * per-item lines on stderr, the summary on stdout, qemu-img's JSON keys, and its exit codes
 * (0 clean or fully repaired, 1 the check could not complete, 2 corruptions remain, 3 only
 * leaks remain, 63 the format has no check).
 */
import { Option, type Command } from "commander";
import { checkImage, formatCheckHuman, formatCheckJson } from "@qimg/check";
import type { RepairMode } from "@qimg/check";
import type { BlockBackend } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import { readQcow2Metadata } from "@qimg/qcow2";
import type { CommandDef } from "../command.js";
import { parseOutputFormat, stringOpt } from "../command.js";
import { CliError, FileContextError, inFile, messageOf } from "../errors.js";
import type { CliContext } from "../context.js";
import { checkFormat, combinePath, openImage, probeBackend } from "../open.js";

/** qemu-img's exit code for formats without a check (raw). */
const NO_CHECK = 63;

export const checkCommand: CommandDef = {
  name: "check",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("check an image for inconsistencies, and repair them (qemu-img check)")
      .argument("<file>", "image to check")
      .option("-f, --format <fmt>", "image format (qcow2, qed, raw); probed when omitted")
      .option("-r, --repair <what>", "repair: 'leaks' (leaked clusters only) or 'all'")
      .addOption(
        new Option("--output <fmt>", "output format").choices(["human", "json"]).default("human"),
      )
      .option("-q, --quiet", "print nothing; only the exit code tells")
      .option(
        "-U, --force-share",
        "open read-only images even while another process writes them (qemu-img -U: shares every lock; read-only opens only)",
      );
  },
  async run(ctx, args, opts) {
    const file = args[0] ?? "";
    const output = parseOutputFormat(opts.output);
    const repairOpt = stringOpt(opts, "repair");
    if (repairOpt !== undefined && repairOpt !== "leaks" && repairOpt !== "all") {
      throw new CliError(`Unknown option for -r: '${repairOpt}' (expected 'leaks' or 'all')`);
    }
    const repair = repairOpt as RepairMode | undefined;
    const format = stringOpt(opts, "format");
    if (format !== undefined) checkFormat(format);
    // Plain check opens read-only and changes nothing; -r opens read-write.
    const forceShare = opts.forceShare === true;
    if (forceShare && repair !== undefined) {
      throw new CliError(`${file}: force-share=on can only be used with read-only images`);
    }
    const backend = await inFile(file, () =>
      FileBackend.open(file, { readOnly: repair === undefined, forceShare }),
    );
    try {
      const fmt = format ?? (await inFile(file, () => probeBackend(backend))) ?? "raw";
      if (fmt === "raw") {
        ctx.stderr("qimg: This image format does not support checks\n");
        return NO_CHECK;
      }
      await requireBackingChain(ctx, backend, file, fmt);
      const result = await inFile(file, () =>
        checkImage(backend, fmt as "qcow2" | "qed", { repair, filename: file }),
      );
      if (opts.quiet === true) return result.exitCode;
      if (output === "json") {
        ctx.stderr(result.messages.map((m) => `${m.text}\n`).join(""));
        ctx.stdout(formatCheckJson(result));
      } else {
        const text = formatCheckHuman(result);
        // qemu-img reports a check that could not complete as an error: with its name.
        ctx.stderr(
          text.stderr
            .replace(/^Check failed/m, "qimg: Check failed")
            .replace(
              /^warning: a program lacking bitmap/m,
              "qimg: warning: a program lacking bitmap",
            ),
        );
        ctx.stdout(text.stdout);
      }
      return result.exitCode;
    } finally {
      await backend.close().catch(() => undefined);
    }
  },
};

/**
 * qemu-img check opens the image with its backing chain (and external data file) first, and
 * fails with exit 1 when a file of the chain cannot be opened — a missing backing file is no
 * silent success. Damage in the image itself is left to the check: only an error raised once
 * a file beyond the image was being opened counts here.
 */
async function requireBackingChain(
  ctx: CliContext,
  backend: BlockBackend,
  file: string,
  fmt: string,
): Promise<void> {
  let opened = 0;
  let image;
  try {
    image = await openImage(file, {
      format: fmt,
      readOnly: true,
      forceShare: true,
      ctx: { ...ctx, stderr: () => undefined },
      onOpen: () => {
        opened++;
      },
    });
  } catch (e) {
    if (opened < 2) return;
    // qimg's own refusal to guess raw for a backing file is not qemu-img's: no verdict here.
    if (e instanceof FileContextError && e.error instanceof CliError) return;
    // The backing opener's own line for a backing file that cannot be opened.
    if (
      e instanceof CliError &&
      e.file !== undefined &&
      e.message.startsWith("Could not open backing file: ")
    ) {
      throw new CliError(`Could not open '${e.file}': ${e.message}`, { cause: e });
    }
    const inner = e instanceof FileContextError ? e.file : undefined;
    const why =
      inner === undefined
        ? messageOf(e, undefined)
        : `Could not open '${inner}': ${messageOf(e, inner)}`;
    // qemu-img names a missing external data file without "backing file".
    const dataFile =
      fmt === "qcow2"
        ? await readQcow2Metadata(backend).then(
            (m) => (m.dataFileName === undefined ? undefined : combinePath(file, m.dataFileName)),
            () => undefined,
          )
        : undefined;
    const what = inner !== undefined && inner === dataFile ? "" : "Could not open backing file: ";
    throw new CliError(`Could not open '${file}': ${what}${why}`, { cause: e });
  }
  await image.close().catch(() => undefined);
}

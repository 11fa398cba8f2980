/**
 * `qimg dd [-f fmt] [-O fmt] [-U] if=INPUT of=OUTPUT [bs=N] [count=N] [skip=N]`, with
 * qemu-img dd's semantics:
 * - bs defaults to 512; bs, count and skip take size suffixes (count=1k is 1024 blocks);
 * - count limits the input to the first count*bs bytes *including* the skipped ones, as
 *   qemu-img does (so `skip=2 count=5` copies blocks 2..4);
 * - a skip past the end of the input creates an empty output and prints
 *   "<input>: cannot skip to specified offset" (exit status stays 0);
 * - the output is created (truncated) with the copied size rounded up to 512 bytes: a raw
 *   file, or with `-O qcow2|qed` a new image of that size (default creation options);
 * - a failed dd removes the output it created or truncated.
 */
import type { Command } from "commander";
import { FileBackend } from "@qimg/io/node";
import { stringOpt, type CommandDef } from "../command.js";
import type { CliContext } from "../context.js";
import { CliError, inFile, messageOf } from "../errors.js";
import { openImage, sameFile, writeTarget } from "../open.js";
import { copy, imageSink, rawSink } from "../util/copy.js";
import { checkCreateFormat, writeNewImage, type CreateFormat } from "../create-image.js";
import { cvtnum } from "../util/cvtnum.js";
import { OutputGuard } from "../util/output-guard.js";
import { roundUp } from "../util/size.js";

/** The `key=value` operands of `qimg dd`, parsed. */
export interface DdOperands {
  readonly input: string;
  readonly output: string;
  /** Block size in bytes (default 512). */
  readonly bs: number;
  /** Number of blocks, when given. */
  readonly count: number | undefined;
  /** Input blocks to skip, when given. */
  readonly skip: number | undefined;
}

const INT_MAX = 2147483647;

/** Parse the `key=value` operands the way qemu-img dd does. */
export function parseDdOperands(operands: readonly string[]): DdOperands {
  let input: string | undefined;
  let output: string | undefined;
  let bs = 512;
  let count: number | undefined;
  let skip: number | undefined;
  for (const arg of operands) {
    const eq = arg.indexOf("=");
    if (eq < 0) throw new CliError(`unrecognized operand ${arg}`);
    const key = arg.slice(0, eq);
    const value = arg.slice(eq + 1);
    switch (key) {
      case "bs":
        bs = cvtnum("bs", value, 1, INT_MAX);
        break;
      case "count":
        count = cvtnum("count", value, 0, Number.MAX_SAFE_INTEGER);
        break;
      case "skip":
        skip = cvtnum("skip", value, 0, Number.MAX_SAFE_INTEGER);
        break;
      case "if":
        input = value;
        break;
      case "of":
        output = value;
        break;
      default:
        throw new CliError(`unrecognized operand ${key}`);
    }
  }
  if (input === undefined || output === undefined)
    throw new CliError("Must specify both input and output files");
  return { input, output, bs, count, skip };
}

/** Output formats `dd` can write (raw, qcow2, QED), as qemu-img names a wrong one. */
export function checkOutputFormat(format: string): CreateFormat {
  try {
    return checkCreateFormat(format);
  } catch {
    throw new CliError("Unknown file format");
  }
}

/** What `qimg dd` was asked to do (its options; the operands are parsed by {@link runDd}). */
export interface DdOptions {
  readonly operands: readonly string[];
  readonly format?: string | undefined;
  readonly outputFormat?: string | undefined;
  /** qemu-img -U (the input). */
  readonly forceShare?: boolean;
}

/** Run `qimg dd` (see the module comment); resolves to the exit code. */
export async function runDd(ctx: CliContext, options: DdOptions): Promise<number> {
  const op = parseDdOperands(options.operands);
  const outFormat = checkOutputFormat(options.outputFormat ?? "raw");
  if (sameFile(op.input, op.output))
    throw new CliError("the output file is the input file", { file: op.output });
  const image = await openImage(op.input, {
    format: options.format,
    ctx,
    forceShare: options.forceShare === true,
  });
  try {
    let size = image.virtualSize;
    if (op.count !== undefined && op.count * op.bs < size) size = op.count * op.bs;
    const skipBytes = op.skip === undefined ? 0 : op.skip * op.bs;
    const skipTooFar =
      op.skip !== undefined && (!Number.isSafeInteger(skipBytes) || size < skipBytes);
    const outSize = skipTooFar ? 0 : size - skipBytes;
    const guard = new OutputGuard([op.output]);
    try {
      const created = (e: unknown): CliError =>
        new CliError(`error while creating output image: ${messageOf(e, op.output)}`, {
          cause: e,
        });
      if (outFormat === "raw") {
        const target = await inFile(op.output, async () => {
          try {
            return await FileBackend.open(op.output, { create: true, truncate: true });
          } catch (e) {
            throw created(e);
          }
        });
        try {
          await inFile(op.output, () => target.truncate(roundUp(outSize, 512)));
          if (skipTooFar) ctx.stderr(`qimg: ${op.input}: cannot skip to specified offset\n`);
          else
            await inFile(op.input, () =>
              copy(image, rawSink(target), { from: skipBytes, to: size }),
            );
          await inFile(op.output, () => target.flush());
        } finally {
          await target.close();
        }
        return 0;
      }
      await inFile(op.output, async () => {
        try {
          await writeNewImage(op.output, outFormat, new Map(), roundUp(outSize, 512));
        } catch (e) {
          throw created(e);
        }
      });
      const target = await openImage(op.output, { format: outFormat, readOnly: false, ctx });
      try {
        const w = writeTarget(target);
        if (skipTooFar) ctx.stderr(`qimg: ${op.input}: cannot skip to specified offset\n`);
        else {
          await inFile(op.input, () =>
            copy(image, imageSink(w), { from: skipBytes, to: size, length: w.virtualSize }),
          );
        }
        await inFile(op.output, () => w.flush());
      } finally {
        await inFile(op.output, () => target.close());
      }
      return 0;
    } catch (e) {
      guard.undo();
      throw e;
    }
  } finally {
    await image.close();
  }
}

/** The `dd` command's definition for the CLI. */
export const ddCommand: CommandDef = {
  name: "dd",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("copy an image to a new raw, qcow2 or QED image, dd style (qemu-img dd)")
      .argument("[operands...]", "if=INPUT of=OUTPUT [bs=BYTES] [count=BLOCKS] [skip=BLOCKS]")
      .option("-f, --format <fmt>", "input format (qcow2, qed, raw); probed when omitted")
      .option("-O, --output-format <fmt>", "output format (raw, qcow2, qed)", "raw")
      .option(
        "-U, --force-share",
        "open read-only images even while another process writes them (qemu-img -U: shares every lock; read-only opens only)",
      );
  },
  run(ctx, args, opts) {
    return runDd(ctx, {
      operands: args,
      format: stringOpt(opts, "format"),
      outputFormat: stringOpt(opts, "outputFormat"),
      forceShare: opts.forceShare === true,
    });
  },
};

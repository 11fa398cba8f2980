/**
 * `qimg map [-f fmt] [--output human|json] [-U] FILE`: the extents of `qemu-img map`, merged
 * and printed exactly as qemu-img 7.2 does.
 */
import type { Command } from "commander";
import { Option } from "commander";
import { MAX_STATUS_PROBE, StatusCursor } from "@qimg/io";
import { parseOutputFormat, stringOpt, type CommandDef, type OutputFormat } from "../command.js";
import type { CliContext } from "../context.js";
import type { BlockStatus, DiskImage } from "../drivers.js";
import { CliError, inFile } from "../errors.js";
import { openImage } from "../open.js";

export interface MapOptions {
  readonly filename: string;
  readonly format?: string | undefined;
  readonly output?: OutputFormat;
  /** qemu-img -U. */
  readonly forceShare?: boolean;
}

/** qemu-img's MapEntry. */
export interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
  depth: number;
  present: boolean;
  /** Host offset, when qemu would report one (has_offset). */
  offset: number | undefined;
  /** File holding the data (only with an offset). */
  filename: string | undefined;
}

/** qemu-img probes at most 1 GiB per block-status call. */
const MAX_PROBE = MAX_STATUS_PROBE;

function entryOf(s: BlockStatus): MapEntry {
  const hasOffset = s.hostOffset !== undefined;
  return {
    start: s.offset,
    length: s.length,
    data: s.data,
    zero: s.zero,
    depth: s.depth,
    present: s.present,
    offset: s.hostOffset,
    filename: hasOffset ? s.file : undefined,
  };
}

/** qemu-img's entry_mergeable(). */
export function entryMergeable(curr: MapEntry, next: MapEntry): boolean {
  if (curr.length === 0) return false;
  if (
    curr.zero !== next.zero ||
    curr.data !== next.data ||
    curr.depth !== next.depth ||
    curr.present !== next.present ||
    (curr.filename === undefined) !== (next.filename === undefined) ||
    (curr.offset === undefined) !== (next.offset === undefined)
  ) {
    return false;
  }
  if (curr.filename !== undefined && curr.filename !== next.filename) return false;
  if (curr.offset !== undefined && curr.offset + curr.length !== next.offset) return false;
  return true;
}

/** C's `%#-16x`: "0x..." left-justified in 16 columns, but a plain "0" for zero. */
function hex16(n: number): string {
  return (n === 0 ? "0" : "0x" + n.toString(16)).padEnd(16);
}

export const MAP_HUMAN_HEADER =
  "Offset".padEnd(16) + "Length".padEnd(16) + "Mapped to".padEnd(16) + "File\n";

/**
 * qemu-img's dump_map_entry(). In human mode it also rewrites `next`'s flags (0, ZERO and
 * ZERO|DATA all print the same), which changes what merges after it: kept on purpose.
 */
function dumpMapEntry(
  output: OutputFormat,
  e: MapEntry,
  next: MapEntry | undefined,
  ctx: CliContext,
  filename: string,
): void {
  if (output === "human") {
    if (e.data && e.offset === undefined) {
      throw new CliError("File contains external, encrypted or compressed clusters.", {
        file: filename,
      });
    }
    if (e.data && !e.zero) {
      ctx.stdout(
        hex16(e.start) + hex16(e.length) + hex16(e.offset ?? 0) + (e.filename ?? "") + "\n",
      );
    }
    if (next !== undefined && (!next.data || next.zero)) {
      next.data = false;
      next.zero = true;
    }
  } else {
    let line =
      `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth},` +
      ` "present": ${String(e.present)}, "zero": ${String(e.zero)}, "data": ${String(e.data)}`;
    if (e.offset !== undefined) line += `, "offset": ${e.offset}`;
    line += "}";
    if (next !== undefined) line += ",\n";
    ctx.stdout(line);
  }
}

/** Yield the raw (unmerged) extents of the whole image, as qemu-img's loop asks for them. */
export async function* blockStatusExtents(image: DiskImage, from = 0): AsyncGenerator<BlockStatus> {
  const cursor = new StatusCursor(image, image.virtualSize, MAX_PROBE);
  for (let offset = from; offset < image.virtualSize; offset = cursor.end) {
    yield await cursor.at(offset);
  }
}

/** The merged extents qemu-img map --output=json prints (for tests and other commands). */
export async function mapEntries(image: DiskImage): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  let curr: MapEntry | undefined;
  for await (const s of blockStatusExtents(image)) {
    const next = entryOf(s);
    if (curr !== undefined && entryMergeable(curr, next)) {
      curr.length += next.length;
      continue;
    }
    if (curr !== undefined) out.push(curr);
    curr = next;
  }
  if (curr !== undefined) out.push(curr);
  return out;
}

export async function runMap(ctx: CliContext, options: MapOptions): Promise<number> {
  const output = options.output ?? "human";
  const image = await openImage(options.filename, {
    format: options.format,
    ctx,
    forceShare: options.forceShare === true,
  });
  try {
    await inFile(options.filename, async () => {
      if (output === "json") ctx.stdout("[");
      else ctx.stdout(MAP_HUMAN_HEADER);
      let curr: MapEntry = {
        start: 0,
        length: 0,
        data: false,
        zero: false,
        depth: 0,
        present: false,
        offset: undefined,
        filename: undefined,
      };
      for await (const s of blockStatusExtents(image)) {
        const next = entryOf(s);
        if (entryMergeable(curr, next)) {
          curr.length += next.length;
          continue;
        }
        if (curr.length > 0) dumpMapEntry(output, curr, next, ctx, options.filename);
        curr = next;
      }
      // qemu-img dumps the last entry even when the image is empty.
      dumpMapEntry(output, curr, undefined, ctx, options.filename);
      if (output === "json") ctx.stdout("]\n");
    });
    return 0;
  } finally {
    await image.close();
  }
}

export const mapCommand: CommandDef = {
  name: "map",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description(
        "dump the metadata of an image: which ranges are allocated, where (qemu-img map)",
      )
      .argument("<filename>", "image file")
      .option("-f, --format <fmt>", "image format (qcow2, qed, raw); probed when omitted")
      .addOption(
        new Option("--output <format>", "output format")
          .choices(["human", "json"])
          .default("human"),
      )
      .option(
        "-U, --force-share",
        "open read-only images even while another process writes them (qemu-img -U: shares every lock; read-only opens only)",
      );
  },
  run(ctx, args, opts) {
    return runMap(ctx, {
      filename: args[0] ?? "",
      format: stringOpt(opts, "format"),
      output: parseOutputFormat(opts.output),
      forceShare: opts.forceShare === true,
    });
  },
};

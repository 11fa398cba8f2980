/**
 * `qimg bitmap (--add | --remove | --clear | --enable | --disable | --merge SOURCE)...
 * [-g GRANULARITY] [-b SOURCE_FILE [-F SOURCE_FMT]] [-f FMT] [--object OBJ] FILE BITMAP` —
 * qemu-img bitmap: manage the persistent dirty bitmaps of a qcow2 image. The actions run in
 * the order given, as qemu-img runs them; errors are qemu-img's ("Operation add on bitmap b
 * failed: ...") with its exit code 1.
 *
 * One deliberate difference: qemu-img applies the actions before a failing one (and stores
 * every bitmap again at its close even when the first action fails). qimg first runs the
 * whole list on a copy-on-write view of the file (nothing reaches the file), and only when
 * every action and the close succeed there does it run them on the file: a refused command
 * leaves the file byte-identical.
 */
import type { Command } from "commander";
import { Option } from "commander";
import { InvalidArgumentError } from "@qimg/structs";
import type { BlockBackend, ReadOptions } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import { Qcow2Image, openQcow2 } from "@qimg/qcow2";
import type { CommandDef } from "../command.js";
import { stringOpt } from "../command.js";
import type { CliContext } from "../context.js";
import type { WritableDiskImage } from "../drivers.js";
import { CliError, inFile } from "../errors.js";
import { openImage } from "../open.js";
import { probedRawWarning } from "../probe.js";
import { parseSize } from "../util/size.js";

type ActionKind = "add" | "remove" | "clear" | "enable" | "disable" | "merge";

interface Action {
  readonly kind: ActionKind;
  /** The source bitmap of a merge. */
  readonly source?: string;
}

/** Page size of the copy-on-write view. */
const PAGE = 4096;

/**
 * A copy-on-write view of a file: reads see the file with this view's writes on top; writes,
 * truncates and flushes never reach the file. The dry run of the actions works on it.
 */
class OverlayBackend implements BlockBackend {
  readonly readOnly = false;
  readonly kind = "other" as const;
  readonly name: string;
  readonly #pages = new Map<number, Uint8Array>();
  #size: number;
  /** Bytes of the base file still visible (a truncate below hides the rest). */
  #baseLimit: number;

  constructor(
    private readonly base: BlockBackend,
    baseSize: number,
  ) {
    this.name = base.name;
    this.#size = baseSize;
    this.#baseLimit = baseSize;
  }

  async read(offset: number, buf: Uint8Array, options?: ReadOptions): Promise<void> {
    if (offset + buf.length > this.#size && options?.zeroPastEof !== true) {
      throw new InvalidArgumentError(
        `read of ${buf.length} bytes at ${offset} past the end of ${this.name}`,
      );
    }
    buf.fill(0);
    const fromBase = Math.max(0, Math.min(buf.length, this.#baseLimit - offset));
    if (fromBase > 0) await this.base.read(offset, buf.subarray(0, fromBase));
    const first = Math.floor(offset / PAGE);
    const last = Math.floor((offset + buf.length - 1) / PAGE);
    for (let p = first; p <= last && buf.length > 0; p++) {
      const page = this.#pages.get(p);
      if (!page) continue;
      const from = Math.max(offset, p * PAGE);
      const to = Math.min(offset + buf.length, (p + 1) * PAGE);
      buf.set(page.subarray(from - p * PAGE, to - p * PAGE), from - offset);
    }
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (data.length === 0) return;
    const first = Math.floor(offset / PAGE);
    const last = Math.floor((offset + data.length - 1) / PAGE);
    for (let p = first; p <= last; p++) {
      let page = this.#pages.get(p);
      if (!page) {
        page = new Uint8Array(PAGE);
        const end = Math.min(PAGE, this.#baseLimit - p * PAGE);
        if (end > 0) await this.base.read(p * PAGE, page.subarray(0, end));
        this.#pages.set(p, page);
      }
      const from = Math.max(offset, p * PAGE);
      const to = Math.min(offset + data.length, (p + 1) * PAGE);
      page.set(data.subarray(from - offset, to - offset), from - p * PAGE);
    }
    this.#size = Math.max(this.#size, offset + data.length);
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  size(): Promise<number> {
    return Promise.resolve(this.#size);
  }

  truncate(size: number): Promise<void> {
    if (size < this.#size) {
      this.#baseLimit = Math.min(this.#baseLimit, size);
      for (const [p, page] of this.#pages) {
        if (p * PAGE >= size) this.#pages.delete(p);
        else if ((p + 1) * PAGE > size) page.fill(0, size - p * PAGE);
      }
    }
    this.#size = size;
    return Promise.resolve();
  }

  close(): Promise<void> {
    return this.base.close();
  }
}

/** An action failed: qemu-img's "Operation X on bitmap B failed: ..." (the message may hold a hint line). */
class ActionError extends Error {}

/** qemu-img names the block node it opened, e.g. '#block123' (a number drawn at random). */
function nodeName(): string {
  return `#block${100 + Math.floor(Math.random() * 100)}`;
}

/** Run one action on `image` (`source` holds merge sources: `image` itself unless -b). */
async function apply(
  image: WritableDiskImage,
  source: WritableDiskImage,
  act: Action,
  bitmap: string,
  granularity: number | undefined,
  node: string,
): Promise<void> {
  try {
    if (!(image instanceof Qcow2Image)) {
      // Only qcow2 stores bitmaps; qemu-img finds no bitmap in any other format.
      if (act.kind === "add") {
        throw new InvalidArgumentError(
          `Can't store persistent bitmaps to ${node}: Operation not supported`,
        );
      }
      throw new InvalidArgumentError(`Dirty bitmap '${bitmap}' not found`);
    }
    switch (act.kind) {
      case "add":
        image.addBitmap(bitmap, { granularity, nodeName: node });
        break;
      case "remove":
        image.removeBitmap(bitmap);
        break;
      case "clear":
        image.clearBitmap(bitmap);
        break;
      case "enable":
        image.enableBitmap(bitmap);
        break;
      case "disable":
        image.disableBitmap(bitmap);
        break;
      case "merge": {
        const src = act.source ?? "";
        if (!(source instanceof Qcow2Image)) {
          // The target is checked first, then the source (which no other format has).
          const t = image.listBitmaps().find((b) => b.name === bitmap);
          if (!t) throw new InvalidArgumentError(`Dirty bitmap '${bitmap}' not found`);
          if (t.inUse) {
            throw new InvalidArgumentError(
              `Bitmap '${bitmap}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk`,
            );
          }
          throw new InvalidArgumentError(`Dirty bitmap '${src}' not found`);
        }
        await image.mergeBitmap(bitmap, src, source === image ? undefined : source);
        break;
      }
    }
  } catch (e) {
    if (e instanceof InvalidArgumentError || e instanceof ActionError) {
      throw new ActionError(`Operation ${act.kind} on bitmap ${bitmap} failed: ${e.message}`);
    }
    throw e;
  }
}

/**
 * qemu-img's `-g`: a size (k, M, G... suffixes), or undefined when it is not one. qemu hands
 * it on as a 32-bit value, so a number past 4 GiB wraps.
 */
function parseGranularity(text: string): number | undefined {
  try {
    return parseSize(text);
  } catch {
    return undefined;
  }
}

/** `--object` specs: qimg has no use for a secret (no encryption) and no other object type. */
function checkObjects(specs: readonly string[]): void {
  for (const spec of specs) {
    const parts = spec.split(",");
    const type = parts
      .map((p) => (p.includes("=") ? p : `qom-type=${p}`))
      .find((p) => p.startsWith("qom-type="))
      ?.slice("qom-type=".length);
    if (type !== "secret") {
      throw new CliError(`Parameter 'qom-type' does not accept value '${type ?? ""}'`);
    }
  }
}

async function runActions(
  image: WritableDiskImage,
  source: WritableDiskImage,
  actions: readonly Action[],
  bitmap: string,
  granularity: number | undefined,
  node: string,
): Promise<void> {
  for (const act of actions) {
    await apply(image, source, act, bitmap, granularity, node);
  }
}

/** Print an action error as qemu-img does (first line prefixed, a hint line as is). */
function reportAction(ctx: CliContext, e: ActionError): number {
  const [first, ...rest] = e.message.split("\n");
  ctx.stderr(`qimg: ${first}\n${rest.map((l) => `${l}\n`).join("")}`);
  return 1;
}

export const bitmapCommand: CommandDef = {
  name: "bitmap",
  errorExitCode: 1,
  configure(cmd: Command) {
    const actions: Action[] = [];
    const record = (kind: ActionKind) => (source?: unknown) => {
      actions.push(typeof source === "string" ? { kind, source } : { kind });
    };
    cmd
      .description("change the persistent dirty bitmaps of a qcow2 image (qemu-img bitmap)")
      .argument("[file]", "the qcow2 image")
      .argument("[bitmap]", "the bitmap's name")
      .option("--add", "add BITMAP (empty; with -g GRANULARITY)")
      .option("--remove", "remove BITMAP")
      .option("--clear", "clear every bit of BITMAP")
      .option("--enable", "let guest writes set BITMAP's bits")
      .option("--disable", "stop guest writes from setting BITMAP's bits")
      .addOption(
        new Option("--merge <source>", "set BITMAP's bits from bitmap SOURCE").argParser(
          (v: string, prev: string[] | undefined) => [...(prev ?? []), v],
        ),
      )
      .option("-g, --granularity <size>", "bytes per bit of an added bitmap (512 to 2G)")
      .option("-b, --source-file <file>", "file that holds the --merge SOURCE bitmap")
      .option("-F, --source-format <fmt>", "format of the -b file")
      .option("-f, --format <fmt>", "image format (qcow2); probed when omitted")
      .addOption(
        new Option(
          "--object <spec>",
          "accepted for qemu-img compatibility (secret only)",
        ).argParser((v: string, prev: string[] | undefined) => [...(prev ?? []), v]),
      )
      .option("--image-opts", "not supported: give a file name")
      // qemu-img's own message for a wrong number of arguments, not commander's.
      .allowExcessArguments(true);
    for (const kind of ["add", "remove", "clear", "enable", "disable", "merge"] as const) {
      cmd.on(`option:${kind}`, record(kind));
    }
    cmd.hook("preAction", (c) => {
      c.setOptionValue("actions", actions);
      c.setOptionValue("argCount", c.args.length);
    });
  },
  async run(ctx, args, opts) {
    const actions = (opts.actions ?? []) as Action[];
    const gText = stringOpt(opts, "granularity");
    const granularityRaw = gText === undefined ? 0 : parseGranularity(gText);
    if (granularityRaw === undefined) {
      ctx.stderr(
        "qimg: Invalid granularity specified. You may use k, M, G, T, P or E suffixes for\n" +
          "qimg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n",
      );
      return 1;
    }
    const srcFile = stringOpt(opts, "sourceFile");
    const srcFmt = stringOpt(opts, "sourceFormat");
    const format = stringOpt(opts, "format");
    checkObjects((opts.object ?? []) as string[]);
    if (opts.imageOpts === true) {
      throw new CliError("--image-opts is not supported by qimg bitmap; give the file name");
    }
    if (actions.length === 0) {
      throw new CliError(
        "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
      );
    }
    const add = actions.some((a) => a.kind === "add");
    const merge = actions.some((a) => a.kind === "merge");
    if (granularityRaw !== 0 && !add) throw new CliError("granularity only supported with --add");
    if (srcFmt !== undefined && srcFile === undefined) {
      throw new CliError("-F only supported with -b");
    }
    if (srcFile !== undefined && !merge) {
      throw new CliError("Merge bitmap source file only supported with --merge");
    }
    const argCount = typeof opts.argCount === "number" ? opts.argCount : args.length;
    if (argCount !== 2 || args.length !== 2) {
      throw new CliError("Expecting filename and bitmap name");
    }
    const file = args[0]!;
    const bitmap = args[1]!;
    // qemu passes -g on as a 32-bit number; 0 (or a multiple of 4 GiB with no bit left)
    // means the default only when no -g was given at all.
    const granularity =
      gText === undefined || granularityRaw === 0 ? undefined : granularityRaw % 2 ** 32;
    const node = nodeName();

    // qemu-img opens the image read-write first: a file another process holds (or one we may
    // not write) is refused before any action, with the open's error.
    const lock = await inFile(file, () => FileBackend.open(file, { readOnly: false }));
    await lock.close();
    // 1. The whole list on a copy-on-write view of the file.
    // (forceShare: while another process writes the image, the read-write open below gives
    // qemu-img's refusal, not this look.)
    const probe = await openImage(file, {
      format,
      readOnly: true,
      ctx,
      openBacking: false,
      forceShare: true,
    });
    const probedFormat = probe.format;
    await inFile(file, () => probe.close());
    if (format === undefined && probedFormat === "raw") ctx.stderr(probedRawWarning(file));
    const source =
      srcFile === undefined
        ? undefined
        : await openImage(srcFile, { format: srcFmt, readOnly: true, ctx, openBacking: false });
    try {
      let dry: WritableDiskImage;
      if (probedFormat === "qcow2") {
        const base = await inFile(file, () =>
          FileBackend.open(file, { readOnly: true, forceShare: true }),
        );
        const view = new OverlayBackend(base, await base.size());
        dry = await inFile(file, () => openQcow2(view, { readOnly: false, noBacking: true }));
      } else {
        dry = await openImage(file, {
          format,
          readOnly: true,
          ctx,
          openBacking: false,
          forceShare: true,
        });
      }
      let failed: ActionError | undefined;
      try {
        await runActions(dry, source ?? dry, actions, bitmap, granularity, node);
      } catch (e) {
        if (!(e instanceof ActionError)) throw e;
        failed = e;
      } finally {
        // The close stores the bitmaps (into the view): it must work before the file is touched.
        if (failed) await dry.close().catch(() => undefined);
        else await inFile(file, () => dry.close());
      }
      if (failed) return reportAction(ctx, failed);
      // 2. For real. Like qemu-img, without the backing chain (bitmaps need none of it).
      const image = await inFile(file, async () =>
        openQcow2(await FileBackend.open(file, { readOnly: false }), {
          readOnly: false,
          noBacking: true,
        }),
      );
      try {
        await inFile(file, () =>
          runActions(image, source ?? image, actions, bitmap, granularity, node),
        );
      } finally {
        await inFile(file, () => image.close());
      }
    } finally {
      if (source) await inFile(srcFile!, () => source.close());
    }
    return 0;
  },
};

/**
 * `qimg measure [--output=human|json] [-O fmt] [-o options] [--size N | [-f fmt] [-l snapshot]
 * [--image-opts] [-U] FILE]` — qemu-img measure: the file size a new qcow2 or raw image needs
 * for the given size or for a copy of FILE (`required`), fully allocated
 * (`fully-allocated`), and the room the source's persistent bitmaps take (`bitmaps`, qcow2
 * version 3 source and target). QED cannot be measured, as in qemu-img.
 */
import { Option, type Command } from "commander";
import { measureBitmaps, measureDataBytes, measureQcow2 } from "@qimg/qcow2";
import { InvalidArgumentError } from "@qimg/structs";
import type { CommandDef } from "../command.js";
import { stringOpt } from "../command.js";
import type { CliContext } from "../context.js";
import { acceptedOptionsOf, checkCreateFormat } from "../create-image.js";
import type { DiskImage } from "../drivers.js";
import { qcow2InfoOf } from "../drivers.js";
import { CliError, inFile, messageOf } from "../errors.js";
import { openImage } from "../open.js";
import { collect, joinedOptions } from "../util/cli-options.js";
import { parseImageOpts } from "../util/image-opts.js";
import { parseOptions } from "../util/qemu-opts.js";
import type { OptDesc, OptMap } from "../util/qemu-opts.js";
import { toQemuJson } from "../util/qjson.js";
import { parseSize } from "../util/size.js";
import {
  SnapshotParamError,
  loadSnapshotView,
  parseSnapshotParam,
} from "../util/snapshot-param.js";

/** qemu-img's two-line refusal of a bad `--size`. */
const SIZE_ERROR_LINES = [
  "Invalid image size specified. You may use k, M, G, T, P or E suffixes for",
  "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
];

/** The numbers qemu-img measure prints. */
interface Measured {
  readonly required: number;
  readonly fullyAllocated: number;
  readonly bitmaps?: number | undefined;
}

/** A failure qemu-img reports on several lines (each gets the program prefix). */
function multiLine(ctx: CliContext, lines: readonly string[]): number {
  ctx.stderr(lines.map((l) => `qimg: ${l}\n`).join(""));
  return 1;
}

/** qcow2's encryption options (creation options qemu-img measure reads for a LUKS target). */
const ENCRYPT_OPTIONS: readonly OptDesc[] = [
  { name: "encryption", type: "bool", help: "Encrypt the image with format 'aes'" },
  { name: "encrypt.format", type: "str", help: "Encrypt the image, format choices: 'aes', 'luks'" },
  {
    name: "encrypt.key-secret",
    type: "str",
    help: "ID of secret providing qcow2 AES key or LUKS passphrase",
  },
  { name: "encrypt.cipher-alg", type: "str", help: "Name of encryption cipher algorithm" },
  { name: "encrypt.cipher-mode", type: "str", help: "Name of encryption cipher mode" },
  { name: "encrypt.ivgen-alg", type: "str", help: "Name of IV generator algorithm" },
  { name: "encrypt.ivgen-hash-alg", type: "str", help: "Name of IV generator hash algorithm" },
  { name: "encrypt.hash-alg", type: "str", help: "Name of encryption hash algorithm" },
  { name: "encrypt.iter-time", type: "num", help: "Time to spend in PBKDF in milliseconds" },
];

/** `-o` parsed as qemu-img measure does, or the lines of its refusal. */
function measureOptions(text: string, format: "qcow2" | "raw"): OptMap | string[] {
  try {
    const descs =
      format === "qcow2"
        ? [...acceptedOptionsOf(format), ...ENCRYPT_OPTIONS]
        : acceptedOptionsOf(format);
    return parseOptions(text, descs, undefined);
  } catch (e) {
    const lines = [messageOf(e, "")];
    if (lines[0]!.includes("expects a non-negative number below 2^64")) {
      lines[0] +=
        "\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";
    }
    lines.push(`Invalid options for file format '${format}'`);
    return lines;
  }
}

/** The qcow2 target facts from `-o`, checked with qemu's words and in its order. */
function qcow2Target(
  opts: OptMap,
  secrets: ReadonlySet<string>,
): {
  clusterSize: number;
  refcountBits: number;
  extendedL2: boolean;
  version: 2 | 3;
  preallocation: "off" | "metadata" | "falloc" | "full";
  backingFile: boolean;
  luksKeyBytes: number | undefined;
} {
  const v = (k: string): unknown => opts.get(k)?.value;
  const extendedL2 = v("extended_l2") === true;
  const clusterSize = (v("cluster_size") as number | undefined) ?? 65536;
  const pow2 = (n: number): boolean => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
  if (!pow2(clusterSize) || clusterSize < 512 || clusterSize > 2 * 1024 * 1024) {
    throw new CliError("Cluster size must be a power of two between 512 and 2048k");
  }
  if (extendedL2 && clusterSize < 16384) {
    throw new CliError(
      "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
    );
  }
  const compat = (v("compat") as string | undefined) ?? "1.1";
  let version: 2 | 3;
  if (compat === "0.10" || compat === "v2") version = 2;
  else if (compat === "1.1" || compat === "v3") version = 3;
  else throw new CliError(`Invalid compatibility level: '${compat}'`);
  const rb = v("refcount_bits") as number | undefined;
  const refcountBits = rb ?? 16;
  if (!pow2(refcountBits) || refcountBits > 64) {
    throw new CliError("Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (version === 2 && refcountBits !== 16) {
    throw new CliError(
      "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
    );
  }
  const p = (v("preallocation") as string | undefined) ?? "off";
  if (p !== "off" && p !== "metadata" && p !== "falloc" && p !== "full") {
    throw new CliError(`invalid parameter value: ${p}`);
  }
  return {
    clusterSize,
    refcountBits,
    extendedL2,
    version,
    preallocation: p,
    backingFile: opts.has("backing_file"),
    luksKeyBytes: luksKeyBytes(opts, secrets),
  };
}

/**
 * The master key length of a LUKS target (`encrypt.format=luks`), checked as QEMU does
 * (a key secret that names a `--object secret`); undefined for no encryption or AES.
 */
function luksKeyBytes(opts: OptMap, secrets: ReadonlySet<string>): number | undefined {
  const v = (k: string): string | undefined => {
    const x = opts.get(k)?.value;
    return x === undefined ? undefined : String(x);
  };
  if (v("encrypt.format") !== "luks") return undefined;
  const secret = v("encrypt.key-secret");
  if (secret === undefined)
    throw new CliError("Parameter 'encrypt.key-secret' is required for cipher");
  if (!secrets.has(secret)) throw new CliError(`No secret with id '${secret}'`);
  const alg = v("encrypt.cipher-alg") ?? "aes-256";
  const bits = /^(aes|twofish|serpent|cast5)-(128|192|256)$/.exec(alg);
  if (bits === null) throw new CliError(`Invalid parameter '${alg}'`);
  const mode = v("encrypt.cipher-mode") ?? "xts";
  return (Number(bits[2]) / 8) * (mode === "xts" ? 2 : 1);
}

/**
 * Bytes before a LUKS payload: the 592-byte header in a 4 KiB sector, then 8 key slots of
 * key material (key bytes x 4000 anti-forensic stripes, each slot 4 KiB aligned).
 */
function luksPayloadBytes(keyBytes: number): number {
  const slot = Math.ceil((keyBytes * 4000) / 4096) * 4096;
  return 4096 + 8 * slot;
}

/** The source's length as QEMU's block layer sees it: whole 512-byte sectors, rounded up. */
function sectorLength(n: number): number {
  return Math.ceil(n / 512) * 512;
}

export const measureCommand: CommandDef = {
  name: "measure",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("the file size a new image needs (qemu-img measure)")
      .argument("[filename...]", "source image to measure a copy of")
      .option("--size <size>", "measure an empty image of this virtual size")
      .option("-O, --target-format <fmt>", "format of the new image (qcow2, raw)", "raw")
      .option("-o, --options <opts>", "creation options of the new image", collect)
      .option("-f, --format <fmt>", "format of the source image")
      .option("-l, --snapshot <snapshot>", "measure the source's internal snapshot")
      .option("--image-opts", "the source is an option string (driver=...,file.filename=...)")
      .option("-U, --force-share", "open the source while another process writes it")
      .option(
        "--object <def>",
        "secret,id=ID,... for a LUKS target's key secret (only its ID is used)",
        collect,
      )
      .addOption(new Option("--output <fmt>", "output format: human or json").default("human"));
  },
  async run(ctx, args, opts) {
    const output = stringOpt(opts, "output") ?? "human";
    if (output !== "human" && output !== "json") {
      throw new CliError("--output must be used with human or json as argument.");
    }
    const sizeText = stringOpt(opts, "size");
    let size: number | undefined;
    if (sizeText !== undefined) {
      try {
        size = parseSize(sizeText);
      } catch {
        return multiLine(ctx, SIZE_ERROR_LINES);
      }
    }
    if (args.length > 1) throw new CliError("At most one filename argument is allowed.");
    let filename = args[0];
    const snapshotText = stringOpt(opts, "snapshot");
    let snapshot: ReturnType<typeof parseSnapshotParam> | undefined;
    try {
      snapshot = snapshotText === undefined ? undefined : parseSnapshotParam(snapshotText);
    } catch (e) {
      if (e instanceof SnapshotParamError) return multiLine(ctx, e.lines);
      throw e;
    }
    let format = stringOpt(opts, "format");
    if (
      filename === undefined &&
      (opts.imageOpts === true || format !== undefined || snapshot !== undefined)
    ) {
      throw new CliError("--image-opts, -f, and -l require a filename argument.");
    }
    if (filename !== undefined && size !== undefined) {
      throw new CliError("--size N cannot be used together with a filename.");
    }
    if (filename === undefined && size === undefined) {
      throw new CliError("Either --size N or one filename must be specified.");
    }
    if (filename !== undefined && opts.imageOpts === true) {
      if (format !== undefined)
        throw new CliError("--image-opts and --format are mutually exclusive");
      const o = parseImageOpts(filename);
      filename = o.filename;
      format = o.driver;
    }
    let source: DiskImage | undefined;
    let top: DiskImage | undefined;
    try {
      if (filename !== undefined) {
        const path = filename;
        top = await openImage(path, {
          format,
          readOnly: true,
          ctx,
          forceShare: opts.forceShare === true,
        }).catch((e: unknown) => {
          // qemu-img names the file twice when it cannot be opened at all.
          if (e instanceof Error && e.message.includes(": open failed: ")) {
            throw new CliError(
              `Could not open '${path}': Could not open '${path}': ${messageOf(e, path)}`,
              { cause: e },
            );
          }
          throw e;
        });
        source = snapshot !== undefined ? await loadSnapshotView(top, snapshot) : top;
      }
      const outFormat = stringOpt(opts, "targetFormat") ?? "raw";
      const target = checkCreateFormat(outFormat);
      if (target === "qed") {
        throw new CliError("Block driver 'qed' does not support size measurement");
      }
      const parsed = measureOptions(joinedOptions(opts) ?? "", target);
      if (Array.isArray(parsed)) return multiLine(ctx, parsed);
      if (size === undefined && source === undefined) {
        const o = parsed.get("size")?.value;
        size = typeof o === "number" ? o : 0;
      }
      const secrets = new Set(
        (Array.isArray(opts.object) ? (opts.object as string[]) : [])
          .filter((o) => o.startsWith("secret,"))
          .flatMap((o) =>
            o
              .split(",")
              .filter((p) => p.startsWith("id="))
              .map((p) => p.slice(3)),
          ),
      );
      const result = await measure(secrets, target, parsed, size, source, top);
      const fields: [string, number][] = [];
      if (output === "human") {
        let text = `required size: ${result.required}\nfully allocated size: ${result.fullyAllocated}\n`;
        if (result.bitmaps !== undefined) text += `bitmaps size: ${result.bitmaps}\n`;
        ctx.stdout(text);
      } else {
        // qemu-img prints the keys in its dictionary's order.
        if (result.bitmaps !== undefined) fields.push(["bitmaps", result.bitmaps]);
        fields.push(["required", result.required], ["fully-allocated", result.fullyAllocated]);
        ctx.stdout(`${toQemuJson(Object.fromEntries(fields))}\n`);
      }
      return 0;
    } finally {
      if (source !== undefined && source !== top) await source.close();
      if (top !== undefined) await inFile(filename ?? "", () => top!.close());
    }
  },
};

async function measure(
  secrets: ReadonlySet<string>,
  target: "qcow2" | "raw",
  opts: OptMap,
  size: number | undefined,
  source: DiskImage | undefined,
  top: DiskImage | undefined,
): Promise<Measured> {
  if (target === "raw") {
    const n = source !== undefined ? sectorLength(source.virtualSize) : sectorLength(size ?? 0);
    return { required: n, fullyAllocated: n };
  }
  const t = qcow2Target(opts, secrets);
  const virtualSize = source !== undefined ? sectorLength(source.virtualSize) : (size ?? 0);
  let dataBytes = 0;
  if (source !== undefined) {
    const aligned = Math.ceil(virtualSize / t.clusterSize) * t.clusterSize;
    dataBytes = t.backingFile
      ? aligned
      : await measureDataBytes(source, t.clusterSize, virtualSize);
  }
  let m;
  try {
    m = measureQcow2({
      virtualSize,
      clusterSize: t.clusterSize,
      refcountBits: t.refcountBits,
      extendedL2: t.extendedL2,
      preallocation: t.preallocation,
      dataBytes,
    });
  } catch (e) {
    if (e instanceof InvalidArgumentError) throw new CliError(e.message);
    throw e;
  }
  if (t.luksKeyBytes !== undefined) {
    const payload = Math.ceil(luksPayloadBytes(t.luksKeyBytes) / t.clusterSize) * t.clusterSize;
    m = { required: m.required + payload, fullyAllocated: m.fullyAllocated + payload };
  }
  const info = top !== undefined ? qcow2InfoOf(top) : undefined;
  if (t.version >= 3 && info !== undefined && info.version >= 3) {
    const bitmaps = measureBitmaps(info.bitmaps, top!.virtualSize, t.clusterSize);
    return { ...m, bitmaps };
  }
  return m;
}

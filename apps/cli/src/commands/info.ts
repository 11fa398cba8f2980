/**
 * `qimg info [-f fmt] [--output human|json] [--backing-chain] [-U] FILE`: the facts and layout
 * of `qemu-img info`.
 */
import { statSync } from "node:fs";
import type { Command } from "commander";
import { Option } from "commander";
import { parseOutputFormat, stringOpt, type CommandDef, type OutputFormat } from "../command.js";
import type { CliContext } from "../context.js";
import { qcow2InfoOf, qedInfoOf, type DiskImage, type SnapshotInfo } from "../drivers.js";
import { readEncryptedQcow2Info } from "@qimg/qcow2";
import type { Qcow2EncryptionInfo, Qcow2Info } from "@qimg/qcow2";
import { FileBackend } from "@qimg/io/node";
import { inFile } from "../errors.js";
import { chainOf, combinePath, openImage } from "../open.js";
import { sizeToStr } from "../util/human.js";
import { dumpQObject, toQemuJson, type QJson } from "../util/qjson.js";

export interface InfoOptions {
  readonly filename: string;
  readonly format?: string | undefined;
  readonly output?: OutputFormat;
  readonly backingChain?: boolean;
  /** qemu-img -U. */
  readonly forceShare?: boolean;
}

type JsonObject = { [key: string]: QJson | undefined };

/** Allocated size of a file as qemu reports it (st_blocks * 512), or undefined. */
function actualSize(path: string): number | undefined {
  try {
    return statSync(path).blocks * 512;
  } catch {
    return undefined;
  }
}

/** What qemu-img prints of a snapshot: a {@link SnapshotInfo}, or a snapshot table entry. */
export type SnapshotFacts = Pick<
  SnapshotInfo,
  "id" | "name" | "vmStateSize" | "dateSec" | "dateNsec" | "vmClockNsec" | "icount"
>;

/** A snapshot's JSON object (`icount` undefined when not recorded), keys in qemu-img 7.2's order. */
export function snapshotJson(s: SnapshotFacts): JsonObject {
  return {
    icount: s.icount,
    "vm-clock-nsec": Number(s.vmClockNsec % 1_000_000_000n),
    name: s.name,
    "date-sec": s.dateSec,
    "date-nsec": s.dateNsec,
    "vm-clock-sec": Number(s.vmClockNsec / 1_000_000_000n),
    id: s.id,
    "vm-state-size": s.vmStateSize,
  };
}

/**
 * The ImageInfo object of one image, with the keys in the order qemu-img 7.2 prints them.
 * `filename` is the name the image was opened by.
 */
export function imageInfoJson(image: DiskImage, filename: string): JsonObject {
  return infoJson(
    { qcow2: qcow2InfoOf(image), qed: qedInfoOf(image) },
    image.virtualSize,
    image.format,
    filename,
  );
}

/** qemu-img's `encrypt` object (format-specific data), keys in its order. */
function encryptJson(e: Qcow2EncryptionInfo): JsonObject {
  if (e.format === "aes") return { format: "aes" };
  return {
    "ivgen-alg": e.ivgenAlg,
    "hash-alg": e.hashAlg,
    "cipher-alg": e.cipherAlg,
    uuid: e.uuid,
    "ivgen-hash-alg": e.ivgenHashAlg,
    format: "luks",
    "cipher-mode": e.cipherMode,
    slots: e.slots.map((s) => ({
      active: s.active,
      iters: s.iters,
      "key-offset": s.keyOffset,
      stripes: s.stripes,
    })),
    "payload-offset": e.payloadOffset,
    "master-key-iters": e.masterKeyIters,
  };
}

/** The ImageInfo object from the driver's facts (see {@link imageInfoJson}). */
function infoJson(
  facts: {
    qcow2: Qcow2Info | undefined;
    qed: ReturnType<typeof qedInfoOf>;
    encrypt?: Qcow2EncryptionInfo | undefined;
  },
  virtualSize: number,
  format: string,
  filename: string,
): JsonObject {
  const info: {
    snapshots?: JsonObject[];
    backingFormat?: string | undefined;
    clusterSize?: number;
    formatSpecific?: JsonObject;
    backingFilename?: string | undefined;
    dirty: boolean;
    encrypted?: boolean;
  } = { dirty: false };
  const qcow2 = facts.qcow2;
  const qed = facts.qed;
  const encrypt = facts.encrypt === undefined ? undefined : encryptJson(facts.encrypt);
  if (qcow2 !== undefined) {
    const q = qcow2;
    if (q.snapshots.length > 0) info.snapshots = q.snapshots.map(snapshotJson);
    info.backingFilename = q.backingFilename;
    info.backingFormat = q.backingFormat;
    info.clusterSize = q.clusterSize;
    info.dirty = q.dirty;
    if (q.encrypted) info.encrypted = true;
    const data: JsonObject =
      q.version === 2
        ? {
            compat: q.compat,
            "compression-type": q.compressionType,
            "refcount-bits": q.refcountBits,
            encrypt,
          }
        : {
            compat: q.compat,
            "compression-type": q.compressionType,
            "lazy-refcounts": q.lazyRefcounts,
            bitmaps:
              q.bitmaps.length > 0
                ? q.bitmaps.map((b) => ({
                    flags: [...b.flags],
                    name: b.name,
                    granularity: b.granularity,
                  }))
                : undefined,
            "refcount-bits": q.refcountBits,
            "data-file": q.dataFile,
            encrypt,
            "data-file-raw": q.dataFile !== undefined ? q.dataFileRaw : undefined,
            corrupt: q.corrupt,
            "extended-l2": q.extendedL2,
          };
    info.formatSpecific = { type: "qcow2", data };
  } else if (qed !== undefined) {
    const q = qed;
    info.backingFilename = q.backingFilename;
    info.backingFormat = q.backingFormat;
    info.clusterSize = q.clusterSize;
    // qemu-img 7.2 reports "dirty-flag": false for QED even when the need-check bit is set
    // (its QED driver does not report it); match it. `check` is where need-check shows.
    info.dirty = false;
  }
  const hasBacking = info.backingFilename !== undefined && info.backingFilename !== "";
  return {
    snapshots: info.snapshots,
    "backing-filename-format": hasBacking ? info.backingFormat : undefined,
    "virtual-size": virtualSize,
    filename,
    "cluster-size": info.clusterSize,
    format,
    "actual-size": actualSize(filename),
    "format-specific": info.formatSpecific,
    "full-backing-filename": hasBacking
      ? combinePath(filename, info.backingFilename ?? "")
      : undefined,
    encrypted: info.encrypted,
    "backing-filename": hasBacking ? info.backingFilename : undefined,
    "dirty-flag": info.dirty,
  };
}

function pad(s: string, width: number, left: boolean): string {
  return left ? s.padEnd(width) : s.padStart(width);
}

function two(n: number): string {
  return String(n).padStart(2, "0");
}

/** A JSON value as text: strings as they are, anything else as JSON. */
function str(v: unknown): string {
  if (typeof v === "bigint") return v.toString();
  return typeof v === "string" ? v : (JSON.stringify(v) ?? "");
}

/** One row of qemu's snapshot table (bdrv_snapshot_dump), without the newline. */
export function snapshotRow(s: JsonObject): string {
  const date = new Date(Number(s["date-sec"]) * 1000);
  const dateBuf = `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())} ${two(date.getHours())}:${two(date.getMinutes())}:${two(date.getSeconds())}`;
  const secs = Number(s["vm-clock-sec"]);
  const nsec = Number(s["vm-clock-nsec"]);
  const clock = `${two(Math.floor(secs / 3600))}:${two(Math.floor(secs / 60) % 60)}:${two(secs % 60)}.${String(Math.floor(nsec / 1_000_000) % 1000).padStart(3, "0")}`;
  const icount = s.icount === undefined ? "" : str(s.icount);
  return (
    pad(str(s.id), 9, true) +
    " " +
    pad(str(s.name), 16, true) +
    " " +
    pad(sizeToStr(Number(s["vm-state-size"])), 8, false) +
    pad(dateBuf, 20, false) +
    pad(clock, 13, false) +
    pad(icount, 11, false)
  );
}

export const SNAPSHOT_HEADER =
  pad("ID", 10, true) +
  pad("TAG", 17, true) +
  pad("VM SIZE", 8, false) +
  pad("DATE", 20, false) +
  pad("VM CLOCK", 13, false) +
  pad("ICOUNT", 11, false);

/** qemu's bdrv_image_info_dump(). */
export function humanInfo(info: JsonObject): string {
  const actual = info["actual-size"];
  const virtualSize = Number(info["virtual-size"]);
  let out =
    `image: ${str(info.filename)}\n` +
    `file format: ${str(info.format)}\n` +
    `virtual size: ${sizeToStr(virtualSize)} (${virtualSize} bytes)\n` +
    `disk size: ${actual === undefined ? "unavailable" : sizeToStr(Number(actual))}\n`;
  if (info.encrypted === true) out += "encrypted: yes\n";
  if (info["cluster-size"] !== undefined) out += `cluster_size: ${str(info["cluster-size"])}\n`;
  if (info["dirty-flag"] === true) out += "cleanly shut down: no\n";
  const backing = info["backing-filename"];
  if (backing !== undefined) {
    const full = info["full-backing-filename"];
    out += `backing file: ${str(backing)}`;
    if (full === undefined) out += " (cannot determine actual path)";
    else if (full !== backing) out += ` (actual path: ${str(full)})`;
    out += "\n";
    if (info["backing-filename-format"] !== undefined)
      out += `backing file format: ${str(info["backing-filename-format"])}\n`;
  }
  const snapshots = info.snapshots;
  if (Array.isArray(snapshots)) {
    out += `Snapshot list:\n${SNAPSHOT_HEADER}\n`;
    for (const s of snapshots as JsonObject[]) out += snapshotRow(s) + "\n";
  }
  const spec = info["format-specific"];
  if (spec !== undefined && spec !== null && typeof spec === "object" && !Array.isArray(spec)) {
    out += "Format specific information:\n";
    out += dumpQObject((spec as JsonObject).data ?? null, 1);
  }
  return out;
}

/** True when `e` (or an error it wraps) is the driver's refusal of an encrypted image. */
function isEncryptionRefusal(e: unknown): boolean {
  for (let c: unknown = e; c instanceof Error; c = c.cause) {
    if (c.message.startsWith("encryption is not supported")) return true;
  }
  return false;
}

/**
 * `info` of an encrypted qcow2 image, which the driver does not open: the header facts, read
 * without a key as qemu-img shows them. Undefined when the file is not such an image.
 */
async function encryptedInfo(
  ctx: CliContext,
  options: InfoOptions,
): Promise<JsonObject[] | undefined> {
  if (options.format !== undefined && options.format !== "qcow2") return undefined;
  const backend = await FileBackend.open(options.filename, { readOnly: true });
  try {
    const r = await readEncryptedQcow2Info(backend);
    if (r === undefined) return undefined;
    const top = infoJson(
      { qcow2: r.info, qed: undefined, encrypt: r.encrypt },
      Math.floor(r.info.virtualSize / 512) * 512,
      "qcow2",
      options.filename,
    );
    const backing = r.info.backingFilename;
    if (options.backingChain !== true || backing === undefined || backing === "") return [top];
    // --backing-chain: the backing chain below opens as usual.
    const below = await openImage(combinePath(options.filename, backing), {
      format: r.info.backingFormat,
      ctx,
      openBacking: true,
      forceShare: options.forceShare === true,
    });
    try {
      return [top, ...chainOf(below).map((l) => imageInfoJson(l, l.backend.name))];
    } finally {
      await below.close();
    }
  } finally {
    await backend.close();
  }
}

export async function runInfo(ctx: CliContext, options: InfoOptions): Promise<number> {
  let image: DiskImage;
  try {
    image = await openImage(options.filename, {
      format: options.format,
      ctx,
      openBacking: options.backingChain === true,
      forceShare: options.forceShare === true,
    });
  } catch (e) {
    if (!isEncryptionRefusal(e)) throw e;
    const json = await inFile(options.filename, () => encryptedInfo(ctx, options));
    if (json === undefined) throw e;
    if (options.output === "json") {
      ctx.stdout(toQemuJson(options.backingChain === true ? json : (json[0] ?? null)) + "\n");
    } else {
      ctx.stdout(json.map(humanInfo).join("\n"));
    }
    return 0;
  }
  try {
    const layers = options.backingChain === true ? chainOf(image) : [image];
    const infos = layers.map((layer) =>
      inFile(layer.backend.name, () => Promise.resolve(imageInfoJson(layer, layer.backend.name))),
    );
    const resolved = await Promise.all(infos);
    if (options.output === "json") {
      ctx.stdout(
        toQemuJson(options.backingChain === true ? resolved : (resolved[0] ?? null)) + "\n",
      );
    } else {
      ctx.stdout(resolved.map(humanInfo).join("\n"));
    }
    return 0;
  } finally {
    await image.close();
  }
}

export const infoCommand: CommandDef = {
  name: "info",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("show information about an image (qemu-img info)")
      .argument("<filename>", "image file")
      .option("-f, --format <fmt>", "image format (qcow2, qed, raw); probed when omitted")
      .addOption(
        new Option("--output <format>", "output format")
          .choices(["human", "json"])
          .default("human"),
      )
      .option("--backing-chain", "show every image of the backing chain")
      .option(
        "-U, --force-share",
        "open read-only images even while another process writes them (qemu-img -U: shares every lock; read-only opens only)",
      );
  },
  run(ctx, args, opts) {
    return runInfo(ctx, {
      filename: args[0] ?? "",
      format: stringOpt(opts, "format"),
      output: parseOutputFormat(opts.output),
      backingChain: opts.backingChain === true,
      forceShare: opts.forceShare === true,
    });
  },
};

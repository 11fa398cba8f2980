/**
 * Creating image files (qemu-img create, and the target of convert): qemu-img's option names,
 * checks and messages, per format.
 */
import * as fs from "node:fs";
import type { BlockBackend } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import * as qcow2 from "@qimg/qcow2";
import * as qed from "@qimg/qed";
import type { Qcow2CreateOptions } from "@qimg/qcow2";
import type { CliContext } from "./context.js";
import { CliError, FileContextError, describeError, inFile, messageOf } from "./errors.js";
import { combinePath, openImage } from "./open.js";
import { formattingLine, type OptDesc, type OptMap } from "./util/qemu-opts.js";
import { preallocate } from "./util/preallocate.js";
import { roundUp } from "./util/size.js";

/** Formats qimg can create. */
export const CREATE_FORMATS = ["qcow2", "qed", "raw"] as const;
export type CreateFormat = (typeof CREATE_FORMATS)[number];

const BACKING_FILE: OptDesc = {
  name: "backing_file",
  type: "str",
  help: "File name of a base image",
};
const BACKING_FMT: OptDesc = {
  name: "backing_fmt",
  type: "str",
  help: "Image format of the base image",
};
const SIZE: OptDesc = { name: "size", type: "size", help: "Virtual disk size" };

/** qcow2's options in the order qemu-img prints them in the Formatting line. */
export const QCOW2_OPTIONS: readonly OptDesc[] = [
  { name: "cluster_size", type: "size", help: "qcow2 cluster size", defaultText: "65536" },
  { name: "extended_l2", type: "bool", help: "Extended L2 tables", defaultText: "off" },
  {
    name: "preallocation",
    type: "str",
    help: "Preallocation mode (allowed values: off, metadata, falloc, full)",
  },
  {
    name: "compression_type",
    type: "str",
    help: "Compression method used for image cluster compression",
    defaultText: "zlib",
  },
  SIZE,
  { name: "compat", type: "str", help: "Compatibility level (v2 [0.10] or v3 [1.1])" },
  BACKING_FILE,
  BACKING_FMT,
  { name: "data_file", type: "str", help: "File name of an external data file" },
  {
    name: "data_file_raw",
    type: "bool",
    help: "The external data file must stay valid as a raw image",
  },
  { name: "lazy_refcounts", type: "bool", help: "Postpone refcount updates", defaultText: "off" },
  {
    name: "refcount_bits",
    type: "num",
    help: "Width of a reference count entry in bits",
    defaultText: "16",
  },
];

export const QED_OPTIONS: readonly OptDesc[] = [
  SIZE,
  BACKING_FILE,
  BACKING_FMT,
  { name: "cluster_size", type: "size", help: "Cluster size (in bytes)", defaultText: "65536" },
  { name: "table_size", type: "size", help: "L1/L2 table size (in clusters)" },
];

export const RAW_OPTIONS: readonly OptDesc[] = [SIZE];

/** Accepted for raw (qemu's file protocol option) but not listed by `-o help`, as qemu-img. */
const RAW_PROTOCOL_OPTIONS: readonly OptDesc[] = [
  SIZE,
  {
    name: "preallocation",
    type: "str",
    help: "Preallocation mode (allowed values: off, falloc, full)",
  },
];

/** Options accepted by `-o` (a superset of the listed ones for raw). */
export function acceptedOptionsOf(format: CreateFormat): readonly OptDesc[] {
  return format === "raw" ? RAW_PROTOCOL_OPTIONS : optionsOf(format);
}

export function optionsOf(format: CreateFormat): readonly OptDesc[] {
  return format === "qcow2" ? QCOW2_OPTIONS : format === "qed" ? QED_OPTIONS : RAW_OPTIONS;
}

/** Check `-f`/`-O` names a format qimg can create ("Unknown file format 'X'"). */
export function checkCreateFormat(format: string, file?: string): CreateFormat {
  if ((CREATE_FORMATS as readonly string[]).includes(format)) return format as CreateFormat;
  throw new CliError(`Unknown file format '${format}'`, { file });
}

function str(opts: OptMap, key: string): string | undefined {
  const v = opts.get(key);
  return v === undefined ? undefined : String(v.value);
}
function num(opts: OptMap, key: string): number | undefined {
  const v = opts.get(key);
  return v === undefined ? undefined : Number(v.value);
}
function bool(opts: OptMap, key: string): boolean | undefined {
  const v = opts.get(key);
  return v === undefined ? undefined : v.value === true;
}

function oneOf<T extends string>(
  value: string | undefined,
  allowed: readonly T[],
  param: string,
): T | undefined {
  if (value === undefined) return undefined;
  if ((allowed as readonly string[]).includes(value)) return value as T;
  throw new CliError(`Parameter '${param}' does not accept value '${value}'`);
}

/** The library's create options for a qcow2 image, checked with qemu-img's messages. */
export function qcow2CreateOptions(opts: OptMap, size: number): Qcow2CreateOptions {
  const compat = oneOf(str(opts, "compat"), ["0.10", "1.1", "v2", "v3"] as const, "version");
  const compressionType = oneOf(
    str(opts, "compression_type"),
    ["zlib", "zstd"] as const,
    "compression-type",
  );
  const preallocation = oneOf(
    str(opts, "preallocation"),
    ["off", "metadata", "falloc", "full"] as const,
    "preallocation",
  );
  const o: { -readonly [K in keyof Qcow2CreateOptions]: Qcow2CreateOptions[K] } = { size };
  if (compat !== undefined) o.compat = compat;
  if (compressionType !== undefined) o.compressionType = compressionType;
  if (preallocation !== undefined) o.preallocation = preallocation;
  const clusterSize = num(opts, "cluster_size");
  if (clusterSize !== undefined) o.clusterSize = clusterSize;
  const refcountBits = num(opts, "refcount_bits");
  if (refcountBits !== undefined) o.refcountBits = refcountBits;
  const lazy = bool(opts, "lazy_refcounts");
  if (lazy !== undefined) o.lazyRefcounts = lazy;
  const extendedL2 = bool(opts, "extended_l2");
  if (extendedL2 !== undefined) o.extendedL2 = extendedL2;
  const backingFile = str(opts, "backing_file");
  if (backingFile !== undefined) o.backingFile = backingFile;
  const backingFormat = str(opts, "backing_fmt");
  if (backingFormat !== undefined) o.backingFormat = backingFormat;
  const dataFile = str(opts, "data_file");
  if (dataFile !== undefined) o.dataFile = dataFile;
  const dataFileRaw = bool(opts, "data_file_raw");
  if (dataFileRaw !== undefined) o.dataFileRaw = dataFileRaw;
  if (o.dataFileRaw === true && o.dataFile !== undefined && o.backingFile !== undefined) {
    throw new CliError("Backing file and data-file-raw cannot be used at the same time");
  }
  return o;
}

export interface CreateRequest {
  readonly file: string;
  readonly format: CreateFormat;
  readonly opts: OptMap;
  /** Size from the command line (bytes), if given. */
  readonly size?: number | undefined;
  readonly quiet: boolean;
  /** `-u`: do not open the backing file (the size must then be given). */
  readonly unsafe?: boolean;
  readonly ctx: CliContext;
}

/**
 * qemu-img create: size and backing checks, the Formatting line, then the file. Errors are
 * `CliError`s (attributed to the file) with qemu-img's messages.
 */
export async function createImage(req: CreateRequest): Promise<void> {
  const { file, format, ctx } = req;
  return inFile(file, async () => {
    const opts: OptMap = new Map(req.opts);
    if (req.size !== undefined) {
      if (opts.has("size")) throw new CliError("The image size must be specified only once");
      opts.set("size", { text: String(req.size), value: req.size });
    }
    const backingFile = str(opts, "backing_file");
    if (backingFile !== undefined && format !== "raw") {
      const backingFmt = str(opts, "backing_fmt");
      if (backingFmt === undefined) {
        throw new CliError("Backing file specified without backing format");
      }
      const path = combinePath(file, backingFile);
      if (!opts.has("size") || req.unsafe !== true) {
        if (path === file) {
          throw new CliError(
            "Error: Trying to create an image with the same filename as the backing file",
          );
        }
        let backing;
        try {
          // Only its size is needed: as qemu-img, share every lock (it may be in use).
          backing = await openImage(path, { format: backingFmt, ctx, forceShare: true });
        } catch (e) {
          // System errors in strerror() words, chosen by their errno code (see messageOf).
          throw new CliError(`Could not open '${path}': ${messageOf(e, path)}`, { cause: e });
        }
        const backingSize = backing.virtualSize;
        await backing.close();
        if (!opts.has("size")) opts.set("size", { text: String(backingSize), value: backingSize });
      }
    }
    const size = num(opts, "size");
    if (size === undefined) throw new CliError("Image creation needs a size parameter");
    if (!req.quiet) ctx.stdout(formattingLine(file, format, opts, acceptedOptionsOf(format)));
    await writeNewImage(file, format, opts, size);
  });
}

/**
 * A file a create writes. It remembers whether the file existed before and whether anything
 * was written to it (through `backend`), so a failed create can put things back as far as
 * possible: a file the create made is removed, and so is one it had begun to overwrite (what
 * is left of it would be a half-made image; qemu-img removes it too). A file that existed and
 * was not touched yet stays as it was.
 */
interface NewFile {
  readonly path: string;
  readonly file: FileBackend;
  /** `file`, noting the first write or truncate. */
  readonly backend: BlockBackend;
  readonly created: boolean;
  touched: boolean;
}

function errnoOf(e: unknown): string | undefined {
  return typeof e === "object" && e !== null && "code" in e && typeof e.code === "string"
    ? e.code
    : undefined;
}

async function openNewFile(path: string, noFlush: boolean): Promise<NewFile> {
  let created = false;
  try {
    await fs.promises.stat(path);
  } catch (e) {
    // A missing file, or a dangling symbolic link: opening creates it.
    created = errnoOf(e) === "ENOENT";
  }
  // Opened without O_TRUNC: the formats' create functions check their options before they
  // truncate, so a refused create leaves an existing file as it was.
  const file = await FileBackend.open(path, { create: true, noFlush });
  const f: NewFile = {
    path,
    file,
    created,
    touched: false,
    backend: {
      get readOnly() {
        return file.readOnly;
      },
      get kind() {
        return file.kind;
      },
      get name() {
        return file.name;
      },
      read: (offset, buf, options) => file.read(offset, buf, options),
      write: (offset, data) => {
        f.touched = true;
        return file.write(offset, data);
      },
      flush: () => file.flush(),
      size: () => file.size(),
      truncate: (size) => {
        f.touched = true;
        return file.truncate(size);
      },
      close: () => file.close(),
    },
  };
  return f;
}

/**
 * Run `fn` over the files of a new image, opened in order. On failure, every file is closed,
 * and each regular file that was created or written is removed; the error is rethrown.
 */
async function withNewFiles(
  paths: readonly string[],
  noFlush: boolean,
  fn: (files: readonly NewFile[]) => Promise<void>,
): Promise<void> {
  const files: NewFile[] = [];
  try {
    for (const [i, p] of paths.entries()) {
      try {
        files.push(await openNewFile(p, noFlush));
      } catch (e) {
        const errno = e instanceof Error ? errnoOf(e.cause) : undefined;
        if (i === 0 || errno === undefined) throw new FileContextError(p, e);
        // A data file that cannot be made: qemu-img's words, attributed to the image.
        const reason = describeError(e).line.replace(/^qimg: /, "");
        throw new CliError(`Could not create '${p}': ${reason}`, { file: paths[0], cause: e });
      }
    }
    await fn(files);
  } catch (e) {
    for (const f of files) {
      await f.file.close().catch(() => undefined);
      if ((f.created || f.touched) && f.file.kind === "file") {
        await fs.promises
          .realpath(f.path)
          .then((real) => fs.promises.unlink(real))
          .catch(() => undefined);
      }
    }
    throw e;
  }
  for (const f of files) await f.file.close();
}

/**
 * Create the file(s) of a new image of `size` bytes; no messages printed. Options are checked
 * before any file is touched; a create that fails leaves no half-made image behind.
 */
export async function writeNewImage(
  file: string,
  format: CreateFormat,
  opts: OptMap,
  size: number,
  { noFlush = false }: { noFlush?: boolean } = {},
): Promise<void> {
  if (format === "qcow2") {
    const o = qcow2CreateOptions(opts, size);
    // Validate before touching any file.
    qcow2.normalizeCreateOptions(o);
    const paths = o.dataFile === undefined ? [file] : [file, o.dataFile];
    await withNewFiles(paths, noFlush, async ([main, data]) => {
      if (data !== undefined) {
        await inFile(data.path, async () => {
          await data.backend.truncate(0);
          await data.backend.truncate(roundUp(size, 512));
        });
      }
      await qcow2.createQcow2(main!.backend, o, data?.backend);
      await main!.backend.flush();
      await data?.backend.flush();
    });
    return;
  }
  if (format === "qed") {
    const clusterSize = num(opts, "cluster_size") ?? 65536;
    const tableSize = num(opts, "table_size") ?? 4;
    if (!isPow2(clusterSize) || clusterSize < 4096 || clusterSize > 64 * 1024 * 1024) {
      throw new CliError("QED cluster size must be within range [4096, 67108864] and power of 2");
    }
    if (!isPow2(tableSize) || tableSize > 16) {
      throw new CliError("QED table size must be within range [1, 16] and power of 2");
    }
    const backingFile = str(opts, "backing_file");
    const backingFormat = str(opts, "backing_fmt");
    await withNewFiles([file], noFlush, async ([main]) => {
      await qed.createQed(main!.backend, {
        size,
        clusterSize,
        tableSize,
        ...(backingFile !== undefined ? { backingFile } : {}),
        ...(backingFormat !== undefined ? { backingFormat } : {}),
      });
    });
    return;
  }
  const prealloc = oneOf(
    str(opts, "preallocation"),
    ["off", "falloc", "full"] as const,
    "preallocation",
  );
  await withNewFiles([file], noFlush, async ([main]) => {
    const backend = main!.backend;
    await backend.truncate(0);
    const total = roundUp(size, 512);
    // falloc allocates without writing; where the system cannot, zeros are written as for full.
    const allocated =
      prealloc === "falloc" &&
      total > 0 &&
      (await preallocate(file, [{ offset: 0, length: total }], { minLength: 0 })) === 1;
    if (prealloc === "full" || (prealloc === "falloc" && !allocated)) {
      const zero = new Uint8Array(Math.min(total, 4 << 20));
      for (let pos = 0; pos < total; pos += zero.length) {
        await backend.write(pos, zero.subarray(0, Math.min(zero.length, total - pos)));
      }
    }
    await backend.truncate(total);
    await backend.flush();
  });
}

function isPow2(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

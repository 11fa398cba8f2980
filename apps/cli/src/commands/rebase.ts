/**
 * `qimg rebase [-f fmt] [-F fmt] [-b backing | -b ""] [-u] [-p] [-q] [-c] [-t cache]
 * [-T src_cache] [-U] FILE` — qemu-img rebase: make the image name another backing file.
 *
 * Safe mode (the default) keeps what the guest reads: every range the image does not hold
 * itself is compared between the old backing chain and the new one (zeros past either's end,
 * or everywhere for `-b ""`), and the 512-byte sectors that differ are written into the image
 * with the old content before the header names the new backing file. `-u` only rewrites the
 * name and format in the header. `-c` (a qimg extension here; qemu-img 7.2 has no `-c` for
 * rebase) writes what rebase copies as compressed clusters (qcow2). A relative backing name
 * is resolved against the image's directory and stored as given, as qemu-img does.
 */
import type { Command } from "commander";
import { StatusCursor } from "@qimg/io";
import { Qcow2Image } from "@qimg/qcow2";
import { QedImage, planQedBackingChange } from "@qimg/qed";
import type { CommandDef } from "../command.js";
import { stringOpt } from "../command.js";
import type { CliContext } from "../context.js";
import type { DiskImage, WritableDiskImage } from "../drivers.js";
import { CliError, inFile, messageOf } from "../errors.js";
import { combinePath, openImage, writeTarget } from "../open.js";
import { cacheMode } from "../util/cache-mode.js";
import { COPY_CHUNK } from "../util/copy.js";
import { startProgress } from "../util/progress.js";

/** Format names qemu-img 7.2 knows (`-F` in unsafe mode only records the name). */
const QEMU_FORMATS: ReadonlySet<string> = new Set([
  "blkdebug",
  "blklogwrites",
  "blkverify",
  "bochs",
  "cloop",
  "compress",
  "copy-before-write",
  "copy-on-read",
  "dmg",
  "file",
  "host_cdrom",
  "host_device",
  "luks",
  "nbd",
  "null-aio",
  "null-co",
  "nvme",
  "parallels",
  "preallocate",
  "qcow",
  "qcow2",
  "qed",
  "quorum",
  "raw",
  "replication",
  "snapshot-access",
  "throttle",
  "vdi",
  "vhdx",
  "vmdk",
  "vpc",
  "vvfat",
]);

const SECTOR = 512;
const enc = new TextEncoder();

/** How qemu-img words a failed open of `path` after its own prefix. */
function openFailure(e: unknown, path: string): string {
  const text = messageOf(e, path);
  return text.startsWith("Could not open") ? text : `Could not open '${path}': ${text}`;
}

function changeError(name: string | undefined, why: string): CliError {
  return new CliError(`Could not change the backing file to '${name ?? ""}': ${why}`);
}

/** Refusals of the header change itself, decided before any data is written. */
function checkChange(top: DiskImage, name: string | undefined, format: string | undefined): void {
  if (top instanceof Qcow2Image) {
    if (name !== undefined && enc.encode(name).byteLength > 1023) {
      throw changeError(name, "Invalid argument");
    }
    if (name !== undefined && top.info().dataFileRaw === true) {
      throw changeError(name, "Invalid argument");
    }
  } else if (top instanceof QedImage) {
    try {
      planQedBackingChange(top.header, { filename: name, format });
    } catch (e) {
      const why =
        e instanceof Error && e.message.startsWith("No space")
          ? "No space left on device"
          : "Operation not supported";
      throw changeError(name, why);
    }
  } else {
    throw changeError(name, "Operation not supported");
  }
}

/**
 * Write into `top` every sector of the ranges it does not hold itself where the old chain
 * (what `top` reads there now) and `newBacking` (zeros when undefined or past its end) differ.
 */
export async function copyDifferences(
  ctx: CliContext,
  top: WritableDiskImage,
  newBacking: DiskImage | undefined,
  options: { compress: boolean; progress: boolean },
): Promise<void> {
  const size = top.virtualSize;
  const cs = top.clusterSize;
  const chunk = Math.max(COPY_CHUNK - (COPY_CHUNK % cs), cs);
  const progress = startProgress(ctx, options.progress, size);
  const oldBuf = new Uint8Array(chunk);
  const newBuf = new Uint8Array(chunk);
  try {
    const cursor = new StatusCursor(top);
    for (let pos = 0; pos < size; pos = cursor.end) {
      const s = await cursor.at(pos);
      const end = cursor.end;
      if (s.present && s.depth === 0) {
        progress.update(end);
        continue;
      }
      for (let c = pos; c < end; c += chunk) {
        const n = Math.min(chunk, end - c);
        const oldData = oldBuf.subarray(0, n);
        const newData = newBuf.subarray(0, n);
        await top.read(c, oldData);
        newData.fill(0);
        if (newBacking !== undefined && c < newBacking.virtualSize) {
          await newBacking.read(c, newData.subarray(0, Math.min(n, newBacking.virtualSize - c)));
        }
        await writeDifferences(top, c, oldData, newData, { ...options, extentEnd: end });
        progress.update(c + n);
      }
    }
  } finally {
    progress.stop();
  }
}

function sameSector(a: Uint8Array, b: Uint8Array, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (a[i] !== b[i]) return false;
  return true;
}

async function writeDifferences(
  top: WritableDiskImage,
  at: number,
  oldData: Uint8Array,
  newData: Uint8Array,
  options: { compress: boolean; extentEnd: number },
): Promise<void> {
  const n = oldData.byteLength;
  const cs = top.clusterSize;
  const size = top.virtualSize;
  let i = 0;
  while (i < n) {
    if (options.compress) {
      // Whole clusters the image does not hold at all go in compressed.
      const cStart = at + i;
      const cEnd = Math.min(cStart + cs, size);
      if (cStart % cs === 0 && cEnd <= options.extentEnd && cEnd - at <= n) {
        const len = cEnd - cStart;
        if (!sameSector(oldData, newData, i, i + len)) {
          await top.writeCompressed!(cStart, oldData.slice(i, i + len));
        }
        i += len;
        continue;
      }
    }
    const step = Math.min(SECTOR - ((at + i) % SECTOR), n - i);
    if (sameSector(oldData, newData, i, i + step)) {
      i += step;
      continue;
    }
    // A run of differing sectors (stopping at the next cluster when compressing).
    let j = i + step;
    const stop = options.compress ? Math.min(n, Math.ceil((at + j) / cs) * cs - at) : n;
    while (j < stop) {
      const k = Math.min(j + SECTOR, stop);
      if (sameSector(oldData, newData, j, k)) break;
      j = k;
    }
    await top.write(at + i, oldData.slice(i, j));
    i = j;
  }
}

export const rebaseCommand: CommandDef = {
  name: "rebase",
  errorExitCode: 1,
  configure(cmd: Command) {
    cmd
      .description("change the backing file of an image (qemu-img rebase)")
      .argument("<file>", "image to rebase")
      .option("-f, --format <fmt>", "image format (qcow2, qed); probed when omitted")
      .option("-F, --backing-format <fmt>", "format of the new backing file")
      .option("-b, --backing <file>", 'new backing file ("" for none)')
      .option("-u, --unsafe", "only rewrite the backing file name and format in the header")
      .option("-p, --progress", "show progress")
      .option("-q, --quiet", "print nothing")
      .option("-c, --compress", "write the copied data compressed (qcow2)")
      .option("-t, --cache <mode>", "cache mode for the image (default writeback)")
      .option("-T, --src-cache <mode>", "cache mode for the backing files (default writeback)")
      .option("-U, --force-share", "open the backing files even while others write them");
  },
  async run(ctx, args, opts) {
    const file = args[0] ?? "";
    const format = stringOpt(opts, "format");
    const backingFormat = stringOpt(opts, "backingFormat");
    const backing = stringOpt(opts, "backing");
    const unsafe = opts.unsafe === true;
    const quiet = opts.quiet === true;
    const compress = opts.compress === true;
    if (!unsafe && backing === undefined) {
      throw new CliError("Must specify backing file (-b) or use unsafe mode (-u)");
    }
    const mode = cacheMode(stringOpt(opts, "cache") ?? "writeback");
    cacheMode(stringOpt(opts, "srcCache") ?? "writeback");
    if (backingFormat !== undefined && !QEMU_FORMATS.has(backingFormat)) {
      throw new CliError(`Invalid format name: '${backingFormat}'`);
    }
    const name = backing === "" ? undefined : backing;

    // Refusals on read-only opens first: a refused rebase leaves every file as it was.
    const probe = await openImage(file, {
      format,
      readOnly: true,
      ctx,
      forceShare: true,
      openBacking: !unsafe,
    });
    const topFormat = probe.format;
    try {
      checkChange(probe, name, backingFormat);
      if (compress && !(probe instanceof Qcow2Image)) {
        throw new CliError("Compression not supported for this file format", { file });
      }
    } finally {
      await inFile(file, () => probe.close());
    }
    let newBacking: DiskImage | undefined;
    if (!unsafe && name !== undefined) {
      const path = combinePath(file, name);
      try {
        newBacking = await openImage(path, {
          format: backingFormat,
          readOnly: true,
          ctx,
          forceShare: true,
        });
      } catch (e) {
        throw new CliError(`Could not open new backing file '${name}': ${openFailure(e, path)}`, {
          cause: e,
        });
      }
    }
    try {
      if (name !== undefined && backingFormat === undefined) {
        throw changeError(name, "backing format must be specified");
      }
      const top = await openImage(file, {
        format: topFormat,
        readOnly: false,
        openBacking: !unsafe,
        ctx,
        noFlush: mode.noFlush,
        qcow2: { writethrough: mode.writethrough },
        forceShare: false,
      });
      try {
        writeTarget(top);
        if (!unsafe) {
          await inFile(file, () =>
            copyDifferences(ctx, top, newBacking, {
              compress,
              progress: opts.progress === true && !quiet,
            }),
          );
        }
        const change = { filename: name, format: name === undefined ? undefined : backingFormat };
        if (top instanceof Qcow2Image || top instanceof QedImage) {
          await inFile(file, () => top.changeBackingFile(change));
        }
      } finally {
        await inFile(file, () => top.close());
      }
    } finally {
      await newBacking?.close();
    }
    return 0;
  },
};

/**
 * Opening image files by path: format from `-f` or probed by magic, and the backing-file
 * opener handed to the format drivers.
 */
import { realpathSync, statSync } from "node:fs";
import { FileBackend } from "@qimg/io/node";
import { CorruptImageError, InvalidArgumentError } from "@qimg/structs";
import type { CliContext } from "./context.js";
import {
  openQcow2Image,
  openQedImage,
  openRaw,
  type BackingOpener,
  type BackingRequest,
  type BlockBackend,
  type DiskImage,
  type Qcow2WriteOptions,
  type WritableDiskImage,
} from "./drivers.js";
import { CliError, inFile, messageOf } from "./errors.js";
import { PROBE_SIZE, probeFormat, probedRawWarning } from "./probe.js";

/** Formats this build can open. */
export const KNOWN_FORMATS = ["qcow2", "qed", "raw"] as const;

/** Longest backing chain we follow (qemu has no fixed limit but recursion depth; 64 is plenty). */
export const MAX_BACKING_DEPTH = 64;

export interface OpenImageOptions {
  /** Format from `-f`; probed by magic when undefined. */
  readonly format?: string | undefined;
  /** Open read-only (default true). */
  readonly readOnly?: boolean;
  /** Open the backing chain (default true); `info` without `--backing-chain` does not. */
  readonly openBacking?: boolean;
  /** Where warnings go. */
  readonly ctx: CliContext;
  /** qcow2 write-side options (only for the top image). */
  readonly qcow2?: Qcow2WriteOptions | undefined;
  /** Ignore flushes on the top image's file (qemu's cache=unsafe). */
  readonly noFlush?: boolean;
  /**
   * qemu-img's `-U` (read-only opens only): share every permission on every file of the
   * chain, so the image opens while another process (a VM, qemu-io) writes it.
   */
  readonly forceShare?: boolean | undefined;
  /**
   * Called with the path of every file opened for the image: the image itself, each backing
   * file and each external data file (so a command can refuse to write to any of them).
   */
  readonly onOpen?: ((path: string) => void) | undefined;
}

/**
 * qemu's path_combine(): a relative backing name is taken relative to the directory part of
 * the overlay's name, textually (no normalisation), so messages and `map` print the same
 * names as qemu-img.
 */
export function combinePath(base: string, name: string): string {
  if (name.startsWith("/")) return name;
  const slash = base.lastIndexOf("/");
  return slash < 0 ? name : base.slice(0, slash + 1) + name;
}

function realPathOrSelf(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return path;
  }
}

/** Read the first bytes and name the format: "qcow2", "qed", or undefined (raw, guessed). */
export async function probeBackend(backend: BlockBackend): Promise<"qcow2" | "qed" | undefined> {
  const size = await backend.size();
  const head = new Uint8Array(Math.min(PROBE_SIZE, size));
  if (head.length > 0) await backend.read(0, head);
  return probeFormat(head);
}

export function checkFormat(format: string): void {
  if (!(KNOWN_FORMATS as readonly string[]).includes(format)) {
    throw new InvalidArgumentError(`Unknown driver '${format}'`);
  }
}

/**
 * Open an already-open backend as `format` (probing when undefined). Closes the backend
 * when the driver fails.
 */
async function openOnBackend(
  backend: BlockBackend,
  format: string | undefined,
  options: {
    readOnly: boolean;
    openBacking: BackingOpener | undefined;
    ctx: CliContext;
    warnRaw: boolean;
    qcow2?: Qcow2WriteOptions | undefined;
    /** Set for backing files: never conclude "raw" from probing (the probing attack). */
    backingOf?: string | undefined;
    onOpen?: ((path: string) => void) | undefined;
    forceShare?: boolean | undefined;
  },
): Promise<WritableDiskImage> {
  try {
    let fmt = format;
    if (fmt === undefined) {
      const probed = await probeBackend(backend);
      if (probed === undefined && options.backingOf !== undefined) {
        // A raw backing file holds guest data, which could pose as any format's header, and
        // a raw guess could expose host files: qimg never guesses raw for a backing file.
        throw new CliError(
          `backing file '${backend.name}' of '${options.backingOf}' has no recorded format and is not qcow2 or QED; ` +
            `qimg does not guess raw for backing files (record the format, e.g. qemu-img rebase -u -F raw -b '${backend.name}' '${options.backingOf}')`,
        );
      }
      fmt = probed ?? "raw";
      if (fmt === "raw" && options.warnRaw) options.ctx.stderr(probedRawWarning(backend.name));
    }
    checkFormat(fmt);
    const readOnly = options.readOnly;
    const driverOptions = {
      readOnly,
      openBacking: options.openBacking,
      openDataFile: (name: string, relativeTo: string) => {
        const path = combinePath(relativeTo, name);
        options.onOpen?.(path);
        return inFile(path, () =>
          FileBackend.open(path, { readOnly, forceShare: readOnly && options.forceShare === true }),
        );
      },
      qcow2: options.qcow2,
      onWarning: (message: string) => options.ctx.stderr(`qimg: warning: ${message}\n`),
    };
    switch (fmt) {
      case "qcow2":
        return await openQcow2Image(backend, driverOptions);
      case "qed":
        return await openQedImage(backend, driverOptions);
      default:
        return await openRaw(backend, readOnly);
    }
  } catch (e) {
    await backend.close().catch(() => undefined);
    throw e;
  }
}

/**
 * A {@link BackingOpener} for images opened from files: relative names resolve against the
 * overlay's directory; the recorded format is used when there is one, else the file is probed
 * (qcow2/QED by magic, otherwise raw with qemu's warning); chains deeper than
 * {@link MAX_BACKING_DEPTH} and chains that loop back to a file already open (compared by
 * real path) are refused as corrupt.
 *
 * `chain` holds the real paths of the images above the one being opened, top first.
 */
export function fileBackingOpener(
  ctx: CliContext,
  chain: readonly string[],
  onOpen?: (path: string) => void,
  forceShare = false,
): BackingOpener {
  return async (request: BackingRequest): Promise<DiskImage> => {
    const depth = chain.length;
    const path = combinePath(request.relativeTo, request.filename);
    if (depth > MAX_BACKING_DEPTH) {
      throw new CorruptImageError(
        `backing chain of '${chain[0] ?? request.relativeTo}' is deeper than ${MAX_BACKING_DEPTH} images (at '${path}')`,
      );
    }
    const real = realPathOrSelf(path);
    if (chain.includes(real)) {
      throw new CorruptImageError(
        `backing file '${path}' of '${request.relativeTo}' makes a loop in the backing chain`,
      );
    }
    onOpen?.(path);
    return inFile(path, async () => {
      const share = forceShare && request.readOnly;
      const backend = await FileBackend.open(path, {
        readOnly: request.readOnly,
        forceShare: share,
      }).catch((e: unknown) => {
        // A backing file that cannot be opened (missing, no permission) is named as qemu
        // names it, attributed to the image that refers to it.
        if (!(e instanceof Error) || !e.message.includes(": open failed: ")) throw e;
        throw new CliError(
          `Could not open backing file: Could not open '${path}': ${messageOf(e, path)}`,
          { file: request.relativeTo, cause: e },
        );
      });
      return openOnBackend(backend, request.format, {
        readOnly: request.readOnly,
        openBacking: fileBackingOpener(ctx, [...chain, real], onOpen, forceShare),
        ctx,
        warnRaw: true,
        backingOf: request.relativeTo,
        onOpen,
        forceShare: share,
      });
    });
  };
}

/**
 * Open the image file at `path`. Errors are attributed to `path` (see {@link inFile}).
 *
 * A probed raw image only draws qemu-img's "probing guessed raw" warning when it is opened
 * for writing, as qemu-img does; read-only commands stay quiet.
 */
export async function openImage(
  path: string,
  options: OpenImageOptions,
): Promise<WritableDiskImage> {
  const readOnly = options.readOnly ?? true;
  return inFile(path, async () => {
    if (options.format !== undefined) checkFormat(options.format);
    const forceShare = options.forceShare === true;
    if (forceShare && !readOnly) {
      throw new CliError("force-share=on can only be used with read-only images");
    }
    options.onOpen?.(path);
    const backend = await FileBackend.open(path, {
      readOnly,
      noFlush: options.noFlush ?? false,
      forceShare,
    });
    const openBacking = options.openBacking ?? true;
    return openOnBackend(backend, options.format, {
      readOnly,
      openBacking: openBacking
        ? fileBackingOpener(options.ctx, [realPathOrSelf(path)], options.onOpen, forceShare)
        : undefined,
      ctx: options.ctx,
      warnRaw: !readOnly,
      qcow2: options.qcow2,
      onOpen: options.onOpen,
      forceShare,
    });
  });
}

/**
 * The image as a write target: an image opened read-only (or turned read-only, as a qcow2
 * image marked corrupt) is refused with qemu's "Block node is read-only", naming its file.
 */
export function writeTarget(image: WritableDiskImage): WritableDiskImage {
  if (image.readOnly) throw new CliError("Block node is read-only", { file: image.backend.name });
  return image;
}

/** Every image of the chain, top first. */
export function chainOf(image: DiskImage): DiskImage[] {
  const out: DiskImage[] = [];
  for (let cur: DiskImage | undefined = image; cur !== undefined; cur = cur.backing) out.push(cur);
  return out;
}

/** True when both paths name the same existing file (same device and inode). */
export function sameFile(a: string, b: string): boolean {
  try {
    const sa = statSync(a);
    const sb = statSync(b);
    return sa.dev === sb.dev && sa.ino === sb.ino;
  } catch {
    return false;
  }
}

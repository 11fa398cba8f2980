/**
 * Changing the backing file name and format recorded in a qcow2 image (QEMU's
 * qcow2_change_backing_file, used by `qemu-img rebase`, `amend -o backing_file=` and
 * `commit`-style chain edits). Only the header area changes: the backing file name after the
 * extensions, and the backing-format extension (written first, as QEMU orders extensions,
 * dropped when no format is given). The rewrite is crash-safe: after a power loss at any
 * moment the image names either the old or the new backing file (header-update.ts
 * rewriteHeaderArea). No guest data is touched; a safe rebase copies data first.
 */
import { InvalidArgumentError } from "@qimg/structs";
import { ExtensionType, encodeStringExtension } from "./spec/extensions.js";
import type { HeaderExtension } from "./spec/extensions.js";
import { checkWritable } from "./state.js";
import type { Qcow2State } from "./state.js";
import { rewriteHeaderArea } from "./header-update.js";
import { flushImage } from "./flush.js";

/** The backing file an image should name: a file name and its format, or none. */
export interface BackingFileChange {
  /** The new backing file name as stored in the header (relative names resolve against the image); undefined removes the backing file. */
  readonly filename: string | undefined;
  /** The backing format to record (backing-format extension); undefined records none. */
  readonly format?: string | undefined;
}

const enc = new TextEncoder();

/**
 * The header extensions with the backing format replaced: the backing-format extension comes
 * first when `format` is set (QEMU's order), every other extension is kept as it is.
 */
export function withBackingFormat(
  extensions: readonly { readonly type: number; readonly data: Uint8Array }[],
  format: string | undefined,
): { type: number; data: Uint8Array }[] {
  const rest = extensions
    .filter((e) => e.type !== ExtensionType.backingFormat)
    .map((e) => ({ type: e.type, data: e.data }));
  return format === undefined
    ? rest
    : [{ type: ExtensionType.backingFormat, data: encodeStringExtension(format) }, ...rest];
}

/**
 * Record a new backing file (or none) in an image opened read-write: everything written so
 * far is flushed first, then the header area is rewritten crash-safely. Refuses, writing
 * nothing, a name longer than 1023 bytes, a backing file for an image whose external data
 * file is raw (`data_file_raw`: the data file alone must stay the whole disk), and a header
 * area that does not fit cluster 0. The caller replaces `image.backing` with the opened new
 * backing image (or undefined) when reads should go through it.
 */
export async function changeBackingFile(s: Qcow2State, change: BackingFileChange): Promise<void> {
  const w = checkWritable(s);
  const name = change.filename;
  const format = name === undefined ? undefined : change.format;
  if (name !== undefined && s.dataFileRaw) {
    throw new InvalidArgumentError(
      `${s.backend.name}: an image with a raw external data file (data_file_raw) cannot have a backing file`,
    );
  }
  if (name !== undefined && enc.encode(name).byteLength > 1023) {
    throw new InvalidArgumentError(
      `${s.backend.name}: backing file name of ${enc.encode(name).byteLength} bytes is longer than 1023`,
    );
  }
  if (name !== undefined && name.includes("\0")) {
    throw new InvalidArgumentError(`${s.backend.name}: backing file name contains a NUL byte`);
  }
  await flushImage(s);
  const extensions: HeaderExtension[] = [];
  await w.meta.run(async () => {
    const exts = withBackingFormat(s.extensions, format);
    s.hdr = await rewriteHeaderArea(s.backend, {
      header: s.hdr,
      extensions: exts,
      backingFile: name,
    });
    // Where the extensions now are is not needed by the driver; keep their types and data.
    for (const e of exts) extensions.push({ type: e.type, offset: 0, data: e.data });
  });
  // The state records what the header names (readonly to every other module: only a header
  // rewrite changes them).
  const m = s as {
    -readonly [K in "backingFilename" | "backingFormat" | "extensions"]: Qcow2State[K];
  };
  m.backingFilename = name;
  m.backingFormat = format;
  m.extensions = extensions;
}

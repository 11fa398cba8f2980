import { FormatError } from "@qimg/structs";
import { encodeHeader } from "./header.js";
import type { Qcow2Header } from "./header.js";
import { encodeExtensions } from "./extensions.js";

const enc = new TextEncoder();

/**
 * Bytes the header area needs: the header (`start` bytes: 72 for version 2, header_length for
 * version 3), the extensions with their end marker, then the backing file name.
 */
export function headerAreaLength(
  start: number,
  extensions: readonly { type: number; data: Uint8Array }[],
  backingFile: string | undefined,
): number {
  let total = start + 8;
  for (const e of extensions) total += 8 + Math.ceil(e.data.byteLength / 8) * 8;
  return total + (backingFile === undefined ? 0 : enc.encode(backingFile).byteLength);
}

/**
 * Lay out the header area of cluster 0: the header, its extensions and the end marker, then
 * the backing file name. Returns the bytes and the header with `backingFileOffset` and
 * `backingFileSize` filled in. Fails when it does not fit the first cluster.
 */
export function encodeHeaderArea(
  header: Qcow2Header,
  extensions: readonly { type: number; data: Uint8Array }[],
  backingFile: string | undefined,
): { bytes: Uint8Array; header: Qcow2Header } {
  const clusterSize = 2 ** header.clusterBits;
  const exts = encodeExtensions(extensions);
  const start = header.version === 2 ? 72 : header.headerLength;
  const name = backingFile === undefined ? new Uint8Array(0) : enc.encode(backingFile);
  if (name.byteLength > 1023) {
    throw new FormatError(`backing file name of ${name.byteLength} bytes is longer than 1023`);
  }
  const nameOffset = start + exts.byteLength;
  const total = nameOffset + name.byteLength;
  if (total > clusterSize) {
    throw new FormatError(
      `header, extensions and backing file name need ${total} bytes, more than the ${clusterSize}-byte cluster`,
    );
  }
  const h: Qcow2Header = {
    ...header,
    backingFileOffset: name.byteLength ? nameOffset : 0,
    backingFileSize: name.byteLength,
  };
  const bytes = new Uint8Array(total);
  encodeHeader(h, bytes);
  bytes.set(exts, start);
  bytes.set(name, nameOffset);
  return { bytes, header: h };
}

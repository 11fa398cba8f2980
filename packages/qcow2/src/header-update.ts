/**
 * Header updates, in QEMU's granularity: a field that changes on its own (the dirty and corrupt
 * bits, a refcount table switch, the L1 table, the size, the autoclear bits) is written alone —
 * one write of its bytes, then the flush the caller asks for. The whole header area (header,
 * extensions, backing file name) is rewritten only when extensions or the backing file name
 * change, and then in an order that leaves either the old or the new area in effect whatever
 * write a crash tears or loses (see {@link rewriteHeaderArea}).
 *
 * Both the driver and `@qimg/check` write headers through this module.
 */
import type { BlockBackend } from "@qimg/io";
import { InvalidArgumentError, hex } from "@qimg/structs";
import {
  HEADER_V2_SIZE,
  HEADER_V3_SIZE,
  UPDATABLE_HEADER_FIELDS,
  decodeHeader,
  encodeHeader,
  headerFieldSpan,
} from "./spec/header.js";
import type { Qcow2Header, UpdatableHeaderField } from "./spec/header.js";
import { ExtensionPrefix, encodeExtensions } from "./spec/extensions.js";
import { encodeHeaderArea } from "./spec/header-area.js";

/** New values for header fields that are written alone (see {@link UpdatableHeaderField}). */
export type HeaderFieldChanges = Partial<Pick<Qcow2Header, UpdatableHeaderField>>;

/** Options of {@link writeHeaderFields}. */
export interface HeaderWriteOptions {
  /** Sync the file after the write (default true: QEMU syncs every header update). */
  readonly flush?: boolean;
}

/** What {@link planHeaderFieldWrite} decided: the bytes to write where, and the new header. */
export interface HeaderFieldWrite {
  /** File offset of the write (0 and an empty `bytes` when nothing changes). */
  readonly offset: number;
  /** The bytes to write: the changed fields and any unchanged ones between them. */
  readonly bytes: Uint8Array;
  /** The header with the changes applied. */
  readonly header: Qcow2Header;
}

const U32_FIELDS: ReadonlySet<UpdatableHeaderField> = new Set([
  "l1Size",
  "refcountTableClusters",
  "nbSnapshots",
  "refcountOrder",
]);
const BITS_FIELDS: ReadonlySet<UpdatableHeaderField> = new Set([
  "incompatibleFeatures",
  "compatibleFeatures",
  "autoclearFeatures",
]);

function show(value: unknown): string {
  return typeof value === "number" || typeof value === "bigint" ? String(value) : typeof value;
}

/**
 * Plan a field-level header write without doing it: the smallest contiguous run of header
 * bytes holding every changed field, encoded from `header` with `changes` applied. Throws an
 * InvalidArgumentError for a field that is not written alone, a value out of its field's
 * range, or a version 3 field on a version 2 image.
 */
export function planHeaderFieldWrite(
  header: Qcow2Header,
  changes: HeaderFieldChanges,
): HeaderFieldWrite {
  const fields: UpdatableHeaderField[] = [];
  for (const [key, value] of Object.entries(changes) as [string, unknown][]) {
    if (value === undefined) continue;
    if (!Object.hasOwn(UPDATABLE_HEADER_FIELDS, key)) {
      throw new InvalidArgumentError(
        `qcow2 header field ${key} is not written alone (rewrite the header area instead)`,
      );
    }
    const field = key as UpdatableHeaderField;
    if (field === "refcountOrder" && header.version === 2) {
      throw new InvalidArgumentError(`a version 2 qcow2 header has no ${field} field`);
    }
    if (BITS_FIELDS.has(field)) {
      if (header.version === 2) {
        throw new InvalidArgumentError(`a version 2 qcow2 header has no ${field} field`);
      }
      if (typeof value !== "bigint" || value < 0n || value >= 1n << 64n) {
        throw new InvalidArgumentError(`qcow2 header ${field} ${show(value)} is not a u64`);
      }
    } else {
      const max = U32_FIELDS.has(field) ? 0xffff_ffff : Number.MAX_SAFE_INTEGER;
      if (typeof value !== "number" || !Number.isSafeInteger(value) || value < 0 || value > max) {
        throw new InvalidArgumentError(
          `qcow2 header ${field} ${show(value)} is not an integer in 0..${max}`,
        );
      }
    }
    fields.push(field);
  }
  const next: Qcow2Header = { ...header, ...changes };
  if (fields.length === 0) return { offset: 0, bytes: new Uint8Array(0), header: next };
  const span = headerFieldSpan(fields);
  const full = new Uint8Array(header.version === 2 ? HEADER_V2_SIZE : HEADER_V3_SIZE);
  // Only the fixed fields are encoded: the span never reaches past byte 96.
  encodeHeader({ ...next, headerLength: full.byteLength, extraBytes: new Uint8Array(0) }, full);
  return {
    offset: span.offset,
    bytes: full.slice(span.offset, span.offset + span.length),
    header: next,
  };
}

/**
 * Write only the changed header fields — one write of their contiguous bytes (8 for the dirty
 * bit, 12 for a refcount table switch), then a sync unless `options.flush` is false — and
 * return the new header. Nothing is written when `changes` is empty.
 */
export async function writeHeaderFields(
  backend: BlockBackend,
  header: Qcow2Header,
  changes: HeaderFieldChanges,
  options: HeaderWriteOptions = {},
): Promise<Qcow2Header> {
  const plan = planHeaderFieldWrite(header, changes);
  if (plan.bytes.byteLength === 0) return plan.header;
  await backend.write(plan.offset, plan.bytes);
  if (options.flush ?? true) await backend.flush();
  return plan.header;
}

/** A whole header area: the header, its extensions in order, and the backing file name. */
export interface HeaderArea {
  /** The header; `backingFileOffset` and `backingFileSize` are recomputed from `backingFile`. */
  readonly header: Qcow2Header;
  /** Header extensions in the order they are written (unknown ones included). */
  readonly extensions: readonly { readonly type: number; readonly data: Uint8Array }[];
  /** The backing file name, or undefined for none. */
  readonly backingFile: string | undefined;
}

/**
 * Type of the filler extension a staged {@link rewriteHeaderArea} puts in the header for a
 * moment, to step over the old area while the new one is written past it. Like any unknown
 * extension, readers ignore it; a crash at the wrong moment may leave it behind, and the next
 * area rewrite drops it.
 */
export const HEADER_FILLER_EXTENSION = 0x71696d67; // "qimg"

/** Writes at most this size, aligned to it, are taken as atomic (one disk sector). */
const SECTOR = 512;

/** Round up to a multiple of 8 (extensions are 8-byte aligned). */
function align8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/**
 * Where the area currently on disk ends: the end of its header, extension list (end marker
 * included) and backing file name. Everything before it is taken as live.
 */
function liveEnd(cur: Uint8Array, h: Qcow2Header, clusterSize: number): number {
  const start = h.version === 2 ? HEADER_V2_SIZE : h.headerLength;
  const limit = Math.min(
    cur.byteLength,
    h.backingFileOffset > start ? Math.min(h.backingFileOffset, clusterSize) : clusterSize,
  );
  let pos = start;
  while (pos + 8 <= limit) {
    const { type, length } = ExtensionPrefix.decode(cur, pos, pos);
    pos += 8;
    if (type === 0) break;
    pos += align8(length);
  }
  let end = Math.min(Math.max(pos, start), limit);
  if (h.backingFileOffset !== 0) {
    end = Math.max(end, Math.min(clusterSize, h.backingFileOffset + h.backingFileSize));
  }
  return end;
}

/**
 * Rewrite the header area (header, extensions, backing file name) so that afterwards it is
 * exactly what `encodeHeaderArea` lays out for `next` (with zeros after it, as QEMU leaves the
 * rest of cluster 0), writing only the bytes that differ from what is on disk, and return the
 * header as written. Filler extensions ({@link HEADER_FILLER_EXTENSION}) in `next` are dropped.
 * Always syncs.
 *
 * Crash safety: a write that fits in one 512-byte sector is taken as atomic; writes between
 * two syncs may reach the disk in any part. The order is chosen so that a crash at any point
 * leaves either the old or the new area in effect:
 * - all changed bytes in one sector: one write;
 * - changes past the first sector only where the old area is not (it ends before them): those
 *   first, a sync, then the first sector (which holds the header) in one write;
 * - otherwise the new extensions and name are first written past both the old and the new
 *   area, and a sync; then one first-sector write switches to them (the new header, followed by a
 *   filler extension that steps over the old bytes); a sync; then the new area is written in
 *   place past the first sector, a sync, and the first sector again. A crash between the two
 *   switches leaves the new area plus the filler, which readers ignore. When cluster 0 has no
 *   room for the staging copy, nothing is written and an InvalidArgumentError says so.
 */
export async function rewriteHeaderArea(
  backend: BlockBackend,
  next: HeaderArea,
): Promise<Qcow2Header> {
  const exts = next.extensions.filter((e) => e.type !== HEADER_FILLER_EXTENSION);
  const area = encodeHeaderArea(next.header, exts, next.backingFile);
  const n = area.bytes;
  const clusterSize = 2 ** area.header.clusterBits;
  const fileSize = await backend.size();
  const cur = new Uint8Array(Math.max(n.byteLength, Math.min(clusterSize, fileSize)));
  const readable = Math.min(cur.byteLength, fileSize);
  if (readable > 0) await backend.read(0, cur.subarray(0, readable));
  const old = decodeHeader(cur);
  if (old.clusterBits !== area.header.clusterBits) {
    throw new InvalidArgumentError(
      `the header area rewrite changes cluster_bits from ${old.clusterBits} to ${area.header.clusterBits}`,
    );
  }
  const oldEnd = liveEnd(cur, old, clusterSize);
  let first = -1;
  let last = -1;
  let tailFirst = -1;
  for (let i = 0; i < n.byteLength; i++) {
    if (n[i] === cur[i]) continue;
    if (first < 0) first = i;
    if (tailFirst < 0 && i >= SECTOR) tailFirst = i;
    last = i;
  }
  // Bytes of the old area past the new one, zeroed at the end.
  let staleEnd = oldEnd;
  const writeN = (from: number, to: number): Promise<void> =>
    backend.write(from, n.slice(from, to));
  if (first < 0) {
    // Same area: nothing to switch.
  } else if (Math.floor(first / SECTOR) === Math.floor(last / SECTOR)) {
    await writeN(first, last + 1);
    await backend.flush();
  } else if (tailFirst >= oldEnd) {
    await writeN(tailFirst, last + 1);
    await backend.flush();
    if (first < SECTOR) {
      let headLast = SECTOR - 1;
      while (n[headLast] === cur[headLast]) headLast--;
      await writeN(first, headLast + 1);
      await backend.flush();
    }
  } else {
    const start = area.header.version === 2 ? HEADER_V2_SIZE : area.header.headerLength;
    const chain = encodeExtensions(exts);
    const name = n.subarray(start + chain.byteLength);
    const at = align8(Math.max(oldEnd, n.byteLength));
    const stagedEnd = at + chain.byteLength + name.byteLength;
    if (start + 8 > SECTOR || stagedEnd > clusterSize) {
      throw new InvalidArgumentError(
        `cannot rewrite the qcow2 header area crash-safely: its ${n.byteLength} bytes and a staging copy do not fit the ${clusterSize}-byte cluster 0 (the old area ends at ${hex(oldEnd)})`,
      );
    }
    // 1. The new extensions and name, past everything that is live now.
    const staged = new Uint8Array(stagedEnd - at);
    staged.set(chain, 0);
    staged.set(name, chain.byteLength);
    await backend.write(at, staged);
    await backend.flush();
    // 2. Switch: the new header, then a filler extension that steps over to the staged copy.
    const switchBytes = new Uint8Array(start + 8);
    encodeHeader(
      {
        ...area.header,
        backingFileOffset: name.byteLength > 0 ? at + chain.byteLength : 0,
      },
      switchBytes,
    );
    ExtensionPrefix.encode(
      { type: HEADER_FILLER_EXTENSION, length: at - (start + 8) },
      switchBytes,
      start,
    );
    await backend.write(0, switchBytes);
    await backend.flush();
    // 3. The new area in place (past the first sector: dead bytes under the filler now) ...
    await writeN(SECTOR, n.byteLength);
    await backend.flush();
    // 4. ... and switch to it with one first-sector write.
    await writeN(0, SECTOR);
    await backend.flush();
    staleEnd = stagedEnd;
  }
  // Zero what is left of the old (or staged) area past the new one; dead bytes, no order needed.
  if (staleEnd > n.byteLength) {
    let dirty = staleEnd > oldEnd;
    for (let i = n.byteLength; i < staleEnd && !dirty; i++) dirty = cur[i] !== 0;
    if (dirty) {
      await backend.write(n.byteLength, new Uint8Array(staleEnd - n.byteLength));
      await backend.flush();
    }
  }
  return area.header;
}

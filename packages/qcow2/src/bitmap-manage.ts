/**
 * Managing and reading persistent dirty bitmaps (QEMU's block-dirty-bitmap-* commands over
 * block/qcow2-bitmap.c, as `qemu-img bitmap` drives them): add, remove, clear, enable,
 * disable and merge on a read-write open — in memory, stored at the clean close like every
 * bitmap (bitmap.ts) — and the list and dirty ranges of a bitmap on any open.
 *
 * Errors carry QEMU's wording (what follows "Operation add on bitmap X failed: " in
 * qemu-img's message), so the CLI prints what qemu-img prints.
 */
import { InvalidArgumentError, UnsupportedFeatureError } from "@qimg/structs";
import { AutoclearFeatures } from "./spec/header.js";
import { BitmapsExtension, ExtensionType } from "./spec/extensions.js";
import type { HeaderExtension } from "./spec/extensions.js";
import { BitmapFlag } from "./spec/bitmap-directory.js";
import type { BitmapEntry } from "./spec/bitmap-directory.js";
import {
  BITMAP_MAX_DATA_BYTES,
  BITMAP_MAX_GRANULARITY_BITS,
  BITMAP_MAX_TABLE_SIZE,
  BITMAP_MIN_GRANULARITY_BITS,
  bitmapDataBytes,
  bitmapTableSize,
} from "./spec/bitmap-table.js";
import { PersistentBitmaps, StoredBitmapReader } from "./bitmap.js";
import type { BitmapDirectoryLocation, BitmapHost } from "./bitmap.js";
import { rewriteHeaderArea } from "./header-update.js";
import { bitmapStoreHost } from "./open-write.js";
import { checkOpen, checkWritable } from "./state.js";
import type { Qcow2State } from "./state.js";

/** Most bitmaps a qcow2 image may hold (QEMU's QCOW2_MAX_BITMAPS). */
export const MAX_BITMAPS = 65535;
/** Largest bitmap directory QEMU writes, in bytes. */
export const MAX_BITMAP_DIRECTORY_BYTES = 64 * 1024 * 1024;
/** Longest bitmap name, in bytes. */
export const MAX_BITMAP_NAME_BYTES = 1023;

/** One persistent bitmap, as {@link Qcow2Image.listBitmaps} shows it. */
export interface Qcow2BitmapInfo {
  /** Its name. */
  readonly name: string;
  /** Bytes of guest data one bit covers. */
  readonly granularity: number;
  /** log2 of `granularity`. */
  readonly granularityBits: number;
  /**
   * In use on disk when the image was opened (IN_USE): inconsistent, its bits mean nothing;
   * it can only be removed. (A read-write open marks every bitmap in use on disk until the
   * close; that does not count here.)
   */
  readonly inUse: boolean;
  /** AUTO: guest writes set its bits. */
  readonly enabled: boolean;
  /** The flags as `qemu-img info` names them ("in-use", "auto"). */
  readonly flags: readonly ("in-use" | "auto")[];
}

/** A dirty guest range: every byte of it is covered by a set bit. */
export interface DirtyRange {
  /** Guest offset in bytes. */
  readonly offset: number;
  /** Length in bytes. */
  readonly length: number;
}

/** Options of {@link Qcow2Image.addBitmap}. */
export interface AddBitmapOptions {
  /**
   * Bytes per bit: a power of two from 512 to 2 GiB. Default as QEMU: the cluster size,
   * kept within 4 KiB..64 KiB.
   */
  readonly granularity?: number;
  /** Add it disabled (writes do not set its bits). */
  readonly disabled?: boolean;
  /** How messages name the image (QEMU names its block node, e.g. '#block123'); default the file name. */
  readonly nodeName?: string;
}

const enc = new TextEncoder();

/** QEMU's default granularity for a new bitmap on an image with this cluster size. */
export function defaultBitmapGranularity(clusterSize: number): number {
  return Math.min(65536, Math.max(4096, clusterSize));
}

function notFound(name: string): InvalidArgumentError {
  return new InvalidArgumentError(`Dirty bitmap '${name}' not found`);
}

function inconsistent(name: string): InvalidArgumentError {
  return new InvalidArgumentError(
    `Bitmap '${name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk`,
  );
}

type Mutable<T> = { -readonly [K in keyof T]: T[K] };

/**
 * The callbacks the bitmap store needs, including the directory switch: the bitmaps extension
 * is rewritten with the header area (header-update.ts, crash-safe) and the state follows it.
 */
function bitmapHost(s: Qcow2State): BitmapHost {
  const bit = AutoclearFeatures.maskOf("bitmaps");
  return {
    ...bitmapStoreHost(s),
    switchDirectory: async (dir: BitmapDirectoryLocation | undefined) => {
      const exts: HeaderExtension[] = [];
      let placed = false;
      const ext = (): HeaderExtension | undefined =>
        dir && {
          type: ExtensionType.bitmaps,
          offset: 0,
          data: BitmapsExtension.encode({
            nbBitmaps: dir.count,
            reserved: 0,
            directorySize: dir.length,
            directoryOffset: dir.offset,
          }),
        };
      for (const e of s.extensions) {
        if (e.type !== ExtensionType.bitmaps) exts.push(e);
        else if (!placed) {
          placed = true;
          const n = ext();
          if (n) exts.push(n);
        }
      }
      if (!placed) {
        const n = ext();
        if (n) exts.push(n);
      }
      const header = {
        ...s.hdr,
        autoclearFeatures: dir ? s.hdr.autoclearFeatures | bit : s.hdr.autoclearFeatures & ~bit,
      };
      s.hdr = await rewriteHeaderArea(s.backend, {
        header,
        extensions: exts,
        backingFile: s.backingFilename,
      });
      const m = s as Mutable<Qcow2State>;
      m.extensions = exts;
      m.bitmapDirectory = dir && { offset: dir.offset, length: dir.length };
    },
  };
}

/** The bitmap set of a read-write open, created (empty) when the image has none yet. */
function manager(s: Qcow2State): PersistentBitmaps {
  checkWritable(s);
  const host = bitmapHost(s);
  if (!s.pbm) s.pbm = PersistentBitmaps.empty(host, s.size);
  else s.pbm.useHost(host);
  return s.pbm;
}

/** Every persistent bitmap: on a read-write open as this open has changed them. */
export function listBitmaps(s: Qcow2State): Qcow2BitmapInfo[] {
  checkOpen(s);
  const show = (inUse: boolean, enabled: boolean): ("in-use" | "auto")[] => [
    ...(inUse ? (["in-use"] as const) : []),
    ...(enabled ? (["auto"] as const) : []),
  ];
  if (s.pbm) {
    return s.pbm.list().map((t) => {
      const enabled = t.consistent ? t.enabled : (t.flags & BitmapFlag.auto) !== 0;
      return {
        name: t.name,
        granularity: t.granularity,
        granularityBits: t.granularityBits,
        inUse: !t.consistent,
        enabled,
        flags: show(!t.consistent, enabled),
      };
    });
  }
  return s.bitmaps.map((b) => {
    const inUse = (b.flags & BitmapFlag.inUse) !== 0;
    const enabled = (b.flags & BitmapFlag.auto) !== 0;
    return {
      name: b.name,
      granularity: 2 ** b.granularityBits,
      granularityBits: b.granularityBits,
      inUse,
      enabled,
      flags: show(inUse, enabled),
    };
  });
}

function findInfo(s: Qcow2State, name: string): Qcow2BitmapInfo {
  const b = listBitmaps(s).find((x) => x.name === name);
  if (!b) throw notFound(name);
  return b;
}

const storedReaders = new WeakMap<Qcow2State, Map<string, StoredBitmapReader>>();

/** Reads bitmap data cluster `c` of a bitmap into a cluster-sized buffer. */
type ChunkReader = (c: number, out: Uint8Array) => Promise<void>;

function chunkReader(s: Qcow2State, name: string): { info: Qcow2BitmapInfo; read: ChunkReader } {
  const info = findInfo(s, name);
  if (info.inUse) throw inconsistent(name);
  const pbm = s.pbm;
  if (pbm) return { info, read: (c, out) => pbm.chunk(name, c, out) };
  // A read-only open never changes its bitmaps: one reader per bitmap (its table read once).
  let readers = storedReaders.get(s);
  if (!readers) storedReaders.set(s, (readers = new Map<string, StoredBitmapReader>()));
  let reader = readers.get(name);
  if (!reader) {
    const entry = s.bitmaps.find((b) => b.name === name) as BitmapEntry;
    reader = new StoredBitmapReader(s.backend, entry, s.clusterSize);
    readers.set(name, reader);
  }
  const r = reader;
  return { info, read: (c, out) => r.chunk(c, out) };
}

/**
 * The dirty ranges of bitmap `name` that overlap guest bytes [offset, +length), clipped to
 * that window, merged and in order. On a read-write open these are the live bits: the stored
 * ones and those set by this open's writes and merges.
 */
export async function bitmapDirtyRanges(
  s: Qcow2State,
  name: string,
  offset = 0,
  length?: number,
): Promise<DirtyRange[]> {
  return dirtyRanges(s, name, offset, length, false);
}

/**
 * Whether guest bytes from `offset` on are dirty in bitmap `name`, and for how many bytes
 * (at most `length`, clipped to the disk) that stays so: one extent, as NBD block status
 * (`qemu:dirty-bitmap:NAME`) reports it.
 */
export async function bitmapStatus(
  s: Qcow2State,
  name: string,
  offset: number,
  length: number,
): Promise<{ length: number; dirty: boolean }> {
  const end = Math.min(s.size, offset + length);
  const first = (await dirtyRanges(s, name, offset, length, true))[0];
  if (first?.offset === offset) return { length: first.length, dirty: true };
  return { length: Math.max(0, (first?.offset ?? end) - offset), dirty: false };
}

async function dirtyRanges(
  s: Qcow2State,
  name: string,
  offset: number,
  length: number | undefined,
  firstOnly: boolean,
): Promise<DirtyRange[]> {
  const size = s.size;
  const len = length ?? Math.max(0, size - offset);
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(len) || offset < 0 || len < 0) {
    throw new InvalidArgumentError(`invalid range ${offset}+${len}`);
  }
  const { info, read } = chunkReader(s, name);
  const end = Math.min(size, offset + len);
  const out: { offset: number; length: number }[] = [];
  if (offset >= end) return out;
  const g = info.granularity;
  const cs = s.clusterSize;
  const bitsPerChunk = cs * 8;
  const first = Math.floor(offset / g);
  const last = Math.floor((end - 1) / g);
  const buf = new Uint8Array(cs);
  let loaded = -1;
  let runStart = -1;
  const close = (bitEnd: number): void => {
    if (runStart < 0) return;
    const from = Math.max(offset, runStart * g);
    const to = Math.min(end, bitEnd * g);
    const prev = out[out.length - 1];
    if (prev && prev.offset + prev.length === from) prev.length += to - from;
    else out.push({ offset: from, length: to - from });
    runStart = -1;
  };
  let n = first;
  while (n <= last) {
    if (firstOnly && out.length > 0) return out;
    const c = Math.floor(n / bitsPerChunk);
    if (c !== loaded) {
      await read(c, buf);
      loaded = c;
    }
    const within = n - c * bitsPerChunk;
    const byte = buf[within >> 3]!;
    // Whole bytes at once where possible.
    if ((within & 7) === 0 && n + 7 <= last && (byte === 0 || byte === 0xff)) {
      if (byte === 0) close(n);
      else if (runStart < 0) runStart = n;
      n += 8;
      continue;
    }
    if ((byte >> (within & 7)) & 1) {
      if (runStart < 0) runStart = n;
    } else close(n);
    n++;
  }
  close(last + 1);
  return out;
}

/** Check what QEMU checks before it adds a persistent bitmap; returns log2 of the granularity. */
function checkAdd(s: Qcow2State, name: string, options: AddBitmapOptions): number {
  checkWritable(s);
  if (name.length === 0) throw new InvalidArgumentError("Bitmap name cannot be empty");
  const g = options.granularity ?? defaultBitmapGranularity(s.clusterSize);
  if (!(Number.isSafeInteger(g) && g >= 512 && 2 ** Math.round(Math.log2(g)) === g)) {
    throw new InvalidArgumentError("Granularity must be power of 2 and at least 512");
  }
  const bits = Math.log2(g);
  if (listBitmaps(s).some((b) => b.name === name)) {
    throw new InvalidArgumentError(`Bitmap already exists: ${name}`);
  }
  const node = options.nodeName ?? s.backend.name;
  const refuse = (why: string): never => {
    throw new InvalidArgumentError(`Can't make bitmap '${name}' persistent in '${node}': ${why}`);
  };
  if (s.hdr.version < 3) refuse("Cannot store dirty bitmaps in qcow2 v2 files");
  const nameBytes = enc.encode(name).byteLength;
  if (nameBytes > MAX_BITMAP_NAME_BYTES) {
    refuse(`Name length exceeds maximum (${MAX_BITMAP_NAME_BYTES} characters)`);
  }
  if (bits > BITMAP_MAX_GRANULARITY_BITS) {
    refuse(`Granularity exceeds maximum (${2 ** BITMAP_MAX_GRANULARITY_BITS} bytes)`);
  }
  if (bits < BITMAP_MIN_GRANULARITY_BITS) {
    refuse(`Granularity is under minimum (${2 ** BITMAP_MIN_GRANULARITY_BITS} bytes)`);
  }
  const tableSize = bitmapTableSize(s.size, bits, s.clusterSize);
  if (
    tableSize > BITMAP_MAX_TABLE_SIZE ||
    tableSize * s.clusterSize > BITMAP_MAX_DATA_BYTES ||
    bitmapDataBytes(s.size, bits) > BITMAP_MAX_DATA_BYTES
  ) {
    refuse("Too much space will be occupied by the bitmap. Use larger granularity");
  }
  const all = listBitmaps(s);
  if (all.length + 1 > MAX_BITMAPS)
    refuse("Maximum number of persistent bitmaps is already reached");
  const entryBytes = (n: number): number => Math.ceil((24 + n) / 8) * 8;
  const dirBytes =
    all.reduce((sum, b) => sum + entryBytes(enc.encode(b.name).byteLength), 0) +
    entryBytes(nameBytes);
  if (dirBytes > MAX_BITMAP_DIRECTORY_BYTES) refuse("Not enough space in the bitmap directory");
  return bits;
}

/** Add an empty persistent bitmap (stored at the clean close). */
export function addBitmap(s: Qcow2State, name: string, options: AddBitmapOptions = {}): void {
  const bits = checkAdd(s, name, options);
  manager(s).add(name, bits, !(options.disabled ?? false));
}

/** Remove a bitmap, inconsistent or not (its clusters are freed at the clean close). */
export function removeBitmap(s: Qcow2State, name: string): void {
  checkWritable(s);
  findInfo(s, name);
  manager(s).remove(name);
}

function consistentTarget(s: Qcow2State, name: string): PersistentBitmaps {
  checkWritable(s);
  const b = findInfo(s, name);
  if (b.inUse) throw inconsistent(name);
  return manager(s);
}

/** Clear every bit of a bitmap. */
export function clearBitmap(s: Qcow2State, name: string): void {
  consistentTarget(s, name).clear(name);
}

/** Make guest writes set the bitmap's bits (AUTO). */
export function enableBitmap(s: Qcow2State, name: string): void {
  consistentTarget(s, name).setEnabled(name, true);
}

/** Stop guest writes from setting the bitmap's bits. */
export function disableBitmap(s: Qcow2State, name: string): void {
  consistentTarget(s, name).setEnabled(name, false);
}

/**
 * Set in bitmap `target` every bit that covers a dirty range of bitmap `source` of `from`
 * (this image when undefined); the granularities may differ, the disk sizes may not.
 */
export async function mergeBitmap(
  s: Qcow2State,
  target: string,
  source: string,
  from: Qcow2State = s,
): Promise<void> {
  const pbm = consistentTarget(s, target);
  checkOpen(from);
  const src = findInfo(from, source);
  if (src.inUse) throw inconsistent(source);
  if (from.size !== s.size) {
    throw new InvalidArgumentError(
      `Bitmaps are of different sizes (destination size is ${s.size}, source size is ${from.size}) and can't be merged`,
    );
  }
  const ranges = await bitmapDirtyRanges(from, source);
  for (const r of ranges) pbm.setRange(target, r.offset, r.length);
}

/** Options of {@link copyBitmapsBetween}. */
export interface CopyBitmapsOptions {
  /** Skip inconsistent source bitmaps instead of refusing (qemu-img convert --skip-broken-bitmaps). */
  readonly skipBroken?: boolean;
  /**
   * Told of each inconsistent bitmap `skipBroken` leaves out, in the order qemu-img warns
   * ("warning: Skipping inconsistent bitmap 'NAME'"): last directory entry first.
   */
  readonly onSkip?: (name: string) => void;
}

/**
 * Copy every persistent bitmap of `from` (name, granularity, enabled flag, dirty bits) into
 * the read-write open `to`. Everything is checked before anything is added: an inconsistent
 * source bitmap is refused with qemu-img convert's message (unless `skipBroken`).
 */
export async function copyBitmapsBetween(
  from: Qcow2State,
  to: Qcow2State,
  options: CopyBitmapsOptions = {},
): Promise<void> {
  checkOpen(from);
  checkWritable(to);
  // QEMU walks the source's bitmaps last first (its list of them is built by prepending),
  // so that is the order of its refusal and warnings; the target keeps the source's order.
  const list = listBitmaps(from).reverse();
  const copy: Qcow2BitmapInfo[] = [];
  for (const b of list) {
    if (b.inUse) {
      if (options.skipBroken) {
        options.onSkip?.(b.name);
        continue;
      }
      throw new InvalidArgumentError(
        `Cannot copy inconsistent bitmap '${b.name}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it`,
      );
    }
    copy.unshift(b);
  }
  if (from.size !== to.size) {
    throw new InvalidArgumentError(
      `Bitmaps are of different sizes (destination size is ${to.size}, source size is ${from.size}) and can't be merged`,
    );
  }
  if (to.hdr.version < 3 && copy.length > 0) {
    throw new UnsupportedFeatureError(
      `Can't make bitmap '${copy[0]!.name}' persistent in '${to.backend.name}': Cannot store dirty bitmaps in qcow2 v2 files`,
      ["persistent dirty bitmaps on a version 2 image"],
    );
  }
  for (const b of copy) checkAdd(to, b.name, { granularity: b.granularity });
  for (const b of copy) {
    addBitmap(to, b.name, { granularity: b.granularity, disabled: !b.enabled });
    await mergeBitmap(to, b.name, b.name, from);
  }
}

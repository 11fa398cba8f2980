import { FormatError, defineStruct, hex } from "@qimg/structs";

/** Fixed part of a bitmap directory entry: 24 bytes, then extra data, name, padding to 8. */
export const BITMAP_DIR_FIELDS = {
  bitmapTableOffset: {
    offset: 0,
    type: "u64",
    unit: "bytes",
    doc: "u64: offset of the bitmap table",
  },
  bitmapTableSize: {
    offset: 8,
    type: "u32",
    unit: "entries",
    doc: "u32: entries in the bitmap table",
  },
  flags: {
    offset: 12,
    type: "bits32",
    doc: "bits32: bit 0 in-use, bit 1 auto, bit 2 extra data compatible",
  },
  type: { offset: 16, type: "u8", doc: "u8: 1 = dirty tracking bitmap" },
  granularityBits: {
    offset: 17,
    type: "u8",
    unit: "bits",
    doc: "u8: log2 of bytes per bit, 9..31",
  },
  nameSize: { offset: 18, type: "u16", unit: "bytes", doc: "u16: length of the name, 1..1023" },
  extraDataSize: { offset: 20, type: "u32", unit: "bytes", doc: "u32: size of the extra data" },
} as const;
export const BITMAP_DIR_FIXED_SIZE = 24;
/** The fixed 24-byte part of a bitmap directory entry (extra data and name follow it). */
export const BitmapDirEntry = defineStruct(
  "qcow2 bitmap directory entry",
  "big",
  BITMAP_DIR_FIXED_SIZE,
  BITMAP_DIR_FIELDS,
);

/** Bitmap directory entry flags. */
export const BitmapFlag = { inUse: 1, auto: 2, extraDataCompatible: 4 } as const;

/** One bitmap directory entry, decoded. */
export interface BitmapEntry {
  /** The bitmap's name. */
  readonly name: string;
  /** log2 of the bytes of guest data one bit covers. */
  readonly granularityBits: number;
  /** {@link BitmapFlag} bits. */
  readonly flags: number;
  /** Bitmap type (1: dirty tracking bitmap). */
  readonly type: number;
  /** File offset of the bitmap table. */
  readonly bitmapTableOffset: number;
  /** Entries of the bitmap table. */
  readonly bitmapTableSize: number;
}

const dec = new TextDecoder();

/** Where one directory entry sits inside the directory bytes, and its size (padded to 8). */
export interface BitmapDirSlot {
  readonly position: number;
  readonly size: number;
  readonly extraDataSize: number;
}

interface Slot extends BitmapDirSlot {
  readonly entry: ReturnType<typeof BitmapDirEntry.decode>;
  readonly nameStart: number;
}

/**
 * The one walk over the directory: each entry's fixed part must fit, its name must be 1..1023
 * bytes and end inside the directory, and with `padded` its padding must fit too.
 */
function walkDirectory(
  bytes: Uint8Array,
  count: number,
  dirOffset: number,
  padded: boolean,
): Slot[] {
  const out: Slot[] = [];
  let pos = 0;
  for (let i = 0; i < count; i++) {
    const at = dirOffset + pos;
    if (pos + BITMAP_DIR_FIXED_SIZE > bytes.byteLength) {
      throw new FormatError(
        `qcow2 bitmap directory entry ${i} at ${hex(at)} runs past the directory`,
        { offset: at },
      );
    }
    const entry = BitmapDirEntry.decode(bytes, pos, at);
    const nameStart = pos + BITMAP_DIR_FIXED_SIZE + entry.extraDataSize;
    const end = nameStart + entry.nameSize;
    if (entry.nameSize === 0 || entry.nameSize > 1023 || end > bytes.byteLength) {
      throw new FormatError(
        `qcow2 bitmap directory entry ${i} at ${hex(at)}: name of ${entry.nameSize} bytes is invalid`,
        { offset: at + 18 },
      );
    }
    const size = Math.ceil(end / 8) * 8 - pos;
    if (padded && pos + size > bytes.byteLength) {
      throw new FormatError(
        `qcow2 bitmap directory entry ${i} at ${hex(at)} runs past the directory`,
        { offset: at },
      );
    }
    out.push({ position: pos, size, extraDataSize: entry.extraDataSize, entry, nameStart });
    pos += size;
  }
  return out;
}

/**
 * The slots of `count` entries in the directory bytes, in order. Throws a FormatError like
 * {@link decodeBitmapDirectory}, and also when an entry's padding runs past the directory.
 */
export function bitmapDirectorySlots(
  bytes: Uint8Array,
  count: number,
  dirOffset: number,
): BitmapDirSlot[] {
  return walkDirectory(bytes, count, dirOffset, true).map(({ position, size, extraDataSize }) => ({
    position,
    size,
    extraDataSize,
  }));
}

/** Decode `count` bitmap directory entries from the directory bytes. */
export function decodeBitmapDirectory(
  bytes: Uint8Array,
  count: number,
  dirOffset: number,
): BitmapEntry[] {
  // The last entry's padding may run past the directory bytes (decoding never needed it).
  return walkDirectory(bytes, count, dirOffset, false).map(({ entry: e, nameStart }) => ({
    name: dec.decode(bytes.subarray(nameStart, nameStart + e.nameSize)),
    granularityBits: e.granularityBits,
    flags: Number(e.flags),
    type: e.type,
    bitmapTableOffset: e.bitmapTableOffset,
    bitmapTableSize: e.bitmapTableSize,
  }));
}

/**
 * Rewrite the table offset, table size and flags of the entry at `position` in the
 * directory bytes, leaving every other byte (name, extra data, padding) as it was.
 */
export function patchBitmapDirEntry(
  bytes: Uint8Array,
  position: number,
  change: { bitmapTableOffset: number; bitmapTableSize: number; flags: number },
): void {
  const e = BitmapDirEntry.decode(bytes, position);
  BitmapDirEntry.encode(
    {
      ...e,
      bitmapTableOffset: change.bitmapTableOffset,
      bitmapTableSize: change.bitmapTableSize,
      flags: BigInt(change.flags >>> 0),
    },
    bytes,
    position,
  );
}

const enc = new TextEncoder();

/**
 * Encode a whole bitmap directory: each entry's fixed part, no extra data, its name, and zero
 * padding to a multiple of 8 bytes. Throws a FormatError for a name of 0 or over 1023 bytes.
 */
export function encodeBitmapDirectory(entries: readonly BitmapEntry[]): Uint8Array {
  const names = entries.map((e) => enc.encode(e.name));
  const size = names.reduce(
    (n, b) => n + Math.ceil((BITMAP_DIR_FIXED_SIZE + b.byteLength) / 8) * 8,
    0,
  );
  const out = new Uint8Array(size);
  let pos = 0;
  entries.forEach((e, i) => {
    const name = names[i]!;
    if (name.byteLength === 0 || name.byteLength > 1023) {
      throw new FormatError(`qcow2 bitmap name of ${name.byteLength} bytes is invalid`);
    }
    BitmapDirEntry.encode(
      {
        bitmapTableOffset: e.bitmapTableOffset,
        bitmapTableSize: e.bitmapTableSize,
        flags: BigInt(e.flags >>> 0),
        type: e.type,
        granularityBits: e.granularityBits,
        nameSize: name.byteLength,
        extraDataSize: 0,
      },
      out,
      pos,
    );
    out.set(name, pos + BITMAP_DIR_FIXED_SIZE);
    pos += Math.ceil((BITMAP_DIR_FIXED_SIZE + name.byteLength) / 8) * 8;
  });
  return out;
}

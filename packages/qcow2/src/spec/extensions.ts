import { FormatError, defineStruct, hex } from "@qimg/structs";

/** Header extension type codes (u32 magic values). */
export const ExtensionType = {
  end: 0,
  backingFormat: 0xe2792aca,
  featureNameTable: 0x6803f857,
  bitmaps: 0x23852875,
  fullDiskEncryption: 0x0537be77,
  externalDataFile: 0x44415441,
} as const;

/** Every extension starts with this 8-byte prefix; data follows, padded to 8 bytes. */
export const EXTENSION_PREFIX = {
  type: { offset: 0, type: "u32", doc: "u32: extension type (0 ends the list)" },
  length: {
    offset: 4,
    type: "u32",
    unit: "bytes",
    doc: "u32: length of the data, without padding",
  },
} as const;
/** The 8-byte prefix of every header extension: type and data length. */
export const ExtensionPrefix = defineStruct("qcow2 header extension", "big", 8, EXTENSION_PREFIX);

/** One header extension as found in the file. */
export interface HeaderExtension {
  /** Its type magic (see {@link ExtensionType}). */
  readonly type: number;
  /** Offset of the extension's prefix in the file. */
  readonly offset: number;
  /** The data bytes (unpadded), kept verbatim so unknown extensions round-trip. */
  readonly data: Uint8Array;
}

/**
 * Parse the header extensions that start at `start` and may run until `end` (the first
 * cluster's end, or the backing file name when it comes first).
 */
export function decodeExtensions(bytes: Uint8Array, start: number, end: number): HeaderExtension[] {
  const out: HeaderExtension[] = [];
  let pos = start;
  // Bytes past the end of a short file read as zeros (an end marker), as QEMU reads them.
  const limit = Math.min(end, bytes.byteLength);
  while (pos < end && pos < bytes.byteLength) {
    // An 8-byte prefix that does not fit before `end` (e.g. a backing file name offset that
    // points into the middle of an extension) is refused, as QEMU refuses it, end marker or not.
    if (pos + 8 > end) {
      throw new FormatError(
        `qcow2 header extension at ${hex(pos)} does not fit before the end of the header area at ${hex(end)}`,
        { offset: pos },
      );
    }
    if (pos + 8 > bytes.byteLength) return out;
    const { type, length } = ExtensionPrefix.decode(bytes, pos, pos);
    if (type === ExtensionType.end) return out;
    const dataEnd = pos + 8 + length;
    if (dataEnd > limit) {
      throw new FormatError(
        `qcow2 header extension ${hex(type)} at ${hex(pos)} has length ${length}, past the end of the header area at ${hex(limit)}`,
        { offset: pos },
      );
    }
    out.push({ type, offset: pos, data: bytes.slice(pos + 8, dataEnd) });
    pos = pos + 8 + Math.ceil(length / 8) * 8;
  }
  // QEMU tolerates a list that runs to the end of the area without an end marker.
  return out;
}

/** Encode extensions followed by the end marker (the header area's layout after header_length). */
export function encodeExtensions(exts: readonly { type: number; data: Uint8Array }[]): Uint8Array {
  let size = 8;
  for (const e of exts) size += 8 + Math.ceil(e.data.byteLength / 8) * 8;
  const out = new Uint8Array(size);
  let pos = 0;
  for (const e of exts) {
    ExtensionPrefix.encode({ type: e.type, length: e.data.byteLength }, out, pos);
    out.set(e.data, pos + 8);
    pos += 8 + Math.ceil(e.data.byteLength / 8) * 8;
  }
  return out;
}

/** One feature-name table entry: 48 bytes. */
export const FEATURE_NAME_ENTRY = {
  type: { offset: 0, type: "u8", doc: "u8: 0 incompatible, 1 compatible, 2 autoclear" },
  bit: { offset: 1, type: "u8", doc: "u8: bit number within the feature field" },
  name: { offset: 2, type: "bytes", length: 46, doc: "46 bytes: feature name, NUL padded" },
} as const;
/** One 48-byte entry of the feature name table extension. */
export const FeatureNameEntry = defineStruct(
  "qcow2 feature name entry",
  "big",
  48,
  FEATURE_NAME_ENTRY,
);

/** Which feature bit field a feature name entry describes. */
export type FeatureKind = "incompatible" | "compatible" | "autoclear";
const KINDS: readonly FeatureKind[] = ["incompatible", "compatible", "autoclear"];

/** A feature name table entry, decoded. */
export interface FeatureName {
  /** The bit field, or the raw type number when it is not one of the three known. */
  readonly type: FeatureKind | number;
  /** Bit number in that field. */
  readonly bit: number;
  /** The feature's name. */
  readonly name: string;
}

const textDecoder = new TextDecoder("utf-8", { fatal: false });
const textEncoder = new TextEncoder();

/** Decode the feature name table extension's data (48-byte entries; a partial tail is ignored). */
export function decodeFeatureNames(data: Uint8Array): FeatureName[] {
  const out: FeatureName[] = [];
  for (let pos = 0; pos + 48 <= data.byteLength; pos += 48) {
    const e = FeatureNameEntry.decode(data, pos);
    const nul = e.name.indexOf(0);
    out.push({
      type: KINDS[e.type] ?? e.type,
      bit: e.bit,
      name: textDecoder.decode(nul < 0 ? e.name : e.name.subarray(0, nul)),
    });
  }
  return out;
}

/** Encode a feature name table extension's data (names cut at 46 bytes). */
export function encodeFeatureNames(names: readonly FeatureName[]): Uint8Array {
  const out = new Uint8Array(names.length * 48);
  names.forEach((n, i) => {
    const name = new Uint8Array(46);
    name.set(textEncoder.encode(n.name).subarray(0, 46));
    const type = typeof n.type === "number" ? n.type : KINDS.indexOf(n.type);
    FeatureNameEntry.encode({ type, bit: n.bit, name }, out, i * 48);
  });
  return out;
}

/** The bitmaps extension's data: 24 bytes. */
export const BITMAPS_EXTENSION = {
  nbBitmaps: { offset: 0, type: "u32", unit: "entries", doc: "u32: bitmaps in the directory" },
  reserved: { offset: 4, type: "u32", doc: "u32: reserved, zero" },
  directorySize: {
    offset: 8,
    type: "u64",
    unit: "bytes",
    doc: "u64: size of the bitmap directory",
  },
  directoryOffset: {
    offset: 16,
    type: "u64",
    unit: "bytes",
    doc: "u64: offset of the bitmap directory",
  },
} as const;
/** The bitmaps extension's data: bitmap count, directory size and offset. */
export const BitmapsExtension = defineStruct(
  "qcow2 bitmaps extension",
  "big",
  24,
  BITMAPS_EXTENSION,
);

/** The full-disk-encryption header pointer: 16 bytes. */
export const FDE_EXTENSION = {
  offset: { offset: 0, type: "u64", unit: "bytes", doc: "u64: offset of the encryption header" },
  length: { offset: 8, type: "u64", unit: "bytes", doc: "u64: length of the encryption header" },
} as const;
/** The full disk encryption header pointer extension's data: offset and length. */
export const FdeExtension = defineStruct(
  "qcow2 encryption header pointer",
  "big",
  16,
  FDE_EXTENSION,
);

/** Decode a string extension (backing format, data file name). */
export function decodeStringExtension(data: Uint8Array): string {
  const nul = data.indexOf(0);
  return textDecoder.decode(nul < 0 ? data : data.subarray(0, nul));
}

/** The data of a string extension (backing format, data file name): UTF-8, without a NUL. */
export function encodeStringExtension(value: string): Uint8Array {
  return textEncoder.encode(value);
}

/** Read a NUL-free string stored at [offset, offset+size) in `bytes`. */
export function decodeString(bytes: Uint8Array, offset: number, size: number): string {
  return textDecoder.decode(bytes.subarray(offset, offset + size));
}

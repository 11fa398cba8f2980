import { FormatError, RangeFormatError, InvalidArgumentError } from "./errors.js";
import type { Endian } from "./endian.js";
import {
  readU64,
  readU64Bits,
  viewOf,
  writeU16,
  writeU32,
  writeU64,
  writeU64Bits,
  writeU8,
} from "./endian.js";

/**
 * Field types of a declared structure.
 * - `u8`/`u16`/`u32`/`u64`: unsigned integers decoded to `number` (u64 checked <= 2^53-1).
 * - `bits32`/`bits64`: bitmasks decoded to `bigint`, so unknown bits round-trip.
 * - `bytes`: a fixed-length byte range, decoded to a copy (`Uint8Array`).
 */
export type FieldType = "u8" | "u16" | "u32" | "u64" | "bits32" | "bits64" | "bytes";

/** One field of an on-disk structure: where it is, its type, and what it means. */
export interface FieldSpec {
  /** Byte offset inside the structure. */
  readonly offset: number;
  /** How the bytes are read (unsigned integer width, 64-bit feature bits, raw bytes, ...). */
  readonly type: FieldType;
  /** Length in bytes; required for `bytes`, implied for the others. */
  readonly length?: number;
  /** Unit of the value, for documentation ("bytes", "clusters", "entries", "bits"...). */
  readonly unit?: string;
  /** What the field means. */
  readonly doc?: string;
}

/** A structure's offset table: field name to {@link FieldSpec}. */
export type FieldTable = Readonly<Record<string, FieldSpec>>;

type ValueOf<T extends FieldType> = T extends "bits32" | "bits64"
  ? bigint
  : T extends "bytes"
    ? Uint8Array
    : number;

/** The decoded shape of a field table. */
export type Decoded<F extends FieldTable> = {
  readonly [K in keyof F]: ValueOf<F[K]["type"]>;
};

/** A declared structure: its offset table and an exact decode/encode pair (see `defineStruct`). */
export interface StructDef<F extends FieldTable> {
  /** Name used in messages ("qcow2 header"). */
  readonly name: string;
  /** Byte order of every field. */
  readonly endian: Endian;
  /** Total size in bytes. */
  readonly size: number;
  /** The offset table it was declared with. */
  readonly fields: F;
  /** Decode `size` bytes at `at` in `bytes`; `fileOffset` is reported in errors. */
  decode(bytes: Uint8Array, at?: number, fileOffset?: number): Decoded<F>;
  /** Encode into a new `size`-byte array, or into `into` at `at`. */
  encode(value: Decoded<F>, into?: Uint8Array, at?: number): Uint8Array;
}

const WIDTH: Record<Exclude<FieldType, "bytes">, number> = {
  u8: 1,
  u16: 2,
  u32: 4,
  u64: 8,
  bits32: 4,
  bits64: 8,
};

/** Width in bytes of a field. */
export function fieldWidth(spec: FieldSpec): number {
  if (spec.type === "bytes") {
    if (spec.length === undefined) throw new InvalidArgumentError("bytes field needs a length");
    return spec.length;
  }
  return WIDTH[spec.type];
}

/**
 * Declare an on-disk structure once as an offset table and get its codec.
 *
 * ```ts
 * const Hdr = defineStruct("demo header", "big", 16, {
 *   magic: { offset: 0, type: "u32", doc: "magic number" },
 *   flags: { offset: 4, type: "bits32", doc: "feature bits" },
 *   size: { offset: 8, type: "u64", unit: "bytes", doc: "virtual size" },
 * } as const);
 * ```
 */
export function defineStruct<const F extends FieldTable>(
  name: string,
  endian: Endian,
  size: number,
  fields: F,
): StructDef<F> {
  const le = endian === "little";
  const entries = Object.entries(fields);
  for (const [key, spec] of entries) {
    const w = fieldWidth(spec);
    if (spec.offset < 0 || spec.offset + w > size) {
      throw new InvalidArgumentError(
        `${name}: field ${key} [${spec.offset}, +${w}) is outside ${size} bytes`,
      );
    }
  }
  return {
    name,
    endian,
    size,
    fields,
    decode(bytes, at = 0, fileOffset) {
      if (at < 0 || at + size > bytes.byteLength) {
        throw new FormatError(
          `${name} needs ${size} bytes but only ${Math.max(0, bytes.byteLength - at)} are available`,
          { offset: fileOffset },
        );
      }
      const view = viewOf(bytes);
      const out: Record<string, unknown> = {};
      for (const [key, spec] of entries) {
        const o = at + spec.offset;
        switch (spec.type) {
          case "u8":
            out[key] = view.getUint8(o);
            break;
          case "u16":
            out[key] = view.getUint16(o, le);
            break;
          case "u32":
            out[key] = view.getUint32(o, le);
            break;
          case "u64":
            try {
              out[key] = readU64(view, o, le, `${name} field ${key}`);
            } catch (e) {
              throw new RangeFormatError((e as Error).message, {
                offset: fileOffset === undefined ? undefined : fileOffset + spec.offset,
                cause: e,
              });
            }
            break;
          case "bits32":
            out[key] = BigInt(view.getUint32(o, le));
            break;
          case "bits64":
            out[key] = readU64Bits(view, o, le);
            break;
          case "bytes":
            out[key] = bytes.slice(o, o + fieldWidth(spec));
            break;
        }
      }
      return Object.freeze(out) as Decoded<F>;
    },
    encode(value, into, at = 0) {
      const target = into ?? new Uint8Array(size);
      if (at < 0 || at + size > target.byteLength) {
        throw new InvalidArgumentError(
          `${name}: ${size} bytes do not fit at ${at} in ${target.byteLength}`,
        );
      }
      const view = viewOf(target);
      const v = value as Record<string, unknown>;
      for (const [key, spec] of entries) {
        const o = at + spec.offset;
        const x = v[key];
        switch (spec.type) {
          case "u8":
            writeU8(view, o, x as number);
            break;
          case "u16":
            writeU16(view, o, x as number, le);
            break;
          case "u32":
            writeU32(view, o, x as number, le);
            break;
          case "u64":
            writeU64(view, o, x as number, le);
            break;
          case "bits32": {
            const b = x as bigint;
            if (b < 0n || b > 0xffff_ffffn)
              throw new RangeFormatError(`${name} field ${key} does not fit 32 bits`);
            view.setUint32(o, Number(b), le);
            break;
          }
          case "bits64":
            writeU64Bits(view, o, x as bigint, le);
            break;
          case "bytes": {
            const b = x as Uint8Array;
            const w = fieldWidth(spec);
            if (b.byteLength !== w) {
              throw new InvalidArgumentError(
                `${name} field ${key} needs ${w} bytes, got ${b.byteLength}`,
              );
            }
            target.set(b, o);
            break;
          }
        }
      }
      return target;
    },
  };
}

/**
 * Everything wrong with how a structure's fields cover its size: gaps, overlaps and fields
 * past the end. An empty list proves the fields tile the structure exactly (declare
 * reserved/padding ranges as `bytes` fields).
 */
export function tilingProblems(def: { name: string; size: number; fields: FieldTable }): string[] {
  const problems: string[] = [];
  const sorted = Object.entries(def.fields)
    .map(([k, s]) => ({ k, start: s.offset, end: s.offset + fieldWidth(s) }))
    .sort((a, b) => a.start - b.start || a.end - b.end);
  let pos = 0;
  let prev = "(start)";
  for (const f of sorted) {
    if (f.start > pos)
      problems.push(`${def.name}: gap [${pos}, ${f.start}) between ${prev} and ${f.k}`);
    if (f.start < pos)
      problems.push(`${def.name}: ${f.k} at ${f.start} overlaps ${prev} (ends at ${pos})`);
    pos = Math.max(pos, f.end);
    prev = f.k;
  }
  if (pos < def.size) problems.push(`${def.name}: gap [${pos}, ${def.size}) after ${prev}`);
  if (pos > def.size) problems.push(`${def.name}: fields end at ${pos}, past the size ${def.size}`);
  return problems;
}

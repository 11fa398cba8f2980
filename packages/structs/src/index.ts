export {
  ErrorCode,
  QimgError,
  FormatError,
  UnsupportedFeatureError,
  CorruptImageError,
  RangeFormatError,
  IoError,
  InvalidArgumentError,
  isQimgError,
  hex,
} from "./errors.js";
export type { QimgErrorOptions } from "./errors.js";
export {
  viewOf,
  readU8,
  readU16,
  readU32,
  readU64,
  readU64Bits,
  writeU8,
  writeU16,
  writeU32,
  writeU64,
  writeU64Bits,
} from "./endian.js";
export type { Endian } from "./endian.js";
export { defineStruct, fieldWidth, tilingProblems } from "./struct.js";
export type { FieldType, FieldSpec, FieldTable, Decoded, StructDef } from "./struct.js";
export { defineFeatures, bitsOf, formatMask } from "./features.js";
export type { FeatureBits, FeatureSet } from "./features.js";
export { U64TableView, mask64 } from "./table.js";
export type { Mask64 } from "./table.js";

/**
 * `@qimg/qcow2/spec`: the qcow2 on-disk structures alone (header, extensions, snapshot table,
 * bitmap directory, L1/L2 entry bits), as codecs over bytes. Importing it loads no driver, no
 * I/O layer and no compression library: a tool that only decodes headers needs nothing else.
 */
export {
  QCOW2_MAGIC,
  HEADER_V2_FIELDS,
  HEADER_V3_FIELDS,
  HEADER_V2_SIZE,
  HEADER_V3_SIZE,
  HeaderV2,
  HeaderV3,
  IncompatibleFeatures,
  CompatibleFeatures,
  AutoclearFeatures,
  FEATURE_NAMES,
  CompressionType,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  MAX_SNAPSHOTS,
  decodeHeader,
  encodeHeader,
  validateHeader,
} from "./header.js";
export type { Qcow2Header, CompressionTypeName } from "./header.js";
export {
  ExtensionType,
  ExtensionPrefix,
  FeatureNameEntry,
  BitmapsExtension,
  FdeExtension,
  decodeExtensions,
  encodeExtensions,
  decodeFeatureNames,
  encodeFeatureNames,
  decodeStringExtension,
  encodeStringExtension,
} from "./extensions.js";
export type { HeaderExtension, FeatureName, FeatureKind } from "./extensions.js";
export {
  SnapshotFixed,
  SnapshotExtra,
  decodeSnapshotTable,
  encodeSnapshotTable,
} from "./snapshot.js";
export type { SnapshotEntry } from "./snapshot.js";
export { BitmapDirEntry, BitmapFlag, decodeBitmapDirectory } from "./bitmap-directory.js";
export type { BitmapEntry } from "./bitmap-directory.js";
export { BitmapChunk, classifyBitmapTableEntry } from "./bitmap-table.js";
// Entry layouts and the L1/L2/refcount-table entry classifier.
export * from "./l2.js";
export { encodeHeaderArea } from "./header-area.js";

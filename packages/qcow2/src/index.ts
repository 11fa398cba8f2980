export { Qcow2Image, openQcow2 } from "./image.js";
export type { Qcow2OpenOptions } from "./image.js";
export type {
  BackingOpener,
  BackingRequest,
  BitmapInfo,
  Qcow2Info,
  SnapshotInfo,
} from "./types.js";
export { STALE_BITMAPS_WARNING } from "./types.js";
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
} from "./spec/header.js";
export type { Qcow2Header, CompressionTypeName } from "./spec/header.js";
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
} from "./spec/extensions.js";
export type { HeaderExtension, FeatureName, FeatureKind } from "./spec/extensions.js";
export {
  SnapshotFixed,
  SnapshotExtra,
  decodeSnapshotTable,
  encodeSnapshotTable,
} from "./spec/snapshot.js";
export type { SnapshotEntry } from "./spec/snapshot.js";
export { BitmapDirEntry, BitmapFlag, decodeBitmapDirectory } from "./spec/bitmap-directory.js";
export type { BitmapEntry } from "./spec/bitmap-directory.js";
export { BitmapChunk, classifyBitmapTableEntry } from "./spec/bitmap-table.js";
// Entry layouts and the L1/L2/refcount-table entry classifier.
export * from "./spec/l2.js";
export { inflateRaw, zstd as zstdDecompress, decompressorFor } from "./compress.js";
export type { Decompressor } from "./compress.js";

export { probeQcow2 } from "./probe.js";
export { createQcow2, normalizeCreateOptions } from "./create.js";
export type { Qcow2CreateOptions, Preallocation } from "./create.js";
export { encodeHeaderArea } from "./spec/header-area.js";
export {
  HEADER_FILLER_EXTENSION,
  planHeaderFieldWrite,
  rewriteHeaderArea,
  writeHeaderFields,
} from "./header-update.js";
export type {
  HeaderArea,
  HeaderFieldChanges,
  HeaderFieldWrite,
  HeaderWriteOptions,
} from "./header-update.js";
export { UPDATABLE_HEADER_FIELDS, headerFieldSpan } from "./spec/header.js";
export type { UpdatableHeaderField } from "./spec/header.js";
export { walkReferences, walkL1Table, walkTables } from "./walk.js";
export type {
  Reference,
  ReferenceKind,
  WalkProblem,
  WalkInput,
  WalkVisitor,
  L1Cursor,
  L2Cursor,
  TableVisitor,
  TableSource,
} from "./walk.js";
export { readQcow2Metadata } from "./layout.js";
export type { Qcow2Metadata, ReadMetadataOptions, FileRange } from "./layout.js";
export type { Compressor } from "./image.js";
export type { ClusterDecompressor } from "./types.js";
export { defaultCompress } from "./compress.js";
// Internal snapshots.
export {
  MAX_SNAPSHOT_STRING_BYTES,
  MAX_SNAPSHOT_TABLE_BYTES,
  findSnapshot,
  findSnapshotByIdOrName,
  newSnapshotId,
  openQcow2Snapshot,
} from "./snapshot.js";
export type { CreateSnapshotOptions, SnapshotSelector, SnapshotViewOptions } from "./snapshot.js";
// Persistent bitmap management.
export { copyBitmaps } from "./bitmap-copy.js";
export {
  MAX_BITMAPS,
  MAX_BITMAP_DIRECTORY_BYTES,
  MAX_BITMAP_NAME_BYTES,
  defaultBitmapGranularity,
} from "./bitmap-manage.js";
export type {
  AddBitmapOptions,
  CopyBitmapsOptions,
  DirtyRange,
  Qcow2BitmapInfo,
} from "./bitmap-manage.js";
export { encodeBitmapDirectory } from "./spec/bitmap-directory.js";
// Amend.
export { compatVersion } from "./amend.js";
export type { Qcow2AmendOptions } from "./amend.js";
// Resize, shrink, measure.
export type { Qcow2ResizeOptions, Qcow2Preallocation } from "./resize.js";
export {
  measureQcow2,
  measureDataBytes,
  measureBitmaps,
  qcow2PreallocSize,
  refcountMetadataSize,
} from "./measure.js";
export type { Qcow2MeasureOptions, Qcow2Measure, MeasuredBitmap } from "./measure.js";
export { readEncryptedQcow2Info } from "./info.js";
export type { Qcow2EncryptionInfo } from "./info.js";
export {
  decodeLuksHeader,
  encodeLuksHeader,
  luksInfo,
  LUKS_HEADER_SIZE,
  LUKS_SLOT_ENABLED,
  LUKS_SLOT_DISABLED,
} from "./spec/luks.js";
export type { LuksHeader, LuksKeySlotValue, LuksInfo, LuksSlotInfo } from "./spec/luks.js";
// Backing file changes, make empty.
export { withBackingFormat } from "./backing.js";
export type { BackingFileChange } from "./backing.js";
// Corruption events.
export { onQcow2Corruption } from "./overlap.js";
export type { Qcow2CorruptionEvent } from "./overlap.js";

export {
  QED_MAGIC,
  QedFeatures,
  QED_KNOWN_FEATURES,
  QED_KNOWN_COMPAT_FEATURES,
  QED_KNOWN_AUTOCLEAR_FEATURES,
  QED_F_BACKING_FILE,
  QED_F_NEED_CHECK,
  QED_F_BACKING_FORMAT_NO_PROBE,
  QED_MIN_CLUSTER_SIZE,
  QED_MAX_CLUSTER_SIZE,
  QED_DEFAULT_CLUSTER_SIZE,
  QED_MIN_TABLE_SIZE,
  QED_MAX_TABLE_SIZE,
  QED_DEFAULT_TABLE_SIZE,
  QED_NEED_CHECK_TIMEOUT_MS,
  QED_CLUSTER_UNALLOCATED,
  QED_CLUSTER_ZERO,
  QED_SECTOR_SIZE,
  isValidClusterSize,
  isValidTableSize,
  isValidImageSize,
  maxImageSize,
} from "./spec/constants.js";
export {
  QED_HEADER_SIZE,
  QED_HEADER_FIELDS,
  QedHeaderStruct,
  decodeQedHeader,
  encodeQedHeader,
  validateQedHeader,
  qedFeatureNames,
} from "./spec/header.js";
export type { QedHeader } from "./spec/header.js";
export {
  QED_TABLE_ENTRY_SIZE,
  QED_TABLE_ENTRY_FIELDS,
  QED_ENTRY_TOO_LARGE,
  QedTable,
  isValidClusterOffset,
  isValidTableOffset,
  qedFileSize,
  classifyL1Entry,
  classifyL2Entry,
} from "./spec/table.js";
export type { QedGeometry, QedEntryKind } from "./spec/table.js";
export { QedImage, openQed, readQedMetadata } from "./image.js";
export { planQedBackingChange } from "./backing.js";
export type { QedBackingChange, QedBackingPlan } from "./backing.js";
export { createQed } from "./create.js";
export { probeQed } from "./probe.js";
export { checkQed } from "./check.js";
export type {
  BackingOpener,
  BackingRequest,
  QedTimer,
  QedOpenOptions,
  QedInfo,
  QedCreateOptions,
  QedCheckProblem,
  QedCheckResult,
  QedCheckOptions,
} from "./types.js";

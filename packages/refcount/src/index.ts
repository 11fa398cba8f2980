export {
  RefcountBlockView,
  refcountBitsOf,
  maxRefcount,
  MIN_REFCOUNT_ORDER,
  MAX_REFCOUNT_ORDER,
} from "./spec/refcount-block.js";
export {
  REFTABLE_ENTRY_SIZE,
  REFTABLE_OFFSET_MASK,
  REFTABLE_RESERVED_MASK,
  MAX_REFTABLE_BYTES,
  validateRefcountTable,
} from "./spec/refcount-table.js";
export type { RefcountTableCheck } from "./spec/refcount-table.js";
export { refcountGeometry, MIN_CLUSTER_BITS, MAX_CLUSTER_BITS } from "./geometry.js";
export type { RefcountGeometry } from "./geometry.js";
export { Refcounts } from "./refcounts.js";
export type { RefcountsOptions, FreeOptions, TableMovedHook, DiscardHook } from "./refcounts.js";
export { rebuildRefcounts, countReferences, createClusterCounts } from "./rebuild.js";
export type {
  ClusterCounts,
  ClusterRun,
  CountReferencesOptions,
  RebuildOptions,
  RebuildResult,
} from "./rebuild.js";

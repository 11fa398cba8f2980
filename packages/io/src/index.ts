/**
 * `@qimg/io`: the platform-neutral entry (runs in Node and in browsers). The file backend,
 * which needs Node, is in `@qimg/io/node`.
 */
export type { BackendKind, BlockBackend, ReadOptions } from "./backend.js";
export { MemoryBackend } from "./memory.js";
export type { MemoryBackendOptions } from "./memory.js";
export { FaultBackend } from "./fault.js";
export type {
  FaultBackendOptions,
  FaultCounters,
  FaultOp,
  FaultPredicate,
  PowerLossOptions,
  PowerLossReport,
} from "./fault.js";
export type {
  BackingOpener,
  BackingRequest,
  BlockStatus,
  DiskImage,
  WritableDiskImage,
  WriteZeroesOptions,
} from "./image.js";
export {
  checkRequest,
  imageClosedError,
  imageReadOnlyError,
  backingNotOpenedError,
  noBackingOpenerError,
} from "./request.js";
export { RawImage } from "./raw.js";
export { seededRandom } from "./random.js";
export { alignedBuffer, alignedBuffers, MAX_ALIGNED_BUFFER, WASM_PAGE } from "./aligned.js";
export { RangeClaims } from "./claims.js";
export type { RangeClaim } from "./claims.js";
export { Mutex } from "./mutex.js";
export { ExtentIterator, MAX_STATUS_PROBE, StatusCursor } from "./extents.js";
export type { ExtentIteratorOptions, StatusSource } from "./extents.js";

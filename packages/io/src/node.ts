/**
 * `@qimg/io/node`: the backends that need Node's file system. Everything platform-neutral
 * (interfaces, memory and fault backends, claims, raw images) is in the main entry, `@qimg/io`,
 * which runs in browsers too.
 */
export { FileBackend } from "./file.js";
export type { FileBackendOptions } from "./file.js";
export { ImageLockedError, LOCK_PERM_BASE, LOCK_SHARED_BASE, QEMU_PERMISSIONS } from "./lock.js";
export type { QemuPermission } from "./lock.js";

/**
 * qemu's cache modes (`-t`, `cache=`), shared by the commands that open images for writing
 * (`io`, `bench`, `convert`).
 */
import { CliError } from "../errors.js";

/** The cache modes qemu-img and qemu-io accept. */
export const CACHE_MODES = ["none", "writeback", "writethrough", "directsync", "unsafe"] as const;
/** One of {@link CACHE_MODES}. */
export type CacheMode = (typeof CACHE_MODES)[number];

/**
 * What a qemu cache mode means here. O_DIRECT (none, directsync) has no counterpart: what
 * is kept is each mode's durability: writethrough and directsync flush after every request
 * (data and metadata, as the guest sees a write-through disk), writeback and none flush when
 * asked, unsafe never. An unknown mode is qemu's "Invalid cache option" error.
 */
export function cacheMode(mode: string): { writethrough: boolean; noFlush: boolean } {
  if (!(CACHE_MODES as readonly string[]).includes(mode)) {
    throw new CliError(`Invalid cache option: ${mode}`);
  }
  return {
    writethrough: mode === "writethrough" || mode === "directsync",
    noFlush: mode === "unsafe",
  };
}

/** Whether a qemu cache mode writes metadata through (writethrough, directsync). */
export function cacheWritethrough(mode: string | undefined): boolean | undefined {
  return mode === undefined ? undefined : cacheMode(mode).writethrough;
}

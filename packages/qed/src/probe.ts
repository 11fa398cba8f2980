import { QED_MAGIC } from "./spec/constants.js";

/** True when `bytes` start with the QED magic "QED\0" (little-endian u32 0x00444551). */
export function probeQed(bytes: Uint8Array): boolean {
  return (
    bytes.length >= 4 &&
    (bytes[0]! | (bytes[1]! << 8) | (bytes[2]! << 16) | (bytes[3]! << 24)) >>> 0 === QED_MAGIC
  );
}

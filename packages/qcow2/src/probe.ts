import { QCOW2_MAGIC } from "./spec/header.js";

/** True when `bytes` start with the qcow2 magic "QFI\xfb". */
export function probeQcow2(bytes: Uint8Array): boolean {
  return (
    bytes.length >= 4 &&
    ((bytes[0]! << 24) | (bytes[1]! << 16) | (bytes[2]! << 8) | bytes[3]!) >>> 0 === QCOW2_MAGIC
  );
}

/**
 * Format probing by magic number, with the format packages' own probes (`probeQcow2`,
 * `probeQed`). Only formats with a magic are ever recognised; raw is what is left, and callers
 * decide whether guessing raw is acceptable.
 */
import { probeQcow2 } from "@qimg/qcow2";
import { probeQed } from "@qimg/qed";

/** How many bytes of the file `probeFormat` wants to see. */
export const PROBE_SIZE = 512;

/** "qcow2" or "qed" when the bytes start with that format's magic, else undefined. */
export function probeFormat(bytes: Uint8Array): "qcow2" | "qed" | undefined {
  if (probeQcow2(bytes)) return "qcow2";
  if (probeQed(bytes)) return "qed";
  return undefined;
}

/** qemu-img's warning for an image whose format was guessed as raw. */
export function probedRawWarning(filename: string): string {
  return (
    `WARNING: Image format was not specified for '${filename}' and probing guessed raw.\n` +
    "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
    "         Specify the 'raw' format explicitly to remove the restrictions.\n"
  );
}

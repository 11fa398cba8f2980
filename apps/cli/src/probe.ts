/**
 * Format probing by magic number. Only formats with a magic are ever recognised; raw is what
 * is left, and callers decide whether guessing raw is acceptable.
 */

/** "QFI\xfb" at offset 0, big-endian u32 0x514649fb. */
export const QCOW2_MAGIC_BYTES: readonly number[] = [0x51, 0x46, 0x49, 0xfb];
/** "QED\0" at offset 0 (little-endian u32 0x00444551). */
export const QED_MAGIC_BYTES: readonly number[] = [0x51, 0x45, 0x44, 0x00];

/** How many bytes of the file `probeFormat` wants to see. */
export const PROBE_SIZE = 512;

function startsWith(bytes: Uint8Array, magic: readonly number[]): boolean {
  return bytes.length >= magic.length && magic.every((b, i) => bytes[i] === b);
}

/** "qcow2" or "qed" when the bytes start with that format's magic, else undefined. */
export function probeFormat(bytes: Uint8Array): "qcow2" | "qed" | undefined {
  if (startsWith(bytes, QCOW2_MAGIC_BYTES)) return "qcow2";
  if (startsWith(bytes, QED_MAGIC_BYTES)) return "qed";
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

/**
 * The write side of an open image, the same for every format: qcow2 and QED use their
 * drivers' write paths; raw writes zero bytes for write-zeroes and discard.
 */
import { CliError } from "./errors.js";
import type { DiskImage } from "./drivers.js";

export interface WritableImage {
  readonly image: DiskImage;
  /** Allocation unit (qcow2/QED cluster size; 512 for raw). */
  readonly clusterSize: number;
  write(offset: number, data: Uint8Array): Promise<void>;
  writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  /** Whole clusters, compressed (qcow2 only). */
  readonly writeCompressed: ((offset: number, data: Uint8Array) => Promise<void>) | undefined;
}

interface WriteMethods {
  write(offset: number, data: Uint8Array): Promise<void>;
  writeZeroes?(offset: number, length: number, options?: { mayUnmap?: boolean }): Promise<void>;
  discard?(offset: number, length: number): Promise<void>;
  flush?(): Promise<void>;
  writeCompressed?(offset: number, data: Uint8Array): Promise<void>;
  clusterSize?: number;
  info?(): { clusterSize?: number };
}

const ZERO_CHUNK = 1 << 20;

export function writableOf(image: DiskImage): WritableImage {
  const m = image as DiskImage & Partial<WriteMethods>;
  if (typeof m.write !== "function" || image.readOnly) {
    throw new CliError("Block node is read-only", { file: image.backend.name });
  }
  const write = m.write.bind(image);
  const zeroByWriting = async (offset: number, length: number): Promise<void> => {
    const zero = new Uint8Array(Math.min(ZERO_CHUNK, length));
    for (let pos = offset; pos < offset + length; pos += zero.length) {
      await write(pos, zero.subarray(0, Math.min(zero.length, offset + length - pos)));
    }
  };
  let clusterSize = 512;
  if (typeof m.clusterSize === "number") clusterSize = m.clusterSize;
  else if (image.format === "qed" && typeof m.info === "function")
    clusterSize = m.info().clusterSize ?? 65536;
  return {
    image,
    clusterSize,
    write,
    writeZeroes:
      typeof m.writeZeroes === "function"
        ? (o, l, mayUnmap) => m.writeZeroes!.call(image, o, l, { mayUnmap })
        : zeroByWriting,
    discard: typeof m.discard === "function" ? m.discard.bind(image) : zeroByWriting,
    flush: typeof m.flush === "function" ? m.flush.bind(image) : () => image.backend.flush(),
    writeCompressed:
      image.format === "qcow2" && typeof m.writeCompressed === "function"
        ? m.writeCompressed.bind(image)
        : undefined,
  };
}

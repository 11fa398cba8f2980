import type { BlockBackend } from "@qimg/io";
import { InvalidArgumentError } from "@qimg/structs";
import {
  QED_DEFAULT_CLUSTER_SIZE,
  QED_DEFAULT_TABLE_SIZE,
  QED_F_BACKING_FILE,
  QED_F_BACKING_FORMAT_NO_PROBE,
  QED_MAGIC,
  QED_MAX_CLUSTER_SIZE,
  QED_MAX_TABLE_SIZE,
  QED_MIN_CLUSTER_SIZE,
  QED_MIN_TABLE_SIZE,
  QED_SECTOR_SIZE,
  isValidClusterSize,
  isValidTableSize,
  maxImageSize,
} from "./spec/constants.js";
import { QED_HEADER_SIZE, encodeQedHeader } from "./spec/header.js";
import type { QedCreateOptions } from "./types.js";

/**
 * Write a new, empty QED image to `backend` (truncating it first), as `qemu-img create -f qed`
 * does: one header cluster (header, then the backing file name), then an all-zero L1 table.
 * The size is rounded up to a multiple of 512. Open it afterwards with `openQed`.
 *
 * QED grows its file as it allocates, so block devices are refused.
 */
export async function createQed(backend: BlockBackend, options: QedCreateOptions): Promise<void> {
  if (backend.kind === "block-device") {
    throw new InvalidArgumentError(
      `cannot create a QED image on the block device ${backend.name}: QED allocates by growing its file, which a block device cannot do (use qcow2 or raw)`,
    );
  }
  const clusterSize = options.clusterSize ?? QED_DEFAULT_CLUSTER_SIZE;
  const tableSize = options.tableSize ?? QED_DEFAULT_TABLE_SIZE;
  if (!isValidClusterSize(clusterSize)) {
    throw new InvalidArgumentError(
      `QED cluster size ${clusterSize} must be a power of two within [${QED_MIN_CLUSTER_SIZE}, ${QED_MAX_CLUSTER_SIZE}]`,
    );
  }
  if (!isValidTableSize(tableSize)) {
    throw new InvalidArgumentError(
      `QED table size ${tableSize} must be a power of two within [${QED_MIN_TABLE_SIZE}, ${QED_MAX_TABLE_SIZE}] clusters`,
    );
  }
  if (!Number.isSafeInteger(options.size) || options.size < 0) {
    throw new InvalidArgumentError(`QED image size ${options.size} must be a non-negative integer`);
  }
  const size = Math.ceil(options.size / QED_SECTOR_SIZE) * QED_SECTOR_SIZE;
  const max = maxImageSize(clusterSize, tableSize);
  if (size > max) {
    throw new InvalidArgumentError(
      max === 0
        ? `QED image size ${size} is not allowed with cluster size ${clusterSize} and table size ${tableSize}: QEMU computes the largest size for these in 64 bits, which wraps to 0, so it would refuse to open the image (use a smaller cluster or table size)`
        : `QED image size ${size} is larger than ${max} bytes, the most cluster size ${clusterSize} and table size ${tableSize} can map`,
    );
  }
  let features = 0n;
  let name = new Uint8Array(0);
  if (options.backingFile !== undefined) {
    if (options.backingFile.length === 0)
      throw new InvalidArgumentError("QED backing file name is empty");
    name = new TextEncoder().encode(options.backingFile);
    if (QED_HEADER_SIZE + name.length > clusterSize) {
      throw new InvalidArgumentError(
        `QED backing file name of ${name.length} bytes does not fit the ${clusterSize}-byte header cluster after the ${QED_HEADER_SIZE}-byte header`,
      );
    }
    features |= QED_F_BACKING_FILE;
    if (options.backingFormat === "raw") features |= QED_F_BACKING_FORMAT_NO_PROBE;
  } else if (options.backingFormat !== undefined) {
    throw new InvalidArgumentError(
      `a backing format ("${options.backingFormat}") needs a backing file`,
    );
  }
  const header = encodeQedHeader({
    magic: QED_MAGIC,
    clusterSize,
    tableSize,
    headerSize: 1,
    features,
    compatFeatures: 0n,
    autoclearFeatures: 0n,
    l1TableOffset: clusterSize,
    imageSize: size,
    backingFilenameOffset: name.length > 0 ? QED_HEADER_SIZE : 0,
    backingFilenameSize: name.length,
  });
  await backend.truncate(0);
  await backend.write(0, header);
  if (name.length > 0) await backend.write(QED_HEADER_SIZE, name);
  // The all-zero L1 table is written out (allocated on disk, as QEMU does, so a full disk fails
  // the create rather than a later write), through one buffer of at most 1 MiB: the table
  // itself can be 1 GiB (64 MiB clusters, 16-cluster tables).
  const l1Size = tableSize * clusterSize;
  const zeros = new Uint8Array(Math.min(l1Size, 1024 * 1024));
  for (let done = 0; done < l1Size; done += zeros.length) {
    await backend.write(
      clusterSize + done,
      zeros.subarray(0, Math.min(zeros.length, l1Size - done)),
    );
  }
  await backend.flush();
}

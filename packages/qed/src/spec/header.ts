/**
 * The QED header: the first 64 bytes of the file, little-endian. The backing file name (when
 * the backing-file feature is set) is stored elsewhere in the header clusters, at
 * `backingFilenameOffset`, and is not part of this structure.
 */
import {
  FormatError,
  UnsupportedFeatureError,
  bitsOf,
  defineStruct,
  formatMask,
  hex,
} from "@qimg/structs";
import type { Decoded } from "@qimg/structs";
import {
  QED_F_BACKING_FILE,
  QED_KNOWN_FEATURES,
  QED_MAGIC,
  QED_MAX_CLUSTER_SIZE,
  QED_MAX_TABLE_SIZE,
  QED_MIN_CLUSTER_SIZE,
  QED_MIN_TABLE_SIZE,
  QED_SECTOR_SIZE,
  QedFeatures,
  isValidClusterSize,
  isValidTableSize,
  maxImageSize,
} from "./constants.js";
import { isValidTableOffset, qedFileSize } from "./table.js";

/** Size of the fixed header in bytes. */
export const QED_HEADER_SIZE = 64;

/** Byte layout of the QED header (all fields little-endian). */
export const QED_HEADER_FIELDS = {
  /** u32: "QED\0" (0x00444551 read little-endian). */
  magic: { offset: 0, type: "u32", doc: "magic QED\\0" },
  /** u32, bytes: size of a cluster, a power of two in [4 KiB, 64 MiB]. */
  clusterSize: { offset: 4, type: "u32", unit: "bytes", doc: "cluster size" },
  /** u32, clusters: size of each L1 and L2 table, a power of two in [1, 16]. */
  tableSize: { offset: 8, type: "u32", unit: "clusters", doc: "L1/L2 table size" },
  /** u32, clusters: clusters reserved for the header (and backing file name) at offset 0. */
  headerSize: { offset: 12, type: "u32", unit: "clusters", doc: "header size" },
  /** u64 bitmask: incompatible features (unknown bits refuse the open). */
  features: { offset: 16, type: "bits64", unit: "bits", doc: "incompatible feature bits" },
  /** u64 bitmask: compatible features (unknown bits are ignored). */
  compatFeatures: { offset: 24, type: "bits64", unit: "bits", doc: "compatible feature bits" },
  /** u64 bitmask: autoclear features (unknown bits are cleared by a writer). */
  autoclearFeatures: { offset: 32, type: "bits64", unit: "bits", doc: "autoclear feature bits" },
  /** u64, bytes: host offset of the L1 table (cluster aligned). */
  l1TableOffset: { offset: 40, type: "u64", unit: "bytes", doc: "L1 table offset" },
  /** u64, bytes: guest-visible size, a multiple of 512. */
  imageSize: { offset: 48, type: "u64", unit: "bytes", doc: "virtual disk size" },
  /** u32, bytes from the start of the file: where the backing file name is stored. */
  backingFilenameOffset: {
    offset: 56,
    type: "u32",
    unit: "bytes",
    doc: "backing file name offset",
  },
  /** u32, bytes: length of the backing file name (no terminator). */
  backingFilenameSize: { offset: 60, type: "u32", unit: "bytes", doc: "backing file name length" },
} as const;

/** The QED header codec. */
export const QedHeaderStruct = defineStruct(
  "QED header",
  "little",
  QED_HEADER_SIZE,
  QED_HEADER_FIELDS,
);

/** A decoded QED header: plain readonly data, feature masks as bigint. */
export type QedHeader = Decoded<typeof QED_HEADER_FIELDS>;

/** Decode the 64-byte header at `at` in `bytes`. Checks only the magic; see {@link validateQedHeader}. */
export function decodeQedHeader(bytes: Uint8Array, at = 0): QedHeader {
  if (bytes.byteLength - at < QED_HEADER_SIZE) {
    throw new FormatError(
      `not a QED image: the QED header needs ${QED_HEADER_SIZE} bytes but the file has ${Math.max(0, bytes.byteLength - at)}`,
      { offset: 0 },
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset + at, 4);
  const magic = view.getUint32(0, true);
  if (magic !== QED_MAGIC) {
    throw new FormatError(
      `not a QED image: QED header magic ${hex(magic)} is not ${hex(QED_MAGIC)} ("QED\\0")`,
      {
        offset: 0,
      },
    );
  }
  return QedHeaderStruct.decode(bytes, at, 0);
}

/** Encode a header into 64 new bytes (or into `into` at `at`). */
export function encodeQedHeader(header: QedHeader, into?: Uint8Array, at = 0): Uint8Array {
  return QedHeaderStruct.encode(header, into, at);
}

/** Names of the set incompatible feature bits, unknown ones as "bit N". */
export function qedFeatureNames(mask: bigint): string[] {
  const decoded = QedFeatures.decode(mask);
  return [...decoded.names, ...bitsOf(decoded.unknown).map((b) => `bit ${b}`)];
}

/**
 * Validate a decoded header against the format's rules and the file size, throwing the first
 * problem found (in QEMU's order): unknown incompatible features (`UnsupportedFeatureError`),
 * cluster size, table size, image size, L1 table offset, header size, backing file name
 * location (`FormatError`, each with the field's offset).
 *
 * `fileSize` is the size of the file in bytes (table offsets must lie inside it).
 */
export function validateQedHeader(h: QedHeader, fileSize: number): void {
  const unknown = h.features & ~QED_KNOWN_FEATURES;
  if (unknown !== 0n) {
    throw new UnsupportedFeatureError(
      // First line in qemu-img's words (unknown bits in hex, no 0x); the masks after it.
      `Unsupported QED features: ${unknown.toString(16)}\nunknown feature bits 0x${formatMask(unknown)} (known mask 0x${formatMask(QED_KNOWN_FEATURES)})`,
      bitsOf(unknown).map((b) => `bit ${b}`),
      { offset: QED_HEADER_FIELDS.features.offset },
    );
  }
  if (!isValidClusterSize(h.clusterSize)) {
    throw new FormatError(
      `QED header cluster_size ${h.clusterSize} is not a power of two in [${QED_MIN_CLUSTER_SIZE}, ${QED_MAX_CLUSTER_SIZE}]`,
      { offset: QED_HEADER_FIELDS.clusterSize.offset },
    );
  }
  if (!isValidTableSize(h.tableSize)) {
    throw new FormatError(
      `QED header table_size ${h.tableSize} is not a power of two in [${QED_MIN_TABLE_SIZE}, ${QED_MAX_TABLE_SIZE}] clusters`,
      { offset: QED_HEADER_FIELDS.tableSize.offset },
    );
  }
  if (h.imageSize % QED_SECTOR_SIZE !== 0) {
    throw new FormatError(
      `QED header image_size ${h.imageSize} is not a multiple of ${QED_SECTOR_SIZE}`,
      {
        offset: QED_HEADER_FIELDS.imageSize.offset,
      },
    );
  }
  const max = maxImageSize(h.clusterSize, h.tableSize);
  if (h.imageSize > max) {
    throw new FormatError(
      `QED header image_size ${h.imageSize} is larger than ${max}, the most cluster_size ${h.clusterSize} and table_size ${h.tableSize} can map`,
      { offset: QED_HEADER_FIELDS.imageSize.offset },
    );
  }
  if (h.headerSize < 1 || h.headerSize > Math.floor(0xffff_ffff / h.clusterSize)) {
    throw new FormatError(
      `QED header header_size ${h.headerSize} clusters is outside [1, ${Math.floor(0xffff_ffff / h.clusterSize)}] for cluster_size ${h.clusterSize}`,
      { offset: QED_HEADER_FIELDS.headerSize.offset },
    );
  }
  // Like QEMU, only whole clusters of the file count: a torn last cluster is outside it.
  const geometry = {
    clusterSize: h.clusterSize,
    tableSize: h.tableSize,
    headerSize: h.headerSize,
    fileSize: qedFileSize(fileSize, h.clusterSize),
  };
  if (!isValidTableOffset(h.l1TableOffset, geometry)) {
    const end = h.l1TableOffset + h.tableSize * h.clusterSize;
    throw new FormatError(
      // First line in qemu-img's words; where the table is and why it is invalid after it.
      `QED table offset is invalid\nQED L1 table at ${hex(h.l1TableOffset)} (${h.tableSize} clusters, ending at ${hex(end)}) is not cluster aligned ` +
        `or not between the header end ${hex(h.headerSize * h.clusterSize)} and the file end ${hex(fileSize)}`,
      { offset: QED_HEADER_FIELDS.l1TableOffset.offset },
    );
  }
  if ((h.features & QED_F_BACKING_FILE) !== 0n) {
    const end = h.backingFilenameOffset + h.backingFilenameSize;
    const bound = h.headerSize * h.clusterSize;
    if (end > bound) {
      throw new FormatError(
        `QED backing file name [${hex(h.backingFilenameOffset)}, +${h.backingFilenameSize}) ends at ${hex(end)}, past the header end ${hex(bound)}`,
        { offset: QED_HEADER_FIELDS.backingFilenameOffset.offset },
      );
    }
  }
}

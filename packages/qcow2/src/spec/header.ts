import {
  FormatError,
  UnsupportedFeatureError,
  defineFeatures,
  defineStruct,
  hex,
  viewOf,
} from "@qimg/structs";

/** "QFI\xfb" */
export const QCOW2_MAGIC = 0x514649fb;

/** Fields common to version 2 and 3 (the whole v2 header is these 72 bytes). */
export const HEADER_V2_FIELDS = {
  magic: { offset: 0, type: "u32", doc: "u32: 0x514649fb ('QFI\\xfb')" },
  version: { offset: 4, type: "u32", doc: "u32: format version, 2 or 3" },
  backingFileOffset: {
    offset: 8,
    type: "u64",
    unit: "bytes",
    doc: "u64: offset of the backing file name in the first cluster, 0 = none",
  },
  backingFileSize: {
    offset: 16,
    type: "u32",
    unit: "bytes",
    doc: "u32: length of the backing file name (no NUL), <= 1023",
  },
  clusterBits: {
    offset: 20,
    type: "u32",
    unit: "bits",
    doc: "u32: log2 of the cluster size, 9..21",
  },
  size: { offset: 24, type: "u64", unit: "bytes", doc: "u64: virtual disk size" },
  cryptMethod: { offset: 32, type: "u32", doc: "u32: 0 none, 1 AES (legacy), 2 LUKS" },
  l1Size: { offset: 36, type: "u32", unit: "entries", doc: "u32: entries in the active L1 table" },
  l1TableOffset: {
    offset: 40,
    type: "u64",
    unit: "bytes",
    doc: "u64: offset of the active L1 table, cluster aligned",
  },
  refcountTableOffset: {
    offset: 48,
    type: "u64",
    unit: "bytes",
    doc: "u64: offset of the refcount table, cluster aligned",
  },
  refcountTableClusters: {
    offset: 56,
    type: "u32",
    unit: "clusters",
    doc: "u32: size of the refcount table",
  },
  nbSnapshots: {
    offset: 60,
    type: "u32",
    unit: "entries",
    doc: "u32: number of internal snapshots",
  },
  snapshotsOffset: {
    offset: 64,
    type: "u64",
    unit: "bytes",
    doc: "u64: offset of the snapshot table, cluster aligned",
  },
} as const;

/** Version 3 adds these fields, up to byte 104 (the minimum v3 header_length). */
export const HEADER_V3_FIELDS = {
  ...HEADER_V2_FIELDS,
  incompatibleFeatures: {
    offset: 72,
    type: "bits64",
    doc: "bits64: features a reader must understand",
  },
  compatibleFeatures: { offset: 80, type: "bits64", doc: "bits64: features a reader may ignore" },
  autoclearFeatures: {
    offset: 88,
    type: "bits64",
    doc: "bits64: features a writer that does not know them must clear",
  },
  refcountOrder: {
    offset: 96,
    type: "u32",
    unit: "bits",
    doc: "u32: log2 of the refcount entry width, 0..6",
  },
  headerLength: {
    offset: 100,
    type: "u32",
    unit: "bytes",
    doc: "u32: length of the header structure, >= 104, multiple of 8",
  },
} as const;

/** Bytes of a version 2 header. */
export const HEADER_V2_SIZE = 72;
/** Bytes of a version 3 header without the optional fields past 104 (header_length is at least this). */
export const HEADER_V3_SIZE = 104;
/** Offset of the optional compression_type byte (when header_length > 104). */
export const COMPRESSION_TYPE_OFFSET = 104;

/** The version 2 header as a struct codec (big-endian, {@link HEADER_V2_FIELDS}). */
export const HeaderV2 = defineStruct("qcow2 v2 header", "big", HEADER_V2_SIZE, HEADER_V2_FIELDS);
/** The version 3 header as a struct codec (big-endian, {@link HEADER_V3_FIELDS}). */
export const HeaderV3 = defineStruct("qcow2 v3 header", "big", HEADER_V3_SIZE, HEADER_V3_FIELDS);

/** incompatible_features bits: an unknown one set means the image must not be opened. */
export const IncompatibleFeatures = defineFeatures({
  dirty: 0,
  corrupt: 1,
  externalDataFile: 2,
  compressionType: 3,
  extendedL2: 4,
} as const);
/** compatible_features bits: safe to ignore when unknown. */
export const CompatibleFeatures = defineFeatures({ lazyRefcounts: 0 } as const);
/** autoclear_features bits: a writer that does not know one clears it. */
export const AutoclearFeatures = defineFeatures({ bitmaps: 0, rawExternalData: 1 } as const);

/** Names QEMU uses in its feature-name table, for messages and for the table we write. */
export const FEATURE_NAMES = {
  incompatible: [
    "dirty bit",
    "corrupt bit",
    "external data file",
    "compression type",
    "extended L2 entries",
  ],
  compatible: ["lazy refcounts"],
  autoclear: ["bitmaps", "raw external data"],
} as const;

/** compression_type values: how compressed clusters are encoded. */
export const CompressionType = { zlib: 0, zstd: 1 } as const;
/** A compression type by name. */
export type CompressionTypeName = keyof typeof CompressionType;

/** Largest active L1 table QEMU accepts: 32 MiB. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
/** Largest refcount table QEMU accepts: 8 MiB. */
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
/** Most snapshots QEMU accepts in one image. */
export const MAX_SNAPSHOTS = 65536;
export const MAX_BACKING_NAME = 1023;

/** A decoded qcow2 header, normalized over v2 and v3. */
export interface Qcow2Header {
  /** Format version. */
  readonly version: 2 | 3;
  /** File offset of the backing file name, 0 when there is none. */
  readonly backingFileOffset: number;
  /** Length of the backing file name in bytes. */
  readonly backingFileSize: number;
  /** log2 of the cluster size (9..21). */
  readonly clusterBits: number;
  /** Virtual disk size in bytes. */
  readonly size: number;
  /** 0 none, 1 AES (legacy), 2 LUKS. */
  readonly cryptMethod: number;
  /** Entries of the active L1 table. */
  readonly l1Size: number;
  /** File offset of the active L1 table. */
  readonly l1TableOffset: number;
  /** File offset of the refcount table. */
  readonly refcountTableOffset: number;
  /** Clusters of the refcount table. */
  readonly refcountTableClusters: number;
  /** Entries of the snapshot table. */
  readonly nbSnapshots: number;
  /** File offset of the snapshot table. */
  readonly snapshotsOffset: number;
  /** incompatible_features (see {@link IncompatibleFeatures}); unknown bits kept. */
  readonly incompatibleFeatures: bigint;
  /** compatible_features (see {@link CompatibleFeatures}); unknown bits kept. */
  readonly compatibleFeatures: bigint;
  /** autoclear_features (see {@link AutoclearFeatures}); unknown bits kept. */
  readonly autoclearFeatures: bigint;
  /** log2 of the refcount width in bits (4 for version 2). */
  readonly refcountOrder: number;
  /** Header length in bytes (72 for version 2); header extensions follow it. */
  readonly headerLength: number;
  /** compression_type (see {@link CompressionType}); 0 when the header is too short to hold it. */
  readonly compressionType: number;
  /** Header bytes from 104 (or 105 when compression_type is present) to header_length, kept verbatim. */
  readonly extraBytes: Uint8Array;
}

/** A typed error for a header field, naming field, value and bound. */
function bad(message: string, offset: number): FormatError {
  return new FormatError(`qcow2 header: ${message}`, { offset });
}

function isPow2Aligned(value: number, align: number): boolean {
  return value % align === 0;
}

/**
 * Decode the header from the start of the file. `bytes` must hold at least the first
 * min(cluster, file) bytes (QEMU reads the header from cluster 0). Checks everything that
 * can be checked without the file size; see {@link validateHeader} for the rest.
 */
export function decodeHeader(bytes: Uint8Array): Qcow2Header {
  if (bytes.byteLength < HEADER_V2_SIZE) {
    throw new FormatError(
      `qcow2 header needs ${HEADER_V2_SIZE} bytes, the file has ${bytes.byteLength}`,
      { offset: 0 },
    );
  }
  const view = viewOf(bytes);
  const magic = view.getUint32(0, false);
  if (magic !== QCOW2_MAGIC) {
    throw new FormatError(`not a qcow2 image: magic ${hex(magic)} is not ${hex(QCOW2_MAGIC)}`, {
      offset: 0,
    });
  }
  const version = view.getUint32(4, false);
  if (version !== 2 && version !== 3) {
    throw new UnsupportedFeatureError(
      `unsupported qcow2 version ${version} (supported: 2, 3)`,
      [`version ${version}`],
      {
        offset: 4,
      },
    );
  }
  if (version === 2) {
    const h = HeaderV2.decode(bytes, 0, 0);
    return {
      ...h,
      version: 2,
      incompatibleFeatures: 0n,
      compatibleFeatures: 0n,
      autoclearFeatures: 0n,
      refcountOrder: 4,
      headerLength: HEADER_V2_SIZE,
      compressionType: 0,
      extraBytes: new Uint8Array(0),
    };
  }
  if (bytes.byteLength < HEADER_V3_SIZE) {
    throw new FormatError(
      `qcow2 v3 header needs ${HEADER_V3_SIZE} bytes, the file has ${bytes.byteLength}`,
      { offset: 0 },
    );
  }
  const h = HeaderV3.decode(bytes, 0, 0);
  if (h.headerLength < HEADER_V3_SIZE) {
    throw bad(`header_length ${h.headerLength} is shorter than ${HEADER_V3_SIZE}`, 100);
  }
  if (h.headerLength % 8 !== 0) {
    throw bad(`header_length ${h.headerLength} is not a multiple of 8`, 100);
  }
  if (h.clusterBits >= 9 && h.clusterBits <= 21 && h.headerLength > 2 ** h.clusterBits) {
    throw bad(
      `header_length ${h.headerLength} exceeds the cluster size ${2 ** h.clusterBits}`,
      100,
    );
  }
  if (h.headerLength > bytes.byteLength) {
    throw bad(
      `header_length ${h.headerLength} is past the end of the ${bytes.byteLength}-byte file`,
      100,
    );
  }
  const compressionType =
    h.headerLength > COMPRESSION_TYPE_OFFSET ? (bytes[COMPRESSION_TYPE_OFFSET] ?? 0) : 0;
  const extraStart =
    h.headerLength > COMPRESSION_TYPE_OFFSET ? COMPRESSION_TYPE_OFFSET + 1 : HEADER_V3_SIZE;
  return {
    ...h,
    version: 3,
    compressionType,
    extraBytes: bytes.slice(extraStart, Math.max(extraStart, h.headerLength)),
  };
}

/** Encode a header into `into` (at least headerLength bytes), byte-exact with decode. */
export function encodeHeader(
  h: Qcow2Header,
  into: Uint8Array = new Uint8Array(h.headerLength),
): Uint8Array {
  if (h.version === 2) {
    HeaderV2.encode({ ...h, magic: QCOW2_MAGIC }, into, 0);
    return into;
  }
  HeaderV3.encode({ ...h, magic: QCOW2_MAGIC }, into, 0);
  if (h.headerLength > COMPRESSION_TYPE_OFFSET) {
    into[COMPRESSION_TYPE_OFFSET] = h.compressionType;
    into.set(h.extraBytes, COMPRESSION_TYPE_OFFSET + 1);
  } else {
    into.set(h.extraBytes, HEADER_V3_SIZE);
  }
  return into;
}

/**
 * Validate a decoded header the way QEMU does on open: ranges, alignment, table size bounds,
 * and unknown incompatible features (named from the image's feature-name table when it has
 * one). Throws a typed error; returns nothing.
 */
export function validateHeader(
  h: Qcow2Header,
  options: { featureName?: (type: "incompatible", bit: number) => string | undefined } = {},
): void {
  if (h.clusterBits < 9 || h.clusterBits > 21) {
    throw bad(`cluster_bits ${h.clusterBits} is outside 9..21 (cluster sizes 512 B to 2 MiB)`, 20);
  }
  const clusterSize = 2 ** h.clusterBits;
  const unknown = h.incompatibleFeatures & ~IncompatibleFeatures.knownMask;
  if (unknown !== 0n) {
    const names: string[] = [];
    let anonymous = 0n;
    for (let bit = 0; bit < 64; bit++) {
      if (((unknown >> BigInt(bit)) & 1n) === 0n) continue;
      const name = options.featureName?.("incompatible", bit);
      if (name) names.push(name);
      else anonymous |= 1n << BigInt(bit);
    }
    // QEMU prints the mask of unnamed bits in hex without leading zeros.
    if (anonymous !== 0n) names.push(`Unknown incompatible feature: ${anonymous.toString(16)}`);
    throw new UnsupportedFeatureError(`unsupported qcow2 feature(s): ${names.join(", ")}`, names, {
      offset: 72,
    });
  }
  if (h.refcountOrder > 6) {
    throw bad(`refcount_order ${h.refcountOrder} is larger than 6 (64-bit refcounts)`, 96);
  }
  if (h.cryptMethod > 2) {
    throw bad(`crypt_method ${h.cryptMethod} is not 0 (none), 1 (AES) or 2 (LUKS)`, 32);
  }
  if (h.backingFileOffset !== 0) {
    if (h.backingFileOffset > clusterSize) {
      throw bad(
        `backing file name offset ${hex(h.backingFileOffset)} is outside the first cluster (${clusterSize} bytes)`,
        8,
      );
    }
    if (
      h.backingFileSize > MAX_BACKING_NAME ||
      h.backingFileSize > clusterSize - h.backingFileOffset
    ) {
      throw bad(
        `backing file name of ${h.backingFileSize} bytes is too long (at most ${Math.min(MAX_BACKING_NAME, clusterSize - h.backingFileOffset)})`,
        16,
      );
    }
  }
  const features = IncompatibleFeatures.decode(h.incompatibleFeatures);
  if (features.has("extendedL2") && h.clusterBits < 14) {
    throw bad(
      `extended L2 entries need clusters of at least 16384 bytes, this image has ${clusterSize}`,
      20,
    );
  }
  if (h.compressionType > 1) {
    throw new UnsupportedFeatureError(
      `unknown compression type ${h.compressionType} (known: 0 zlib, 1 zstd)`,
      [`compression type ${h.compressionType}`],
      { offset: COMPRESSION_TYPE_OFFSET },
    );
  }
  if (h.compressionType !== 0 && !features.has("compressionType")) {
    throw bad(
      `compression type ${h.compressionType} is set but the compression-type feature bit is not`,
      72,
    );
  }
  if (h.compressionType === 0 && features.has("compressionType")) {
    throw bad(`the compression-type feature bit is set for the default (zlib) compression`, 72);
  }
  // L1 table.
  const l2Entries = clusterSize / (features.has("extendedL2") ? 16 : 8);
  if (h.l1Size > MAX_L1_BYTES / 8) {
    throw bad(
      `active L1 table of ${h.l1Size} entries is larger than ${MAX_L1_BYTES / 8} (32 MiB)`,
      36,
    );
  }
  const needed = Math.ceil(h.size / (clusterSize * l2Entries));
  if (h.l1Size < needed) {
    throw bad(
      `L1 table of ${h.l1Size} entries is too small for a ${h.size}-byte disk (needs ${needed})`,
      36,
    );
  }
  if (h.l1Size > 0 && !isPow2Aligned(h.l1TableOffset, clusterSize)) {
    throw bad(
      `L1 table offset ${hex(h.l1TableOffset)} is not aligned to the cluster size ${clusterSize}`,
      40,
    );
  }
  // Refcount table.
  if (h.refcountTableClusters > MAX_REFTABLE_BYTES / clusterSize) {
    throw bad(
      `refcount table of ${h.refcountTableClusters} clusters is larger than ${MAX_REFTABLE_BYTES / clusterSize} (8 MiB)`,
      56,
    );
  }
  if (!isPow2Aligned(h.refcountTableOffset, clusterSize)) {
    throw bad(
      `refcount table offset ${hex(h.refcountTableOffset)} is not aligned to the cluster size ${clusterSize}`,
      48,
    );
  }
  // A table at offset 0 (over the header) is opened, as QEMU opens it: a read-only open never
  // reads it, the checker reports what it counts, and a read-write open refuses it (layout.ts).
  if (h.refcountTableClusters === 0) {
    throw bad(
      `the image has no refcount table (offset ${hex(h.refcountTableOffset)}, ${h.refcountTableClusters} clusters)`,
      56,
    );
  }
  // Snapshot table.
  if (h.nbSnapshots > MAX_SNAPSHOTS) {
    throw bad(`${h.nbSnapshots} snapshots is more than ${MAX_SNAPSHOTS}`, 60);
  }
  if (h.nbSnapshots > 0 && !isPow2Aligned(h.snapshotsOffset, clusterSize)) {
    throw bad(
      `snapshot table offset ${hex(h.snapshotsOffset)} is not aligned to the cluster size ${clusterSize}`,
      64,
    );
  }
}

/**
 * Header fields that change on their own after creation. Each is written alone, as QEMU does:
 * only the bytes of the fields that change, never the rest of the header area.
 */
export type UpdatableHeaderField =
  | "size"
  | "l1Size"
  | "l1TableOffset"
  | "refcountTableOffset"
  | "refcountTableClusters"
  | "nbSnapshots"
  | "snapshotsOffset"
  | "incompatibleFeatures"
  | "compatibleFeatures"
  | "autoclearFeatures"
  | "refcountOrder";

/** Byte offset and width of each {@link UpdatableHeaderField} (all inside the first 100 bytes). */
export const UPDATABLE_HEADER_FIELDS: Readonly<
  Record<UpdatableHeaderField, { readonly offset: number; readonly width: number }>
> = {
  size: { offset: HEADER_V3_FIELDS.size.offset, width: 8 },
  l1Size: { offset: HEADER_V3_FIELDS.l1Size.offset, width: 4 },
  l1TableOffset: { offset: HEADER_V3_FIELDS.l1TableOffset.offset, width: 8 },
  refcountTableOffset: { offset: HEADER_V3_FIELDS.refcountTableOffset.offset, width: 8 },
  refcountTableClusters: { offset: HEADER_V3_FIELDS.refcountTableClusters.offset, width: 4 },
  nbSnapshots: { offset: HEADER_V3_FIELDS.nbSnapshots.offset, width: 4 },
  snapshotsOffset: { offset: HEADER_V3_FIELDS.snapshotsOffset.offset, width: 8 },
  incompatibleFeatures: { offset: HEADER_V3_FIELDS.incompatibleFeatures.offset, width: 8 },
  compatibleFeatures: { offset: HEADER_V3_FIELDS.compatibleFeatures.offset, width: 8 },
  autoclearFeatures: { offset: HEADER_V3_FIELDS.autoclearFeatures.offset, width: 8 },
  // Changed together with the refcount table (amend's refcount width change): one write of 52 bytes at 48.
  refcountOrder: { offset: HEADER_V3_FIELDS.refcountOrder.offset, width: 4 },
};

/**
 * The one contiguous byte run that holds `fields`: from the first field's start to the last
 * field's end (fields in between are rewritten with their current value). The dirty bit alone
 * is 8 bytes at 72; a refcount table switch (offset and clusters) is 12 bytes at 48.
 */
export function headerFieldSpan(fields: Iterable<UpdatableHeaderField>): {
  readonly offset: number;
  readonly length: number;
} {
  let lo = Number.MAX_SAFE_INTEGER;
  let hi = 0;
  for (const f of fields) {
    const spec = UPDATABLE_HEADER_FIELDS[f];
    lo = Math.min(lo, spec.offset);
    hi = Math.max(hi, spec.offset + spec.width);
  }
  return hi === 0 ? { offset: 0, length: 0 } : { offset: lo, length: hi - lo };
}

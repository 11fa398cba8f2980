/**
 * Hostile images, in the spirit of QEMU's iotest 080: every header field and table entry that
 * can be out of range, misaligned, overlapping or past EOF is poked into a fixture (in memory),
 * and the driver must refuse with the right typed error and a message that names the field,
 * the value and the bound — never a TypeError/RangeError from JavaScript itself.
 */
import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { getFixture } from "@qimg/fixtures";
import {
  CorruptImageError,
  ErrorCode,
  FormatError,
  InvalidArgumentError,
  QimgError,
  RangeFormatError,
  UnsupportedFeatureError,
} from "@qimg/structs";
import type { Qcow2Image, Qcow2OpenOptions } from "../src/index.js";
import {
  H,
  extensionsOf,
  l2OffsetOf,
  layoutOf,
  loadFixture,
  openBytes,
  peekU32,
  peekU64,
  pokeBytes,
  pokeU16,
  pokeU32,
  pokeU64,
  pokeU8,
} from "./poke.js";

type ErrorClass =
  | typeof FormatError
  | typeof UnsupportedFeatureError
  | typeof CorruptImageError
  | typeof RangeFormatError
  | typeof InvalidArgumentError;

const CODES = new Map<ErrorClass, string>([
  [FormatError, ErrorCode.FORMAT],
  [UnsupportedFeatureError, ErrorCode.UNSUPPORTED_FEATURE],
  [CorruptImageError, ErrorCode.CORRUPT_IMAGE],
  [RangeFormatError, ErrorCode.RANGE],
  [InvalidArgumentError, ErrorCode.INVALID_ARGUMENT],
]);

/** Await `p` and return what it threw (fails the test if it did not throw). */
async function caught(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (e) {
    return e;
  }
  expect.fail("expected a rejection, but the operation succeeded");
}

/** The error must be exactly `cls` (not a subclass, not a JS builtin) with a matching message. */
function expectError(
  err: unknown,
  cls: ErrorClass,
  message: RegExp,
  offset?: number,
): asserts err is QimgError {
  if (!(err instanceof QimgError)) {
    // Show the real thing: a TypeError/RangeError here is a driver crash.
    throw new Error(`expected ${cls.name}, got ${String(err)}`, { cause: err });
  }
  expect(err.constructor, `${err.name}: ${err.message}`).toBe(cls);
  expect(err.code).toBe(CODES.get(cls));
  expect(err.message).toMatch(message);
  if (offset !== undefined) expect(err.offset).toBe(offset);
}

async function expectOpenError(
  bytes: Uint8Array,
  cls: ErrorClass,
  message: RegExp,
  options: { offset?: number; open?: Qcow2OpenOptions } = {},
): Promise<QimgError> {
  // A read-write open gets a writable backend, so the refusal comes from the image itself.
  const writable = options.open?.readOnly === false;
  const err = await caught(openBytes(bytes, options.open, writable).then((img) => img.close()));
  expectError(err, cls, message, options.offset);
  return err;
}

/** Poke a fixture copy and return it. */
function poked(name: string, poke: (b: Uint8Array) => void): Uint8Array {
  const b = loadFixture(name);
  poke(b);
  return b;
}

async function withImage<T>(
  bytes: Uint8Array,
  body: (img: Qcow2Image) => Promise<T>,
  options?: Qcow2OpenOptions,
): Promise<T> {
  const img = await openBytes(bytes, options);
  try {
    return await body(img);
  } finally {
    await img.close();
  }
}

async function readAll(img: Qcow2Image): Promise<Uint8Array> {
  const out = new Uint8Array(img.virtualSize);
  await img.read(0, out);
  return out;
}

function sha256(b: Uint8Array): string {
  return createHash("sha256").update(b).digest("hex");
}

const V3 = "qcow2-v3"; // cluster 64 KiB, 4 MiB disk, 512 KiB file, L1 at 0x30000, L2 at 0x40000
const FILE_V3 = 524288;

describe("header fields", () => {
  it("bad magic", async () => {
    const b = poked(V3, (x) => pokeU32(x, H.magic, 0x514649fa));
    await expectOpenError(
      b,
      FormatError,
      /^not a qcow2 image: magic 0x514649fa is not 0x514649fb$/,
      { offset: 0 },
    );
  });

  it("files too short for a header", async () => {
    await expectOpenError(
      new Uint8Array(0),
      FormatError,
      /^qcow2 header needs 72 bytes, the file has 0$/,
    );
    await expectOpenError(
      loadFixture(V3).slice(0, 50),
      FormatError,
      /^qcow2 header needs 72 bytes, the file has 50$/,
    );
    await expectOpenError(
      loadFixture(V3).slice(0, 100),
      FormatError,
      /^qcow2 v3 header needs 104 bytes, the file has 100$/,
    );
    await expectOpenError(
      loadFixture(V3).slice(0, 108),
      FormatError,
      /^qcow2 header: header_length 112 is past the end of the 108-byte file$/,
      { offset: 100 },
    );
  });

  it.each([1, 4, 0xffff_ffff])("version %d", async (version) => {
    const b = poked(V3, (x) => pokeU32(x, H.version, version));
    const err = await expectOpenError(
      b,
      UnsupportedFeatureError,
      new RegExp(`^unsupported qcow2 version ${version} \\(supported: 2, 3\\)$`),
      { offset: 4 },
    );
    expect((err as UnsupportedFeatureError).features).toEqual([`version ${version}`]);
  });

  it.each([
    [V3, 8],
    [V3, 22],
    [V3, 0],
    ["qcow2-v2", 8],
    ["qcow2-v2", 22],
    [V3, 0xffff_ffff],
  ])("%s cluster_bits %d", async (name, bits) => {
    const b = poked(name, (x) => pokeU32(x, H.clusterBits, bits));
    await expectOpenError(
      b,
      FormatError,
      new RegExp(
        `^qcow2 header: cluster_bits ${bits} is outside 9\\.\\.21 \\(cluster sizes 512 B to 2 MiB\\)$`,
      ),
      { offset: 20 },
    );
  });

  it("cluster_bits 30 (fixture qcow2-broken-cluster-bits, which qemu-img refuses too)", async () => {
    expect(getFixture("qcow2-broken-cluster-bits").info).toBeNull();
    await expectOpenError(
      loadFixture("qcow2-broken-cluster-bits"),
      FormatError,
      /cluster_bits 30 is outside 9\.\.21/,
    );
  });

  it("header_length < 104", async () => {
    for (const len of [0, 72, 96]) {
      await expectOpenError(
        poked(V3, (x) => pokeU32(x, H.headerLength, len)),
        FormatError,
        new RegExp(`^qcow2 header: header_length ${len} is shorter than 104$`),
        { offset: 100 },
      );
    }
  });

  it("header_length not a multiple of 8", async () => {
    for (const len of [105, 108, 111]) {
      await expectOpenError(
        poked(V3, (x) => pokeU32(x, H.headerLength, len)),
        FormatError,
        new RegExp(`^qcow2 header: header_length ${len} is not a multiple of 8$`),
        { offset: 100 },
      );
    }
  });

  it("header_length larger than the cluster", async () => {
    await expectOpenError(
      poked(V3, (x) => pokeU32(x, H.headerLength, 65536 + 8)),
      FormatError,
      /^qcow2 header: header_length 65544 exceeds the cluster size 65536$/,
      { offset: 100 },
    );
    await expectOpenError(
      poked("qcow2-cluster-512", (x) => pokeU32(x, H.headerLength, 520)),
      FormatError,
      /^qcow2 header: header_length 520 exceeds the cluster size 512$/,
    );
    await expectOpenError(
      poked(V3, (x) => pokeU32(x, H.headerLength, 0xffff_fff8)),
      FormatError,
      /^qcow2 header: header_length 4294967288 exceeds the cluster size 65536$/,
    );
  });

  it("backing_file_offset beyond the first cluster", async () => {
    const b = poked(V3, (x) => {
      pokeU64(x, H.backingFileOffset, 0x10008);
      pokeU32(x, H.backingFileSize, 4);
    });
    await expectOpenError(
      b,
      FormatError,
      /^qcow2 header: backing file name offset 0x10008 is outside the first cluster \(65536 bytes\)$/,
      { offset: 8 },
    );
  });

  it("backing_file_size 1024", async () => {
    // qcow2-mixed has a real backing file name at 0x210.
    const b = poked("qcow2-mixed", (x) => pokeU32(x, H.backingFileSize, 1024));
    await expectOpenError(
      b,
      FormatError,
      /^qcow2 header: backing file name of 1024 bytes is too long \(at most 1023\)$/,
      {
        offset: 16,
      },
    );
  });

  it("backing file name running past the first cluster", async () => {
    const b = poked(V3, (x) => {
      pokeU64(x, H.backingFileOffset, 65536 - 16);
      pokeU32(x, H.backingFileSize, 32);
    });
    await expectOpenError(
      b,
      FormatError,
      /^qcow2 header: backing file name of 32 bytes is too long \(at most 16\)$/,
    );
  });

  it("refcount_order 7", async () => {
    await expectOpenError(
      poked(V3, (x) => pokeU32(x, H.refcountOrder, 7)),
      FormatError,
      /^qcow2 header: refcount_order 7 is larger than 6 \(64-bit refcounts\)$/,
      { offset: 96 },
    );
  });

  it.each([
    [1, "aes"],
    [2, "luks"],
  ])("crypt_method %d: encryption is not supported", async (method, what) => {
    const err = await expectOpenError(
      poked(V3, (x) => pokeU32(x, H.cryptMethod, method)),
      UnsupportedFeatureError,
      new RegExp(`^encryption is not supported \\(crypt_method ${what}\\)$`),
      { offset: 32 },
    );
    expect((err as UnsupportedFeatureError).features).toEqual(["encryption"]);
  });

  it("crypt_method 3", async () => {
    await expectOpenError(
      poked(V3, (x) => pokeU32(x, H.cryptMethod, 3)),
      FormatError,
      /^qcow2 header: crypt_method 3 is not 0 \(none\), 1 \(AES\) or 2 \(LUKS\)$/,
      { offset: 32 },
    );
  });

  it("l1_size too small for the disk size", async () => {
    await expectOpenError(
      poked(V3, (x) => pokeU32(x, H.l1Size, 0)),
      FormatError,
      /^qcow2 header: L1 table of 0 entries is too small for a 4194304-byte disk \(needs 1\)$/,
      { offset: 36 },
    );
    // 512-byte clusters: one L2 table maps 32 KiB, so 1 MiB needs 32 entries.
    await expectOpenError(
      poked("qcow2-cluster-512", (x) => pokeU32(x, H.l1Size, 31)),
      FormatError,
      /^qcow2 header: L1 table of 31 entries is too small for a 1048576-byte disk \(needs 32\)$/,
    );
    // A larger disk with the same L1: 2^40 bytes need 2048 entries of 512 MiB each.
    await expectOpenError(
      poked(V3, (x) => pokeU64(x, H.size, 2 ** 40)),
      FormatError,
      /^qcow2 header: L1 table of 1 entries is too small for a 1099511627776-byte disk \(needs 2048\)$/,
    );
  });

  it("l1_size larger than 32 MiB worth of entries", async () => {
    for (const n of [4 * 1024 * 1024 + 1, 0x1000_0000, 0xffff_ffff]) {
      await expectOpenError(
        poked(V3, (x) => pokeU32(x, H.l1Size, n)),
        FormatError,
        new RegExp(
          `^qcow2 header: active L1 table of ${n} entries is larger than 4194304 \\(32 MiB\\)$`,
        ),
        { offset: 36 },
      );
    }
    await expectOpenError(
      loadFixture("qcow2-broken-l1-size-huge"),
      FormatError,
      /active L1 table of 268435456 entries is larger than 4194304/,
    );
  });

  it("l1_table_offset misaligned", async () => {
    await expectOpenError(
      poked(V3, (x) => pokeU64(x, H.l1TableOffset, 0x30200)),
      FormatError,
      /^qcow2 header: L1 table offset 0x30200 is not aligned to the cluster size 65536$/,
      { offset: 40 },
    );
  });

  it("L1 table past EOF: read as zeros read-only (as qemu-img does), refused read-write", async () => {
    await withImage(
      poked(V3, (x) => pokeU64(x, H.l1TableOffset, 0x100000)),
      async (img) => {
        expect(sha256(await readAll(img))).toBe(sha256(new Uint8Array(img.virtualSize)));
      },
    );
    await expectOpenError(
      poked(V3, (x) => pokeU64(x, H.l1TableOffset, 0x100000)),
      CorruptImageError,
      /^L1 table at 0x100000 \(8 bytes\) extends past the end of the file \(524288 bytes\)$/,
      { offset: 0x100000, open: { readOnly: false } },
    );
    // Starts inside the file, ends past it.
    await expectOpenError(
      poked(V3, (x) => {
        pokeU64(x, H.l1TableOffset, 0x70000);
        pokeU32(x, H.l1Size, 8193);
      }),
      CorruptImageError,
      /^L1 table at 0x70000 \(65544 bytes\) extends past the end of the file \(524288 bytes\)$/,
      { open: { readOnly: false } },
    );
    // Far past anything (but below 2^53).
    await expectOpenError(
      poked(V3, (x) => pokeU64(x, H.l1TableOffset, 2 ** 52)),
      CorruptImageError,
      /^L1 table at 0x10000000000000 \(8 bytes\) extends past the end of the file/,
      { open: { readOnly: false } },
    );
  });

  it("l1_table_offset 0 overlaps the header (refused read-write; qemu-img opens it)", async () => {
    await expectOpenError(
      poked(V3, (x) => pokeU64(x, H.l1TableOffset, 0)),
      CorruptImageError,
      /^L1 table offset is 0 \(it would overlap the header\)$/,
      { offset: 40, open: { readOnly: false } },
    );
  });

  it("refcount_table_offset misaligned", async () => {
    await expectOpenError(
      poked(V3, (x) => pokeU64(x, H.refcountTableOffset, 0x10200)),
      FormatError,
      /^qcow2 header: refcount table offset 0x10200 is not aligned to the cluster size 65536$/,
      { offset: 48 },
    );
  });

  it("refcount_table_offset 0 / refcount_table_clusters 0", async () => {
    // Offset 0: opened read-only as qemu-img opens it (iotest-080.test.ts), refused read-write.
    const zero = poked(V3, (x) => pokeU64(x, H.refcountTableOffset, 0));
    await withImage(zero, async (img) => expect(img.virtualSize).toBe(4 * 1024 * 1024));
    await expectOpenError(
      zero,
      CorruptImageError,
      /^refcount table offset is 0 \(it would overlap the header\); cannot be opened read\/write$/,
      { offset: 48, open: { readOnly: false } },
    );
    await expectOpenError(
      poked(V3, (x) => pokeU32(x, H.refcountTableClusters, 0)),
      FormatError,
      /^qcow2 header: the image has no refcount table \(offset 0x10000, 0 clusters\)$/,
    );
  });

  it("refcount_table_clusters larger than 8 MiB worth", async () => {
    await expectOpenError(
      poked(V3, (x) => pokeU32(x, H.refcountTableClusters, 129)),
      FormatError,
      /^qcow2 header: refcount table of 129 clusters is larger than 128 \(8 MiB\)$/,
      { offset: 56 },
    );
    await expectOpenError(
      poked("qcow2-cluster-512", (x) => pokeU32(x, H.refcountTableClusters, 0xffff_ffff)),
      FormatError,
      /^qcow2 header: refcount table of 4294967295 clusters is larger than 16384 \(8 MiB\)$/,
    );
  });

  it("nb_snapshots > 65536", async () => {
    await expectOpenError(
      poked("qcow2-snapshots", (x) => pokeU32(x, H.nbSnapshots, 65537)),
      FormatError,
      /^qcow2 header: 65537 snapshots is more than 65536$/,
      { offset: 60 },
    );
    await expectOpenError(
      poked(V3, (x) => pokeU32(x, H.nbSnapshots, 0xffff_ffff)),
      FormatError,
      /^qcow2 header: 4294967295 snapshots is more than 65536$/,
    );
  });

  it("snapshots_offset misaligned", async () => {
    await expectOpenError(
      poked("qcow2-snapshots", (x) => pokeU64(x, H.snapshotsOffset, 0x100200)),
      FormatError,
      /^qcow2 header: snapshot table offset 0x100200 is not aligned to the cluster size 65536$/,
      { offset: 64 },
    );
  });

  it("a misaligned snapshots_offset is ignored when nb_snapshots is 0", async () => {
    const b = poked(V3, (x) => pokeU64(x, H.snapshotsOffset, 0x123));
    await withImage(b, async (img) => {
      expect(img.snapshots).toEqual([]);
    });
  });

  it("snapshot table past EOF reads as zeros, as qemu-img reads it (iotest-080.test.ts)", async () => {
    // qcow2-snapshots: 3 snapshots at 0x100000 in a 0x120000-byte file.
    await withImage(
      poked("qcow2-snapshots", (x) => pokeU64(x, H.snapshotsOffset, 0x200000)),
      async (img) => {
        expect(img.snapshots.map((s) => [s.id, s.name, s.l1Size, s.extraData.byteLength])).toEqual([
          ["", "", 0, 0],
          ["", "", 0, 0],
          ["", "", 0, 0],
        ]);
      },
    );
    // The table starts in the last cluster and entry 0's name runs off the end: zeros.
    const b = loadFixture("qcow2-snapshots");
    const last = b.length - 65536;
    pokeBytes(b, last, b.subarray(0x100000, 0x100000 + 65536));
    pokeU64(b, H.snapshotsOffset, last);
    pokeU16(b, last + 14, 0xffff); // name_size of entry 0
    await withImage(b, async (img) => {
      expect(img.snapshots[0]!.name.length).toBeGreaterThan(0);
      expect(img.snapshots).toHaveLength(3);
    });
  });

  it("more snapshots than the table holds: empty entries, as qemu-img lists them", async () => {
    await withImage(
      poked("qcow2-snapshots", (x) => pokeU32(x, H.nbSnapshots, 100)),
      async (img) => {
        expect(img.snapshots).toHaveLength(100);
        expect(img.snapshots[3]).toMatchObject({ id: "", name: "", l1Size: 0 });
        expect(img.snapshots[3]!.extraData.byteLength).toBe(0);
      },
    );
  });

  it("snapshot extra_data_size > 1024", async () => {
    await expectOpenError(
      poked("qcow2-snapshots", (x) => pokeU32(x, 0x100000 + 36, 1025)),
      FormatError,
      /^qcow2 snapshot entry 0 at 0x100000: extra data size 1025 is larger than 1024$/,
      { offset: 0x100000 + 36 },
    );
    await expectOpenError(
      poked("qcow2-snapshots-v2", (x) => pokeU32(x, 0x70000 + 36, 0xffff_ffff)),
      FormatError,
      /^qcow2 snapshot entry 0 at 0x70000: extra data size 4294967295 is larger than 1024$/,
    );
  });

  it("snapshot extra_data_size < 16 in a v3 image (and in v2): decoded, as qemu-img does", async () => {
    await withImage(
      // Only entry 0 (the shorter extra data shifts the entries after it).
      poked("qcow2-snapshots", (x) => {
        pokeU32(x, 0x100000 + 36, 8);
        pokeU32(x, H.nbSnapshots, 1);
      }),
      async (img) => {
        expect(img.snapshots[0]!.extraData.byteLength).toBe(8);
        expect(img.snapshots[0]!.diskSize).toBeUndefined();
      },
    );
    // v2 images may have less (or no) extra data; the entry is still decoded.
    const v2 = loadFixture("qcow2-snapshots-v2");
    expect(peekU32(v2, 0x70000 + 36)).toBeGreaterThanOrEqual(8);
    pokeU32(v2, 0x70000 + 36, 8);
    await withImage(v2, async (img) => {
      expect(img.snapshots).toHaveLength(1);
      expect(img.snapshots[0]?.diskSize).toBeUndefined();
    });
  });

  it("snapshot L1 table of more than 32 MiB (opens read-only as in qemu-img, refused read-write)", async () => {
    const b = poked("qcow2-snapshots", (x) => pokeU32(x, 0x100000 + 8, 4 * 1024 * 1024 + 1));
    await withImage(b, async (img) => expect(img.snapshots[0]!.l1Size).toBe(4194305));
    await expectOpenError(
      b,
      CorruptImageError,
      /^qcow2 snapshot entry 0: L1 table of 4194305 entries is larger than 32 MiB; cannot be opened read\/write$/,
      { offset: 0x100000 + 8, open: { readOnly: false } },
    );
  });

  it("size above 2^53", async () => {
    await expectOpenError(
      poked(V3, (x) => pokeU64(x, H.size, 2n ** 53n)),
      RangeFormatError,
      /^qcow2 v3 header field size 0x20000000000000 is larger than 2\^53-1$/,
      { offset: 24 },
    );
    await expectOpenError(
      poked("qcow2-v2", (x) => pokeU64(x, H.size, 0xffff_ffff_ffff_ffffn)),
      RangeFormatError,
      /^qcow2 v2 header field size 0xffffffffffffffff is larger than 2\^53-1$/,
    );
  });

  it("other u64 header fields above 2^53", async () => {
    for (const [field, at] of [
      ["l1TableOffset", H.l1TableOffset],
      ["refcountTableOffset", H.refcountTableOffset],
      ["snapshotsOffset", H.snapshotsOffset],
      ["backingFileOffset", H.backingFileOffset],
    ] as const) {
      await expectOpenError(
        poked(V3, (x) => pokeU64(x, at, 1n << 63n)),
        RangeFormatError,
        new RegExp(`^qcow2 v3 header field ${field} 0x8000000000000000 is larger than 2\\^53-1$`),
        { offset: at },
      );
    }
  });

  it("unknown incompatible feature bit 60, without a name", async () => {
    const err = await expectOpenError(
      poked(V3, (x) => pokeU64(x, H.incompatibleFeatures, 1n << 60n)),
      UnsupportedFeatureError,
      /^unsupported qcow2 feature\(s\): Unknown incompatible feature: 1000000000000000$/,
      { offset: 72 },
    );
    expect((err as UnsupportedFeatureError).features).toEqual([
      "Unknown incompatible feature: 1000000000000000",
    ]);
    // v2 images have no feature fields: the same bytes are ignored there (they are past the header).
  });

  it("unknown incompatible feature bit 60, named by the feature-name table", async () => {
    const b = loadFixture(V3);
    const table = extensionsOf(b).find((e) => e.type === 0x6803f857);
    expect(table).toBeDefined();
    // Overwrite the last entry (autoclear bit 1 "raw external data") with one for incompat bit 60.
    const entry = table!.offset + 8 + table!.length - 48;
    const name = new Uint8Array(46);
    name.set(new TextEncoder().encode("hostile feature"));
    pokeU8(b, entry, 0);
    pokeU8(b, entry + 1, 60);
    pokeBytes(b, entry + 2, name);
    pokeU64(b, H.incompatibleFeatures, 1n << 60n);
    const err = await expectOpenError(
      b,
      UnsupportedFeatureError,
      /^unsupported qcow2 feature\(s\): hostile feature$/,
    );
    expect((err as UnsupportedFeatureError).features).toEqual(["hostile feature"]);
    // A named and an unnamed bit together: both are reported.
    pokeU64(b, H.incompatibleFeatures, (1n << 60n) | (1n << 61n) | 1n);
    const both = await expectOpenError(
      b,
      UnsupportedFeatureError,
      /^unsupported qcow2 feature\(s\): hostile feature, Unknown incompatible feature: 2000000000000000$/,
    );
    expect((both as UnsupportedFeatureError).features).toEqual([
      "hostile feature",
      "Unknown incompatible feature: 2000000000000000",
    ]);
  });

  it("unknown compatible and autoclear bits are ignored", async () => {
    const b = poked(V3, (x) => {
      pokeU64(x, H.compatibleFeatures, 1n << 63n);
      pokeU64(x, H.autoclearFeatures, 1n << 40n);
    });
    const original = await withImage(loadFixture(V3), readAll);
    await withImage(b, async (img) => {
      expect(img.info().features.compatible).toEqual(["compatible bit 63"]);
      expect(sha256(await readAll(img))).toBe(sha256(original));
    });
  });

  it("compression type 2 (with the compression-type bit)", async () => {
    const b = poked("qcow2-compressed-zstd", (x) => pokeU8(x, H.compressionType, 2));
    const err = await expectOpenError(
      b,
      UnsupportedFeatureError,
      /^unknown compression type 2 \(known: 0 zlib, 1 zstd\)$/,
      {
        offset: 104,
      },
    );
    expect((err as UnsupportedFeatureError).features).toEqual(["compression type 2"]);
  });

  it("compression type 1 without the compression-type bit", async () => {
    await expectOpenError(
      poked(V3, (x) => pokeU8(x, H.compressionType, 1)),
      FormatError,
      /^qcow2 header: compression type 1 is set but the compression-type feature bit is not$/,
      { offset: 72 },
    );
  });

  it("compression-type bit with the default (zlib) type", async () => {
    await expectOpenError(
      poked("qcow2-compressed-zstd", (x) => pokeU8(x, H.compressionType, 0)),
      FormatError,
      /^qcow2 header: the compression-type feature bit is set for the default \(zlib\) compression$/,
    );
  });

  it("compression type byte is not read when header_length is 104", async () => {
    // header_length 104: byte 104 is not part of the header (it is the start of the extension
    // area, zero here = end of extensions), so a stray compression byte cannot be read.
    const b = poked(V3, (x) => pokeU32(x, H.headerLength, 104));
    await withImage(b, async (img) => {
      expect(img.info().compressionType).toBe("zlib");
      expect(img.featureNames).toEqual([]);
    });
  });

  it("extended L2 entries with cluster_bits 13", async () => {
    await expectOpenError(
      poked("qcow2-extended-l2", (x) => pokeU32(x, H.clusterBits, 13)),
      FormatError,
      /^qcow2 header: extended L2 entries need clusters of at least 16384 bytes, this image has 8192$/,
      { offset: 20 },
    );
  });

  it("header extension whose length runs past the cluster", async () => {
    const b = poked(V3, (x) => pokeU32(x, 112 + 4, 0x10000));
    await expectOpenError(
      b,
      FormatError,
      /^qcow2 header extension 0x6803f857 at 0x70 has length 65536, past the end of the header area at 0x10000$/,
      { offset: 0x70 },
    );
    await expectOpenError(
      poked(V3, (x) => pokeU32(x, 112 + 4, 0xffff_ffff)),
      FormatError,
      /^qcow2 header extension 0x6803f857 at 0x70 has length 4294967295, past the end of the header area at 0x10000$/,
    );
  });

  it("header extension running into the backing file name", async () => {
    // qcow2-mixed: backing format ext at 0x70, feature table at 0x80 (384 bytes), name at 0x210.
    const b = loadFixture("qcow2-mixed");
    const table = extensionsOf(b).find((e) => e.type === 0x6803f857)!;
    pokeU32(b, table.offset + 4, table.length + 64);
    await expectOpenError(
      b,
      FormatError,
      /^qcow2 header extension 0x6803f857 at 0x80 has length 448, past the end of the header area at 0x210$/,
    );
  });

  it("bitmaps extension pointing past EOF", async () => {
    const b = loadFixture("qcow2-bitmaps");
    const ext = extensionsOf(b).find((e) => e.type === 0x23852875)!;
    pokeU64(b, ext.offset + 8 + 16, 0x1000_0000);
    await expectOpenError(
      b,
      CorruptImageError,
      /^bitmap directory at 0x10000000 \(\d+ bytes, \d+ bitmaps\) is invalid for a 983104-byte file$/,
    );
    const c = loadFixture("qcow2-bitmaps");
    pokeU32(c, ext.offset + 4, 16);
    await expectOpenError(c, FormatError, /^qcow2 bitmaps extension is 16 bytes, needs 24$/);
  });

  it("corrupt bit: read-only open works, read/write open throws", async () => {
    const f = getFixture("qcow2-corrupt-bit");
    const b = loadFixture("qcow2-corrupt-bit");
    await withImage(b, async (img) => {
      expect(img.info().corrupt).toBe(true);
      expect(img.info().features.incompatible).toContain("corrupt bit");
      expect(sha256(await readAll(img))).toBe(f.sha256);
    });
    await expectOpenError(b, CorruptImageError, /corrupt; cannot be opened read\/write/, {
      offset: 72,
      open: { readOnly: false },
    });
    // Poked into a clean image: same.
    const p = poked(V3, (x) => pokeU64(x, H.incompatibleFeatures, 2n));
    await expectOpenError(
      p,
      CorruptImageError,
      /^image is corrupt; cannot be opened read\/write$/,
      { open: { readOnly: false } },
    );
    await withImage(p, async (img) => expect(img.info().corrupt).toBe(true));
  });

  it("dirty bit: read-only open works and reads correctly", async () => {
    const f = getFixture("qcow2-lazy-refcounts-dirty");
    await withImage(loadFixture("qcow2-lazy-refcounts-dirty"), async (img) => {
      expect(img.info().dirty).toBe(true);
      expect(sha256(await readAll(img))).toBe(f.sha256);
    });
    const p = poked(V3, (x) => pokeU64(x, H.incompatibleFeatures, 1n));
    await withImage(p, async (img) => {
      expect(img.info().dirty).toBe(true);
      expect(sha256(await readAll(img))).toBe(getFixture(V3).sha256);
    });
  });
});

describe("table entries", () => {
  /** qcow2-cluster-4k grown to a 4 MiB disk with a 2-entry L1: L1[1] is ours to poke. */
  function twoL2(l1Entry1: bigint): Uint8Array {
    const b = loadFixture("qcow2-cluster-4k");
    const { l1TableOffset } = layoutOf(b);
    pokeU64(b, H.size, 4 * 1024 * 1024);
    pokeU32(b, H.l1Size, 2);
    pokeU64(b, l1TableOffset + 8, l1Entry1);
    return b;
  }

  it("L1 entry with a misaligned L2 offset: reads of its range reject, others work", async () => {
    const original = await withImage(loadFixture("qcow2-cluster-4k"), readAll);
    const b = twoL2(0x8000_0000_0000_4200n);
    await withImage(b, async (img) => {
      const msg = /^L2 table offset 0x4200 in L1 entry 1 is not aligned to the cluster size 4096$/;
      const l1Entry = layoutOf(b).l1TableOffset + 8;
      expectError(
        await caught(img.read(2 * 1024 * 1024, new Uint8Array(4096))),
        CorruptImageError,
        msg,
        l1Entry,
      );
      expectError(
        await caught(img.read(4 * 1024 * 1024 - 1, new Uint8Array(1))),
        CorruptImageError,
        msg,
        l1Entry,
      );
      expectError(
        await caught(img.blockStatus(3 * 1024 * 1024, 4096)),
        CorruptImageError,
        msg,
        l1Entry,
      );
      // A read that spans both L2 ranges fails as a whole.
      expectError(
        await caught(img.read(2 * 1024 * 1024 - 512, new Uint8Array(1024))),
        CorruptImageError,
        msg,
      );
      // The first L2 range still reads what it did.
      const first = new Uint8Array(2 * 1024 * 1024);
      await img.read(0, first);
      expect(sha256(first)).toBe(sha256(original));
      const s = await img.blockStatus(0, 4096);
      expect(s.present).toBe(true);
    });
  });

  it("L1 entry misaligned (fixture qcow2-broken-l1-misaligned)", async () => {
    await withImage(loadFixture("qcow2-broken-l1-misaligned"), async (img) => {
      expectError(
        await caught(img.read(0, new Uint8Array(512))),
        CorruptImageError,
        /^L2 table offset 0x40200 in L1 entry 0 is not aligned to the cluster size 65536$/,
        0x30000,
      );
    });
  });

  it("L1 entry pointing past EOF", async () => {
    const b = poked(V3, (x) => pokeU64(x, layoutOf(x).l1TableOffset, 0x8000_0000_0010_0000n));
    await withImage(b, async (img) => {
      const msg =
        /^L2 table at 0x100000 \(L1 entry 0\) is past the end of the file \(524288 bytes\)$/;
      expectError(await caught(img.read(0, new Uint8Array(512))), CorruptImageError, msg, 0x30000);
      expectError(await caught(img.blockStatus(0, 4096)), CorruptImageError, msg, 0x30000);
    });
    // In the two-L2 image, only the second range is affected.
    const c = twoL2(0x8000_0000_0100_0000n);
    await withImage(c, async (img) => {
      await img.read(0, new Uint8Array(4096));
      expectError(
        await caught(img.read(2 * 1024 * 1024, new Uint8Array(4096))),
        CorruptImageError,
        /^L2 table at 0x1000000 \(L1 entry 1\) is past the end of the file \(49152 bytes\)$/,
      );
    });
  });

  it("L2 entry with a misaligned data offset", async () => {
    const b = loadFixture(V3);
    const l2 = l2OffsetOf(b, 0);
    expect(l2).toBe(0x40000);
    pokeU64(b, l2, 0x8000_0000_0005_0200n);
    await withImage(b, async (img) => {
      const msg =
        /^cluster offset 0x50200 in L2 entry 0 of table 0x40000 is not aligned to the cluster size 65536$/;
      expectError(await caught(img.read(0, new Uint8Array(512))), CorruptImageError, msg, 0x40000);
      expectError(await caught(img.read(65535, new Uint8Array(1))), CorruptImageError, msg);
      expectError(await caught(img.blockStatus(0, img.virtualSize)), CorruptImageError, msg);
      // The next cluster (unallocated) still reads zeros.
      const next = new Uint8Array(65536).fill(0xee);
      await img.read(65536, next);
      expect(next.every((x) => x === 0)).toBe(true);
    });
  });

  it("extended L2: subcluster both allocated and zero", async () => {
    const b = loadFixture("qcow2-extended-l2");
    const l2 = l2OffsetOf(b, 0);
    // Entry 0's bitmap: alloc bits in the low word, zero bits in the high word.
    const bitmap = peekU64(b, l2 + 8);
    expect(bitmap & 1n).toBe(1n);
    pokeU64(b, l2 + 8, bitmap | (1n << 32n));
    await withImage(b, async (img) => {
      const msg = /^subcluster 0 of L2 entry 0 in table 0x40000 is marked both allocated and zero$/;
      expectError(await caught(img.read(0, new Uint8Array(512))), CorruptImageError, msg, l2);
      expectError(await caught(img.blockStatus(0, 2048)), CorruptImageError, msg, l2);
      // Subcluster 1 (2 KiB in) is still fine.
      await img.read(2048, new Uint8Array(2048));
    });
  });

  it("extended L2: allocated subcluster without a host cluster", async () => {
    const b = loadFixture("qcow2-extended-l2");
    const l2 = l2OffsetOf(b, 0);
    expect(peekU64(b, l2 + 16)).toBe(0x8000_0000_0006_0000n);
    expect(peekU64(b, l2 + 24) & 1n).toBe(1n);
    pokeU64(b, l2 + 16, 0n);
    await withImage(b, async (img) => {
      expectError(
        await caught(img.read(65536, new Uint8Array(512))),
        CorruptImageError,
        /^subcluster 0 of L2 entry 1 in table 0x40000 is allocated but the cluster has no host offset$/,
        l2 + 16,
      );
    });
  });

  it("compressed descriptor with host offset 0", async () => {
    const b = loadFixture("qcow2-compressed-zlib");
    const l2 = l2OffsetOf(b, 0);
    expect(peekU64(b, l2) >> 62n).toBe(1n); // compressed
    pokeU64(b, l2, 1n << 62n);
    await withImage(b, async (img) => {
      const msg = /^compressed cluster descriptor in L2 entry 0 of table 0x40000 has offset 0$/;
      expectError(await caught(img.read(0, new Uint8Array(512))), CorruptImageError, msg, l2);
      expectError(await caught(img.blockStatus(0, 512)), CorruptImageError, msg, l2);
    });
  });

  it("compressed descriptor past EOF", async () => {
    const b = loadFixture("qcow2-compressed-zlib");
    const l2 = l2OffsetOf(b, 0);
    pokeU64(b, l2, (1n << 62n) | 0x10_0000n);
    await withImage(b, async (img) => {
      expectError(
        await caught(img.read(0, new Uint8Array(512))),
        CorruptImageError,
        /^compressed cluster at 0x100000 is past the end of the file \(458752 bytes\)$/,
        0x100000,
      );
      // block status does not read the data: it reports a compressed cluster.
      const s = await img.blockStatus(0, 512);
      expect(s).toMatchObject({ present: true, data: true, compressed: true });
    });
  });

  it.each([
    [
      "qcow2-compressed-zlib",
      /^compressed cluster at 0x50000 \(\d+ bytes\) cannot be decompressed: deflate data is invalid \(invalid (block type|code lengths set|distance too far back|stored block lengths)/,
    ],
    [
      "qcow2-compressed-zstd",
      /^compressed cluster at 0x50000 \(\d+ bytes\) cannot be decompressed: zstd data is invalid: /,
    ],
  ] as const)("%s: compressed cluster with garbage bytes", async (name, msg) => {
    const b = loadFixture(name);
    const l2 = l2OffsetOf(b, 0);
    const host = Number(peekU64(b, l2) & 0x3f_ffff_ffff_ffffn);
    expect(host).toBe(0x50000);
    // Deterministic garbage: an LCG, so the bytes are not all alike.
    const junk = new Uint8Array(512);
    let s = 0x1234_5678;
    for (let i = 0; i < junk.length; i++) {
      s = (Math.imul(s, 1103515245) + 12345) >>> 0;
      junk[i] = s >>> 24;
    }
    junk[0] = 0xff; // zlib: block type 3 (reserved); zstd: not the magic
    pokeBytes(b, host, junk);
    await withImage(b, async (img) => {
      const err = await caught(img.read(0, new Uint8Array(512)));
      expectError(err, CorruptImageError, msg);
      // The image stays usable: an uncompressed cluster reads fine afterwards.
      await img.read(4 * 65536, new Uint8Array(512));
    });
  });

  it("compressed cluster whose data is all zeros (an empty stream)", async () => {
    const b = loadFixture("qcow2-compressed-zlib");
    pokeBytes(b, 0x50000, new Uint8Array(512));
    await withImage(b, async (img) => {
      // 0x00 starts a stored block of length 0 / complement 0: inflate rejects it.
      const err = await caught(img.read(0, new Uint8Array(512)));
      expectError(
        err,
        CorruptImageError,
        /^compressed cluster at 0x50000 \(\d+ bytes\) cannot be decompressed: (deflate data is invalid|compressed cluster inflated to \d+ bytes instead of 65536)/,
      );
    });
  });

  it("L2 data offset past EOF reads zeros (qcow2-broken-l2-past-eof, as qemu-img reads it)", async () => {
    const f = getFixture("qcow2-broken-l2-past-eof");
    expect(f.sha256).not.toBeNull();
    await withImage(loadFixture(f.name), async (img) => {
      const all = await readAll(img);
      expect(sha256(all)).toBe(f.sha256);
      expect(all.subarray(0, 65536).every((x) => x === 0)).toBe(true);
      const s = await img.blockStatus(0, 65536);
      expect(s).toMatchObject({ present: true, data: true, hostOffset: 0x4000_0000 });
    });
  });

  it("L2 data offset past EOF (poked) reads zeros for that cluster only", async () => {
    const original = await withImage(loadFixture(V3), readAll);
    expect(original.subarray(0, 65536).some((x) => x !== 0)).toBe(true);
    const b = poked(V3, (x) => pokeU64(x, l2OffsetOf(x, 0), 0x8000_0000_0100_0000n));
    await withImage(b, async (img) => {
      const all = await readAll(img);
      expect(all.subarray(0, 65536).every((x) => x === 0)).toBe(true);
      expect(sha256(all.subarray(65536))).toBe(sha256(original.subarray(65536)));
    });
  });

  it("L1 reserved bits are ignored on read, as QEMU ignores them", async () => {
    const original = await withImage(loadFixture(V3), readAll);
    const b = loadFixture(V3);
    const { l1TableOffset } = layoutOf(b);
    pokeU64(b, l1TableOffset, peekU64(b, l1TableOffset) | 0x7f00_0000_0000_01ffn);
    await withImage(b, async (img) => {
      expect(sha256(await readAll(img))).toBe(sha256(original));
    });
  });

  it("requests past the end of the disk are the caller's error", async () => {
    await withImage(loadFixture(V3), async (img) => {
      expectError(
        await caught(img.read(img.virtualSize - 1, new Uint8Array(2))),
        InvalidArgumentError,
        /^request \[4194303, \+2\) is past the end of the 4194304-byte disk$/,
      );
      expectError(
        await caught(img.blockStatus(-1, 1)),
        InvalidArgumentError,
        /^invalid request: offset -1, length 1$/,
      );
      expectError(
        await caught(img.blockStatus(0, 0)),
        InvalidArgumentError,
        /^block status of an empty range$/,
      );
    });
  });

  it("every fixture-level sanity check still holds for the pristine image", async () => {
    // Guard for the pokes above: the untouched fixture opens and reads what qemu-img reads.
    await withImage(loadFixture(V3), async (img) => {
      expect(img.virtualSize).toBe(4 * 1024 * 1024);
      expect(sha256(await readAll(img))).toBe(getFixture(V3).sha256);
    });
    expect(loadFixture(V3).length).toBe(FILE_V3);
  });
});

describe("fixed after the first fuzzing round", () => {
  it("refuses a zstd frame that declares a huge window before allocating it", async () => {
    const b = loadFixture("qcow2-compressed-zstd");
    pokeBytes(
      b,
      0x50000,
      new Uint8Array([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xa7, 0x21, 0, 0, 1, 2, 3, 4]),
    );
    await withImage(b, async (img) => {
      const err = await caught(img.read(0, new Uint8Array(512)));
      expectError(
        err,
        CorruptImageError,
        /zstd frame declares a \d+-byte window, more than the 8388608 allowed/,
      );
    });
  });

  it("reads an L2 data offset above 2^53 as zeros, as qemu-io does", async () => {
    const b = loadFixture("qcow2-v3");
    const l2 = l2OffsetOf(b, 0);
    pokeBytes(b, l2, new Uint8Array([0x80, 0x80, 0, 0, 0, 0, 0, 0]));
    await withImage(b, async (img) => {
      const buf = new Uint8Array(512).fill(1);
      await img.read(0, buf);
      expect(buf.every((x) => x === 0)).toBe(true);
    });
  });

  it("refuses a zero-flag L2 entry in a version 2 image, as QEMU does", async () => {
    const b = loadFixture("qcow2-v2");
    const l2 = l2OffsetOf(b, 0);
    b[l2 + 7] = b[l2 + 7]! | 1;
    await withImage(b, async (img) => {
      const err = await caught(img.read(0, new Uint8Array(512)));
      expectError(
        err,
        CorruptImageError,
        /zero cluster entry in L2 entry 0 of table 0x[0-9a-f]+ in a version 2 image/,
      );
    });
  });

  it("rounds a virtual size that is not a multiple of 512 down, as qemu-img info shows", async () => {
    const b = loadFixture("qcow2-v3");
    new DataView(b.buffer, b.byteOffset).setBigUint64(24, 4194303n, false);
    await withImage(b, (img) => {
      expect(img.virtualSize).toBe(4193792);
      return Promise.resolve();
    });
  });

  it("takes the first cluster of a deflate stream that inflates to more than a cluster", async () => {
    const zlib = await import("node:zlib");
    const b = loadFixture("qcow2-compressed-zlib");
    const stream = zlib.deflateRawSync(new Uint8Array(128 * 1024).fill(0x41));
    pokeBytes(b, 0x50000, stream);
    await withImage(b, async (img) => {
      const buf = new Uint8Array(65536);
      await img.read(0, buf);
      expect(buf.every((x) => x === 0x41)).toBe(true);
    });
  });
});

import { describe, expect, it } from "vitest";
import { FormatError, UnsupportedFeatureError, tilingProblems } from "@qimg/structs";
import { MemoryBackend } from "@qimg/io";
import {
  QED_HEADER_FIELDS,
  QED_HEADER_SIZE,
  QedHeaderStruct,
  decodeQedHeader,
  encodeQedHeader,
  qedFeatureNames,
  validateQedHeader,
} from "./header.js";
import type { QedHeader } from "./header.js";
import { QED_MAGIC, maxImageSize } from "./constants.js";
import { createQed } from "../create.js";

const base: QedHeader = {
  magic: QED_MAGIC,
  clusterSize: 65536,
  tableSize: 4,
  headerSize: 1,
  features: 0n,
  compatFeatures: 0n,
  autoclearFeatures: 0n,
  l1TableOffset: 65536,
  imageSize: 1 << 30,
  backingFilenameOffset: 0,
  backingFilenameSize: 0,
};
const FILE = 65536 * 5;

function invalid(patch: Partial<QedHeader>, fileSize = FILE): Error {
  try {
    validateQedHeader({ ...base, ...patch }, fileSize);
  } catch (e) {
    return e as Error;
  }
  throw new Error("expected validation to fail");
}

describe("QED header", () => {
  it("fields tile the 64 bytes exactly", () => {
    expect(QED_HEADER_SIZE).toBe(64);
    expect(tilingProblems(QedHeaderStruct)).toEqual([]);
    expect(QED_HEADER_FIELDS.l1TableOffset.offset).toBe(40);
  });

  it("is little-endian with magic QED\\0", () => {
    const bytes = encodeQedHeader(base);
    expect(Array.from(bytes.subarray(0, 4))).toEqual([0x51, 0x45, 0x44, 0x00]);
    expect(Array.from(bytes.subarray(4, 8))).toEqual([0, 0, 1, 0]);
  });

  it("round-trips, keeping unknown bits", () => {
    const h = { ...base, compatFeatures: 0x8000_0000_0000_0001n, autoclearFeatures: 1n << 63n };
    const bytes = encodeQedHeader(h);
    expect(decodeQedHeader(bytes)).toEqual(h);
    expect(encodeQedHeader(decodeQedHeader(bytes))).toEqual(bytes);
  });

  it("round-trips what createQed writes", async () => {
    const m = new MemoryBackend();
    await createQed(m, { size: 10 << 20, backingFile: "base.raw", backingFormat: "raw" });
    const bytes = m.snapshot().subarray(0, 64);
    const h = decodeQedHeader(bytes);
    expect(h.features).toBe(5n);
    expect(h.backingFilenameOffset).toBe(64);
    expect(h.backingFilenameSize).toBe(8);
    expect(encodeQedHeader(h)).toEqual(bytes);
    expect(() => validateQedHeader(h, m.length)).not.toThrow();
  });

  it("refuses a bad magic and a short file", () => {
    const bytes = encodeQedHeader({ ...base, magic: 0x12345678 });
    expect(() => decodeQedHeader(bytes)).toThrow(
      /not a QED image: QED header magic 0x12345678 is not 0x444551/,
    );
    expect(() => decodeQedHeader(new Uint8Array(10))).toThrow(/needs 64 bytes but the file has 10/);
  });

  it("refuses unknown features with the mask", () => {
    const e = invalid({ features: 0x18n });
    expect(e).toBeInstanceOf(UnsupportedFeatureError);
    expect(e.message).toMatch(/^Unsupported QED features: 18\n.*0x0000000000000018/);
    expect((e as UnsupportedFeatureError).features).toEqual(["bit 3", "bit 4"]);
    expect(qedFeatureNames(0x13n)).toEqual(["backingFile", "needCheck", "bit 4"]);
  });

  it("validates sizes with messages naming value and bound", () => {
    expect(invalid({ clusterSize: 3000 }).message).toMatch(
      /cluster_size 3000 is not a power of two in \[4096, 67108864\]/,
    );
    expect(invalid({ clusterSize: 2048 })).toBeInstanceOf(FormatError);
    expect(invalid({ tableSize: 3 }).message).toMatch(
      /table_size 3 is not a power of two in \[1, 16\]/,
    );
    expect(invalid({ tableSize: 32 }).message).toMatch(/table_size 32/);
    expect(invalid({ imageSize: 1000 }).message).toMatch(
      /image_size 1000 is not a multiple of 512/,
    );
    const max = maxImageSize(4096, 1);
    expect(max).toBe(4096 * 512 * 512);
    expect(
      invalid({ clusterSize: 4096, tableSize: 1, imageSize: max + 512, l1TableOffset: 4096 })
        .message,
    ).toMatch(new RegExp(`image_size ${max + 512} is larger than ${max}`));
    expect(invalid({ headerSize: 0 }).message).toMatch(/header_size 0 clusters is outside/);
  });

  it("validates the L1 table offset against alignment, header and file end", () => {
    expect(invalid({ l1TableOffset: 65536 + 512 }).message).toMatch(/L1 table at 0x10200/);
    expect(invalid({ l1TableOffset: 0 }).message).toMatch(/L1 table at 0x0/);
    expect(invalid({}, 65536 * 4).message).toMatch(/file end 0x40000/);
    // A torn last cluster does not count; a torn last sector does (QEMU's block layer rounds
    // the file length up to 512 bytes and reads the missing bytes as zeros).
    expect(invalid({}, FILE - 512).message).toMatch(/L1 table/);
    expect(() => validateQedHeader(base, FILE - 511)).not.toThrow();
    expect(() => validateQedHeader({ ...base, tableSize: 1 }, 65536 * 2)).not.toThrow();
  });

  it("validates the backing file name location", () => {
    const e = invalid({ features: 1n, backingFilenameOffset: 65530, backingFilenameSize: 10 });
    expect(e.message).toMatch(
      /backing file name \[0xfffa, \+10\) ends at 0x10004, past the header end 0x10000/,
    );
  });

  it("reports u64 fields above 2^53-1 as range errors", () => {
    const bytes = encodeQedHeader(base);
    new DataView(bytes.buffer).setUint32(52, 0xffff_ffff, true);
    expect(() => decodeQedHeader(bytes)).toThrow(/imageSize/);
  });
});

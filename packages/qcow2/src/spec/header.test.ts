import fs from "node:fs";
import { describe, expect, it } from "vitest";
import { fieldWidth, tilingProblems, UnsupportedFeatureError } from "@qimg/structs";
import { fixturePath, getFixture, listFixtures } from "@qimg/fixtures";
import {
  HEADER_V3_FIELDS,
  HeaderV2,
  HeaderV3,
  UPDATABLE_HEADER_FIELDS,
  decodeHeader,
  encodeHeader,
  headerFieldSpan,
  validateHeader,
} from "./header.js";
import {
  decodeExtensions,
  encodeExtensions,
  decodeFeatureNames,
  encodeFeatureNames,
  ExtensionType,
} from "./extensions.js";
import { BitmapDirEntry } from "./bitmap-directory.js";
import { SnapshotFixed, SnapshotExtra } from "./snapshot.js";
import { ExtensionPrefix, FeatureNameEntry, BitmapsExtension, FdeExtension } from "./extensions.js";

const goodQcow2 = listFixtures({ format: "qcow2" }).filter(
  (f) => !f.name.includes("cluster-bits") && !f.name.includes("l1-size-huge"),
);

describe("qcow2 header structures", () => {
  it("tile their sizes exactly", () => {
    for (const s of [
      HeaderV2,
      HeaderV3,
      SnapshotFixed,
      SnapshotExtra,
      BitmapDirEntry,
      ExtensionPrefix,
      FeatureNameEntry,
      BitmapsExtension,
      FdeExtension,
    ]) {
      expect(tilingProblems(s)).toEqual([]);
    }
  });

  it.each(goodQcow2.map((f) => [f.name] as const))(
    "%s: header and extensions round-trip byte-exactly",
    (name) => {
      const bytes = new Uint8Array(fs.readFileSync(fixturePath(name)));
      const h = decodeHeader(bytes);
      const encoded = encodeHeader(h);
      expect(encoded).toEqual(bytes.subarray(0, h.headerLength));
      validateHeader(h);
      const cs = 2 ** h.clusterBits;
      const start = h.version === 2 ? 72 : h.headerLength;
      const end = h.backingFileOffset > start ? h.backingFileOffset : cs;
      const exts = decodeExtensions(bytes, start, end);
      const again = encodeExtensions(exts);
      expect(again).toEqual(bytes.subarray(start, start + again.length));
      const info = getFixture(name).info as Record<string, unknown> | null;
      if (info) expect(h.size).toBe(info["virtual-size"]);
    },
  );

  it("reads QEMU's feature-name table", () => {
    const bytes = new Uint8Array(fs.readFileSync(fixturePath("qcow2-v3")));
    const h = decodeHeader(bytes);
    const table = decodeExtensions(bytes, h.headerLength, 2 ** h.clusterBits).find(
      (e) => e.type === ExtensionType.featureNameTable,
    );
    expect(table).toBeDefined();
    const names = decodeFeatureNames(table!.data);
    expect(names).toContainEqual({ type: "incompatible", bit: 0, name: "dirty bit" });
    expect(names).toContainEqual({ type: "compatible", bit: 0, name: "lazy refcounts" });
    expect(encodeFeatureNames(names)).toEqual(table!.data);
  });

  it("keeps unknown header bytes past 104 on a round trip", () => {
    const bytes = new Uint8Array(fs.readFileSync(fixturePath("qcow2-v3")));
    const h = decodeHeader(bytes);
    expect(h.headerLength).toBe(112);
    const patched = bytes.slice();
    patched[110] = 0xab;
    const h2 = decodeHeader(patched);
    expect(encodeHeader(h2)[110]).toBe(0xab);
  });

  it("names unknown incompatible features by bit mask when the image has no name for them", () => {
    const bytes = new Uint8Array(fs.readFileSync(fixturePath("qcow2-v3")));
    const h = { ...decodeHeader(bytes), incompatibleFeatures: 0xe000_0000_0000_0000n };
    expect(() => validateHeader(h)).toThrow(UnsupportedFeatureError);
    expect(() => validateHeader(h)).toThrow("Unknown incompatible feature: e000000000000000");
  });
});

describe("UPDATABLE_HEADER_FIELDS", () => {
  it("names each field's offset and width as the v3 field table does", () => {
    for (const [name, f] of Object.entries(UPDATABLE_HEADER_FIELDS)) {
      const spec = HEADER_V3_FIELDS[name as keyof typeof HEADER_V3_FIELDS];
      expect(f.offset, name).toBe(spec.offset);
      expect(f.width, name).toBe(fieldWidth(spec));
    }
    expect(headerFieldSpan(["incompatibleFeatures"])).toEqual({ offset: 72, length: 8 });
    expect(headerFieldSpan(["refcountTableOffset", "refcountTableClusters"])).toEqual({
      offset: 48,
      length: 12,
    });
  });
});

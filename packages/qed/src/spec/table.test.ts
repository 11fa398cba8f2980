import { describe, expect, it } from "vitest";
import { tilingProblems } from "@qimg/structs";
import {
  QED_ENTRY_TOO_LARGE,
  QED_TABLE_ENTRY_FIELDS,
  QED_TABLE_ENTRY_SIZE,
  QedTable,
  classifyL1Entry,
  classifyL2Entry,
  isValidTableOffset,
} from "./table.js";

const g = { clusterSize: 65536, tableSize: 4, headerSize: 1, fileSize: 65536 * 10 };

describe("QED tables", () => {
  it("entry layout tiles 8 bytes", () => {
    expect(
      tilingProblems({
        name: "QED table entry",
        size: QED_TABLE_ENTRY_SIZE,
        fields: QED_TABLE_ENTRY_FIELDS,
      }),
    ).toEqual([]);
  });

  it("is a little-endian zero-copy view", () => {
    const bytes = new Uint8Array(32);
    const t = new QedTable(bytes);
    expect(t.length).toBe(4);
    t.set(1, 0x1_0000_0000 + 0x20000);
    expect(Array.from(bytes.subarray(8, 16))).toEqual([0, 0, 2, 0, 1, 0, 0, 0]);
    expect(t.get(1)).toBe(0x1_0002_0000);
    bytes.fill(0xff, 16, 24);
    expect(t.get(2)).toBe(QED_ENTRY_TOO_LARGE);
  });

  it("classifies L2 entries", () => {
    expect(classifyL2Entry(0, g)).toBe("unallocated");
    expect(classifyL2Entry(1, g)).toBe("zero");
    expect(classifyL2Entry(65536 * 2, g)).toBe("offset");
    expect(classifyL2Entry(65536 * 2 + 512, g)).toBe("invalid");
    expect(classifyL2Entry(0 + 65536 * 0, g)).toBe("unallocated");
    expect(classifyL2Entry(65536 * 10, g)).toBe("invalid"); // at EOF
    expect(classifyL2Entry(QED_ENTRY_TOO_LARGE, g)).toBe("invalid");
  });

  it("classifies L1 entries (whole table inside the file, no zero marker)", () => {
    expect(classifyL1Entry(1, g)).toBe("invalid");
    expect(classifyL1Entry(65536 * 6, g)).toBe("offset");
    expect(classifyL1Entry(65536 * 7, g)).toBe("invalid"); // last cluster at EOF
    expect(isValidTableOffset(65536 * 9, { ...g, tableSize: 1 })).toBe(true);
    expect(isValidTableOffset(0, g)).toBe(false); // header
  });
});

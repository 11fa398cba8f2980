import { describe, expect, it } from "vitest";
import { CorruptImageError, U64TableView } from "@qimg/structs";
import { validateRefcountTable } from "./refcount-table.js";

function table(...entries: bigint[]): Uint8Array {
  const b = new Uint8Array(512);
  const t = new U64TableView(b, "big");
  entries.forEach((e, i) => t.setBigInt(i, e));
  return b;
}

const base = { tableOffset: 0x200, clusterSize: 512, fileSize: 0x10000 };

describe("validateRefcountTable", () => {
  it("accepts aligned blocks inside the file and empty entries", () => {
    expect(() =>
      validateRefcountTable({ ...base, bytes: table(0x400n, 0n, 0x600n) }),
    ).not.toThrow();
  });

  it("rejects reserved bits", () => {
    expect(() => validateRefcountTable({ ...base, bytes: table(0x400n, 0x601n) })).toThrow(
      /refcount table entry 1 at 0x208 is 0x601: reserved bits 0-8 must be zero/,
    );
  });

  it("rejects misaligned blocks (bits above 8 but below cluster_bits)", () => {
    const b = table(0x2000n, 0x0n, 0x1200n);
    expect(() =>
      validateRefcountTable({ ...base, clusterSize: 0x1000, tableOffset: 0x1000, bytes: b }),
    ).toThrow(
      /refcount block 0x1200 \(refcount table entry 2 at 0x1010\) is not aligned to the cluster size 4096/,
    );
  });

  it("rejects blocks past the end of the file, with the entry's offset", () => {
    try {
      validateRefcountTable({ ...base, bytes: table(0x400n, 0x10000n) });
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(CorruptImageError);
      expect((e as CorruptImageError).offset).toBe(0x208);
      expect((e as Error).message).toMatch(/lies past the end of the file \(size 0x10000\)/);
    }
  });

  it("rejects blocks overlapping the table and offsets beyond 2^53", () => {
    expect(() => validateRefcountTable({ ...base, bytes: table(0x200n) })).toThrow(
      /overlaps the refcount table/,
    );
    expect(() => validateRefcountTable({ ...base, bytes: table(1n << 60n) })).toThrow(
      /beyond 2\^53-1/,
    );
  });
});

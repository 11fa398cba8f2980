import { describe, expect, it } from "vitest";
import { U64TableView } from "@qimg/structs";
import {
  ClusterType as C,
  compressedLayout,
  decodeCompressed,
  encodeCompressed,
  EntryProblem,
  SubclusterType as S,
  clusterType,
  compressedLength,
  compressedOffset,
  entryOffset,
  l1ReservedBits,
  l2EntryProblem,
  l2Format,
  l2OffsetAt,
  l2TypeAt,
  reftableOffset,
  reftableReservedBits,
  subclusterType,
  subclusterTypeAt,
  withCopied,
} from "./l2.js";

describe("compressed cluster descriptors", () => {
  it.each([9, 12, 16, 21])("round-trip for cluster_bits %i", (bits) => {
    const layout = compressedLayout(bits);
    expect(layout.offsetBits).toBe(62 - (bits - 8));
    for (const [host, sectors] of [
      [0x50000 + 123, 0],
      [0x7_0000_0200, layout.sectorsMax],
      [2 ** 40 + 511, 1],
    ] as const) {
      const { hi, lo } = encodeCompressed(host, sectors, layout);
      expect(hi & 0x4000_0000).not.toBe(0);
      const d = decodeCompressed(hi, lo, layout);
      expect(d.hostOffset).toBe(host);
      expect(d.sectors).toBe(sectors);
      expect(d.length).toBe((sectors + 1) * 512 - (host % 512));
    }
  });

  it("matches the spec's bit layout for 64 KiB clusters", () => {
    // x = 54: offset in bits 0..53, sector count in bits 54..61.
    const layout = compressedLayout(16);
    const d = decodeCompressed(0x4000_0000 | (3 << 22), 0x12345, layout);
    expect(d).toEqual({ hostOffset: 0x12345, sectors: 3, length: 4 * 512 - (0x12345 % 512) });
  });
});

const COPIED = 0x8000_0000;
const std = l2Format({ clusterBits: 16, extendedL2: false, hasDataFile: false });
const ext = l2Format({ clusterBits: 16, extendedL2: true, hasDataFile: false });
const dataFile = l2Format({ clusterBits: 16, extendedL2: false, hasDataFile: true });

describe("L2 entry classification", () => {
  it("gathers the stride and table geometry once", () => {
    expect([std.stride, std.entriesPerTable, std.subclusters]).toEqual([1, 8192, 1]);
    expect([ext.stride, ext.entriesPerTable, ext.subclusters]).toEqual([2, 4096, 32]);
  });

  it("classifies standard entries as QEMU's qcow2_get_cluster_type", () => {
    expect(clusterType(std, 0, 0)).toBe(C.Unallocated);
    expect(clusterType(std, 0, 1)).toBe(C.ZeroPlain);
    expect(clusterType(std, COPIED, 0x5_0000 | 1)).toBe(C.ZeroAlloc);
    expect(clusterType(std, 0x12, 0x5_0000)).toBe(C.Normal);
    expect(clusterType(std, COPIED | 0x4000_0000, 0)).toBe(C.Compressed);
    // COPIED alone: unallocated, except with an external data file (offset 0 is real there).
    expect(clusterType(std, COPIED, 0)).toBe(C.Unallocated);
    expect(clusterType(dataFile, COPIED, 0)).toBe(C.Normal);
    expect(clusterType(dataFile, 0, 0)).toBe(C.Unallocated);
    // Extended entries ignore the zero flag (bit 0 is reserved there).
    expect(clusterType(ext, 0, 1)).toBe(C.Unallocated);
    expect(clusterType(ext, 0, 0x5_0001)).toBe(C.Normal);
  });

  it("classifies subclusters as QEMU's qcow2_get_subcluster_type", () => {
    const host = 0x7_0000;
    // Normal cluster: sc 0 allocated, sc 1 zero, sc 2 neither.
    expect(subclusterType(ext, 0, host, 0b10, 0b1, 0)).toBe(S.Normal);
    expect(subclusterType(ext, 0, host, 0b10, 0b1, 1)).toBe(S.ZeroAlloc);
    expect(subclusterType(ext, 0, host, 0b10, 0b1, 2)).toBe(S.UnallocatedAlloc);
    // Both allocated and zero anywhere: the whole entry is invalid.
    expect(subclusterType(ext, 0, host, 1 << 31, (1 << 31) | 1, 0)).toBe(S.Invalid);
    // Unallocated cluster: zero bits are fine, any allocated bit is invalid.
    expect(subclusterType(ext, 0, 0, 0b100, 0, 2)).toBe(S.ZeroPlain);
    expect(subclusterType(ext, 0, 0, 0b100, 0, 3)).toBe(S.UnallocatedPlain);
    expect(subclusterType(ext, 0, 0, 0, 1 << 31, 3)).toBe(S.Invalid);
    expect(subclusterType(ext, 0x4000_0000, 0x200, 0, 0, 5)).toBe(S.Compressed);
    // Standard entries map one to one.
    expect(subclusterType(std, 0, 0, 0, 0, 0)).toBe(S.UnallocatedPlain);
    expect(subclusterType(std, 0, 1, 0, 0, 0)).toBe(S.ZeroPlain);
    expect(subclusterType(std, 0, host | 1, 0, 0, 0)).toBe(S.ZeroAlloc);
    expect(subclusterType(std, 0, host, 0, 0, 0)).toBe(S.Normal);
  });

  it("reports reserved bits and misalignment", () => {
    expect(l2EntryProblem(std, COPIED, 0x5_0000)).toBe(EntryProblem.None);
    expect(l2EntryProblem(std, 0, 0x5_0000 | 1)).toBe(EntryProblem.None);
    expect(l2EntryProblem(ext, 0, 0x5_0000 | 1)).toBe(EntryProblem.None); // as QEMU's check
    expect(l2EntryProblem(std, 0, 0x5_0000 | 2)).toBe(EntryProblem.ReservedBits);
    expect(l2EntryProblem(std, 0x0100_0000, 0)).toBe(EntryProblem.ReservedBits);
    expect(l2EntryProblem(std, 0, 0x5_0200)).toBe(EntryProblem.Unaligned);
    expect(l2EntryProblem(std, 0x7fff_ffff, 0xffff_ffff)).toBe(EntryProblem.None); // compressed
  });

  it("decodes offsets, compressed descriptors and L1/refcount-table entries", () => {
    expect(entryOffset(0xff12_3456, 0x789a_bdff)).toBe(0x12_3456_789a_bc00);
    expect(withCopied(0x12, true)).toBe(0x8000_0012);
    expect(withCopied(0x8000_0012, false)).toBe(0x12);
    const { hi, lo } = encodeCompressed(0x1_2345_6789, 3, std.compressed);
    expect(compressedOffset(std, hi, lo)).toBe(0x1_2345_6789);
    expect(compressedLength(std, hi, lo)).toBe(4 * 512 - (0x1_2345_6789 % 512));
    expect(l1ReservedBits(0, 0x1_0000)).toBe(false);
    expect(l1ReservedBits(COPIED, 0x1_0000)).toBe(false);
    expect(l1ReservedBits(0x4000_0000, 0)).toBe(true);
    expect(l1ReservedBits(0, 0x100)).toBe(true);
    expect(reftableOffset(0xffff_0000, 0x1_0000)).toBe(0xffff_0000 * 2 ** 32 + 0x1_0000);
    expect(reftableReservedBits(0x1_0000)).toBe(false);
    expect(reftableReservedBits(0x1_0001)).toBe(true);
  });

  it("indexes table views with the entry stride", () => {
    const t = new U64TableView(new Uint8Array(64), "big");
    t.setWords(2, 0, 0x3_0000); // entry 1 of an extended table, entry 2 of a standard one
    t.setWords(3, 0, 0b1); // its bitmap: subcluster 0 allocated
    expect(l2TypeAt(ext, t, 1)).toBe(C.Normal);
    expect(l2OffsetAt(ext, t, 1)).toBe(0x3_0000);
    expect(subclusterTypeAt(ext, t, 1, 0)).toBe(S.Normal);
    expect(subclusterTypeAt(ext, t, 1, 1)).toBe(S.UnallocatedAlloc);
    expect(l2TypeAt(std, t, 2)).toBe(C.Normal);
    expect(l2TypeAt(std, t, 1)).toBe(C.Unallocated);
  });
});

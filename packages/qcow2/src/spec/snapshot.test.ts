import { describe, expect, it } from "vitest";
import {
  SNAPSHOT_FIELDS,
  SNAPSHOT_FIXED_SIZE,
  decodeSnapshotTable,
  encodeSnapshotTable,
} from "./snapshot.js";

describe("snapshot table entries", () => {
  it("fields tile the fixed part exactly", () => {
    const sizes: Record<string, number> = { u16: 2, u32: 4, u64: 8, bits64: 8 };
    let end = 0;
    for (const f of Object.values(SNAPSHOT_FIELDS)) {
      expect(f.offset).toBe(end);
      end += sizes[f.type]!;
    }
    expect(end).toBe(SNAPSHOT_FIXED_SIZE);
  });

  it("keeps any 64-bit VM clock and icount (past 2^53) through a round trip", () => {
    const extra = new Uint8Array(24);
    const ev = new DataView(extra.buffer);
    ev.setBigUint64(8, 1048576n, false);
    ev.setBigUint64(16, 2n ** 63n + 5n, false);
    const bytes = encodeSnapshotTable([
      {
        l1TableOffset: 0x50000,
        l1Size: 1,
        id: "1",
        name: "clock",
        dateSec: 0xffff_ffff,
        dateNsec: 999_999_999,
        vmClockNsec: 2n ** 64n - 1n,
        vmStateSize: 0,
        diskSize: 1048576,
        icount: 2n ** 63n + 5n,
        extraData: extra,
      },
    ]);
    const [e] = decodeSnapshotTable(bytes, 1, 0x60000, 3);
    expect(e!.vmClockNsec).toBe(2n ** 64n - 1n);
    expect(e!.icount).toBe(2n ** 63n + 5n);
    expect(e!.dateSec).toBe(0xffff_ffff);
    expect(encodeSnapshotTable([e!])).toEqual(bytes);
  });
});

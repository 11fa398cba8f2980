/**
 * QEMU iotest 261 ported, its slow half: more snapshots than QEMU reads (65536) and snapshot
 * tables past QEMU's 64 MiB limit. qemu-img check fails on them; `-r all` drops the
 * overhanging snapshots, and we must drop the same ones (same lines, same image afterwards,
 * the same `qemu-img snapshot -l`). Each scenario runs qemu-img on tens of thousands of
 * snapshots (about 20-60 s each, most of it in qemu-img).
 */
import { closeSync, openSync, truncateSync, writeSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { haveQemu } from "./helpers.js";
import {
  BIG_ENTRY,
  be64,
  create,
  expectSameReadOnly,
  expectSameRepair,
  peek,
  poke,
  qemuIo,
  refblock0Allocate,
  run,
  sameRepairAll,
  scratch,
  writeBigEntries,
} from "./iotest-helpers.js";

describe("iotest 261: more snapshots than QEMU reads", () => {
  it("nb_snapshots 65537 over a one-entry table: check fails as qemu-img's (read-only and -r leaks)", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = join(scratch("261"), "t.qcow2");
    create(f, 64 * 1024 * 1024 - 1000);
    qemuIo(f, "write -P 42 0 70001");
    run("qemu-img", ["snapshot", "-c", "s0", f]);
    poke(f, 60, [0, 1, 0, 1]);
    expect(run("qemu-img", ["info", f], true).status).toBe(1);
    const r = await expectSameReadOnly(f);
    expect(r.failure).toBe("File too large");
    await expectSameRepair(f, "leaks");
  });

  it("131072 all-zero v2 entries, a dropped one with an L1 and L2 table: -r all keeps 65536 as qemu-img", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = join(scratch("261"), "t.qcow2");
    create(f, 64 * 1024 * 1024, "compat=0.10");
    const table = 1024 * 1024;
    poke(f, 64, be64(BigInt(table)));
    poke(f, 60, [0, 2, 0, 0]);
    truncateSync(f, table + 40 * 131072);
    // Snapshot 65536 (dropped by the repair) has an L1 table (1 entry) and an L2 table.
    poke(f, table + 40 * 65536, be64(0xe0000n));
    poke(f, table + 40 * 65536 + 8, [0, 0, 0, 1]);
    poke(f, table - 2 * 65536, be64(0x80000000000f0000n));
    refblock0Allocate(f, table - 2 * 65536, table + 40 * 131072);
    expect(run("qemu-img", ["info", f], true).status).toBe(1);
    const r = await expectSameReadOnly(f);
    expect(r.failure).toBe("File too large");
    await expectSameRepair(f, "leaks");
    const { ours } = await sameRepairAll(f);
    expect(peek(ours, 60, 4)).toBe(65536);
  }, 120_000);
});

describe("iotest 261: a snapshot table over 64 MiB", () => {
  // Superseded by iotest 261's own table below in the default run (33 s of qemu-img).
  it.runIf(process.env.QIMG_LONG === "1")(
    "65536 entries of 1024 bytes extra data: check fails as qemu-img's (read-only and -r leaks)",
    async (ctx) => {
      if (!haveQemu()) return ctx.skip();
      const f = join(scratch("261"), "t.qcow2");
      create(f, 64 * 1024 * 1024 - 1000);
      qemuIo(f, "write -P 42 0 70001");
      // Entries of 40 + 1024 bytes (no id, no name, no L1 table) from 1 MiB on; only the extra
      // data size fields are written (the rest is zeros, a sparse file).
      const table = 1024 * 1024;
      const n = 65536;
      const fd = openSync(f, "r+");
      try {
        const size = Uint8Array.from([0, 0, 4, 0]);
        for (let i = 0; i < n; i++) writeSync(fd, size, 0, 4, table + i * 1064 + 36);
      } finally {
        closeSync(fd);
      }
      truncateSync(f, table + n * 1064);
      poke(f, 60, [0, 1, 0, 0, ...be64(BigInt(table))]);
      expect(run("qemu-img", ["info", f], true).status).toBe(1);
      const r = await expectSameReadOnly(f);
      expect(r.failure).toBe("File too large");
      await expectSameRepair(f, "leaks");
    },
  );

  /** iotest 261's table: entries of 1 KiB extra data and 64 KiB ID and name until past 64 MiB. */
  function bigTable(): { f: string; offset: number; count: number } {
    const f = join(scratch("261"), "t.qcow2");
    create(f, 64 * 1024 * 1024);
    const table = 1024 * 1024;
    poke(f, 64, be64(BigInt(table)));
    const count = Math.floor((64 * 1048576) / BIG_ENTRY) + 1;
    writeBigEntries(f, table, count);
    const offset = table + count * BIG_ENTRY;
    truncateSync(f, offset);
    // The last entry (the one the repair drops) has an L1 table and an L2 table.
    poke(f, offset - BIG_ENTRY, be64(0xe0000n));
    poke(f, offset - BIG_ENTRY + 8, [0, 0, 0, 1]);
    poke(f, table - 2 * 65536, be64(0x80000000000f0000n));
    refblock0Allocate(f, table - 2 * 65536, offset);
    poke(f, 60, [count >>> 24, (count >>> 16) & 255, (count >>> 8) & 255, count & 255]);
    return { f, offset, count };
  }

  it("iotest 261's table past 64 MiB: -r all drops the overhanging snapshot as qemu-img", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const { f, count } = bigTable();
    expect(run("qemu-img", ["info", f], true).status).toBe(1);
    const r = await expectSameReadOnly(f);
    expect(r.failure).toBe("File too large");
    const { ours } = await sameRepairAll(f);
    expect(peek(ours, 60, 4)).toBe(count - 1);
  }, 120_000);

  it("one entry with too much extra data past the limit: -r all cuts it and drops one snapshot as qemu-img", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const table = 1024 * 1024;
    const f = join(scratch("261"), "t.qcow2");
    create(f, 64 * 1024 * 1024);
    poke(f, 64, be64(BigInt(table)));
    // (count - 3) normal entries, one whose extra data makes the next entry cross 64 MiB (but
    // fits once cut to 1 KiB), then two normal ones, the last always past the limit.
    const normal = Math.floor((64 * 1048576) / BIG_ENTRY) - 2;
    writeBigEntries(f, table, normal + 1);
    const written = (normal + 1) * BIG_ENTRY;
    const extra = 64 * 1048576 + 8 - BIG_ENTRY - (written - 1024);
    let offset = table + normal * BIG_ENTRY;
    poke(f, offset + 36, [extra >>> 24, (extra >>> 16) & 255, (extra >>> 8) & 255, extra & 255]);
    offset += BIG_ENTRY - 1024 + extra;
    writeBigEntries(f, offset, 2);
    offset += 2 * BIG_ENTRY;
    truncateSync(f, offset);
    refblock0Allocate(f, table, offset);
    const count = normal + 3;
    poke(f, 60, [count >>> 24, (count >>> 16) & 255, (count >>> 8) & 255, count & 255]);
    expect(run("qemu-img", ["info", f], true).status).toBe(1);
    await expectSameReadOnly(f);
    const { ours } = await sameRepairAll(f);
    expect(peek(ours, 60, 4)).toBe(count - 1);
  }, 120_000);
});

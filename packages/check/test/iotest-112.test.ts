/**
 * QEMU iotest 112 ported (its check verdicts): refcount widths from 1 to 64 bits, snapshots
 * that fail because a refcount would overflow (leaving a leaked L1 table), a 64-bit refcount
 * with its top bit set or at its maximum, and more references than the width can count.
 * Images are made by qemu-img/qemu-io and checked by qemu-img and by us on twins.
 */
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { haveQemu } from "./helpers.js";
import {
  be64,
  create,
  expectSameGuest,
  expectSameReadOnly,
  expectSameRepair,
  peek,
  poke,
  qemuIo,
  run,
  scratch,
} from "./iotest-helpers.js";

const SIZE = 64 * 1024 * 1024 - 3333;

/** Read-only, -r leaks and -r all verdicts on twins, and the same guest data after -r all. */
async function allVerdicts(path: string): Promise<void> {
  await expectSameReadOnly(path);
  await expectSameRepair(path, "leaks");
  const { q, ours } = await expectSameRepair(path, "all");
  expectSameGuest(q, ours);
}

/** The host offset of the data cluster behind guest offset 0 (one L2 table). */
function firstDataEntry(f: string): { entry: number; data: number } {
  const l1 = peek(f, 0x28, 8);
  const l2 = peek(f, l1, 8) % 2 ** 56;
  return { entry: l2, data: peek(f, l2, 8) % 2 ** 56 };
}

/** The refcount block entry (its file offset) of host cluster `cluster` (first block only). */
function refcountEntry(f: string, cluster: number, bits: number): number {
  const table = peek(f, 0x30, 8);
  const block = peek(f, table, 8);
  return block + (cluster * bits) / 8;
}

describe("iotest 112: snapshots that would overflow a refcount leave a leaked L1 table", () => {
  it("refcount_bits=1: the first snapshot fails", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = join(scratch("112"), "t.qcow2");
    create(f, SIZE, "refcount_bits=1");
    qemuIo(f, "write -P 3 1000 777");
    expect(run("qemu-img", ["snapshot", "-c", "foo", f], true).status).toBe(1);
    await allVerdicts(f);
  });

  it("refcount_bits=2: the third snapshot fails", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = join(scratch("112"), "t.qcow2");
    create(f, SIZE, "refcount_bits=2");
    qemuIo(f, "write -P 3 1000 777");
    run("qemu-img", ["snapshot", "-c", "foo", f]);
    run("qemu-img", ["snapshot", "-c", "bar", f]);
    expect(run("qemu-img", ["snapshot", "-c", "baz", f], true).status).toBe(1);
    await allVerdicts(f);
  });
});

describe("iotest 112: refcount widths", () => {
  for (const bits of [1, 2, 4, 8, 32, 64]) {
    it(`refcount_bits=${bits}: compressed clusters sharing a host cluster are clean`, async (ctx) => {
      if (!haveQemu()) return ctx.skip();
      const f = join(scratch("112"), "t.qcow2");
      create(f, SIZE, `refcount_bits=${bits}`);
      qemuIo(f, "write -P 0 -c 0 64k", "write -P 1 -c 64k 64k", "write -P 9 200000 3000");
      await allVerdicts(f);
    });
  }
});

describe("iotest 112: 64-bit refcounts at the top of their range", () => {
  const cases: Record<string, bigint> = {
    "top bit set": 0x8000000000000000n,
    "maximum value": 0xffffffffffffffffn,
  };
  for (const [name, value] of Object.entries(cases)) {
    it(`${name}, COPIED cleared`, async (ctx) => {
      if (!haveQemu()) return ctx.skip();
      const f = join(scratch("112"), "t.qcow2");
      create(f, SIZE, "refcount_bits=64");
      qemuIo(f, "write -P 5 0 512");
      const { entry, data } = firstDataEntry(f);
      poke(f, refcountEntry(f, data / 65536, 64), be64(value));
      poke(f, entry, be64(BigInt(data)));
      await allVerdicts(f);
    });
  }

  it("maximum value, then a failed snapshot", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = join(scratch("112"), "t.qcow2");
    create(f, SIZE, "refcount_bits=64");
    qemuIo(f, "write -P 5 0 512");
    const { entry, data } = firstDataEntry(f);
    poke(f, refcountEntry(f, data / 65536, 64), be64(0xffffffffffffffffn));
    poke(f, entry, be64(BigInt(data)));
    expect(run("qemu-img", ["snapshot", "-c", "foo", f], true).status).toBe(1);
    await allVerdicts(f);
  });
});

describe("iotest 112: more references than the refcount width can count", () => {
  it("refcount_bits=1, two L2 entries on one cluster; again after amend to 2 bits", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = join(scratch("112"), "t.qcow2");
    create(f, SIZE, "refcount_bits=1");
    qemuIo(f, "write -P 8 0 64k");
    const { entry, data } = firstDataEntry(f);
    poke(f, entry + 8, be64(0x8000000000000000n | BigInt(data)));
    await expectSameReadOnly(f);
    await expectSameRepair(f, "leaks");
    await expectSameRepair(f, "all");
    run("qemu-img", ["amend", "-o", "refcount_bits=2", f]);
    await allVerdicts(f);
  }, 180_000);
});

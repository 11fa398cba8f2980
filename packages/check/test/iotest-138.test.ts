/**
 * QEMU iotest 138 ported: a data cluster far past the end of the file (32 PB, a multiple of
 * 2^32 clusters with 512-byte clusters) and, more generally, data clusters beyond the end of
 * the file. qemu-img 7.2 reports "counting reference for region exceeding the end of the
 * file" and the COPIED error; `-r leaks` fixes the leak only. With `-r all` QEMU keeps the
 * entry (the image stays corrupt); we drop it (the guest range reads as zeros, listed in
 * lostRanges) — our deliberate extra repair, so only the read-only and `-r leaks` verdicts
 * must be QEMU's, and after our `-r all` qemu-img must find the image clean.
 */
import { statSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { haveQemu, qemuCheck } from "./helpers.js";
import {
  be64,
  create,
  expectSameReadOnly,
  expectSameRepair,
  ourCheck,
  peek,
  poke,
  qemuIo,
  scratch,
  twins,
} from "./iotest-helpers.js";
import { QimgError } from "@qimg/structs";

/** Point the L2 entry of guest cluster 0 at `host` (COPIED set). */
function pointFirstEntry(f: string, host: bigint): void {
  const l1 = peek(f, 0x28, 8);
  const l2 = peek(f, l1, 8) % 2 ** 56;
  poke(f, l2, be64(0x8000000000000000n | host));
}

async function verdicts(f: string): Promise<void> {
  await expectSameReadOnly(f);
  await expectSameRepair(f, "leaks");
  // -r all: ours goes further (the entry is dropped); qemu-img must then find it clean.
  const { ours } = twins(f);
  const r = await ourCheck(ours, "all");
  if (r instanceof QimgError) throw r;
  expect(r.exitCode).toBe(0);
  expect(r.lostRanges.length).toBe(1);
  expect(r.lostRanges[0]!.offset).toBe(0);
  const q = qemuCheck(ours);
  expect(q.status, q.stderr + q.stdout).toBe(0);
}

describe("iotest 138: data clusters beyond the end of the file", () => {
  it("512-byte clusters, data cluster at 32 PB (2^32-cluster multiple)", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = join(scratch("138"), "t.qcow2");
    create(f, 511, "cluster_size=512");
    qemuIo(f, "write -P 1 0 511");
    pointFirstEntry(f, 0x80000000000000n);
    await verdicts(f);
  });

  const cases: Record<string, (end: number) => bigint> = {
    "one cluster past the end": (end) => BigInt(Math.ceil(end / 65536) * 65536),
    "a few clusters past the end": (end) => BigInt(Math.ceil(end / 65536) * 65536 + 5 * 65536),
    "at 1 TiB": () => 2n ** 40n,
  };
  for (const [name, at] of Object.entries(cases)) {
    it(`64 KiB clusters, ${name}`, async (ctx) => {
      if (!haveQemu()) return ctx.skip();
      const f = join(scratch("138"), "t.qcow2");
      create(f, 10 * 1024 * 1024 + 17, "");
      qemuIo(f, "write -P 2 0 100000", "write -P 3 5000000 4321");
      pointFirstEntry(f, at(statSync(f).size));
      await verdicts(f);
    });
  }
});

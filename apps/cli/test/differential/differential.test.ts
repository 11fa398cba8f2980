/**
 * Differential testing against QEMU, the main guard of every write path: seeded cases (gen.ts)
 * replayed on twin images through qemu-img/qemu-io and through qimg (run.ts): same statuses,
 * same guest bytes and sizes, both checkers clean, same persistent-bitmap dirty bits, and every
 * conversion (qemu-img convert vs qimg convert) equal. Internal snapshots (create/apply/delete)
 * and bitmap actions (add/remove/clear/enable/disable/merge) run through qemu-img on one twin
 * and `qimg snapshot` / `qimg bitmap` on the other: same statuses and messages, same snapshot
 * lists and contents, same bitmaps. Where the twins differ, a reference model of the guest
 * bytes, snapshots and bitmaps (model.ts) tells a QEMU bug from a qimg one; the bitmap model is
 * checked even when the twins agree. Each failure prints its seed,
 * the minimal operation sequence (after shrinking) and the commands that rebuild it.
 *
 * Env: QIMG_DIFF_CASES (default 300; QIMG_LONG=1: 5000), QIMG_SEED (first seed; with
 * QIMG_DIFF_CASES=1 it replays one case), QIMG_DIFF_JOBS (cases in flight, default 2),
 * QIMG_DIFF_KEEP=1 keeps the case directories, QIMG_DIFF_MODEL=1 also holds QEMU's twin against
 * the model when the twins agree (a check of the harness itself). Outside vitest, explore.ts runs cases and prints
 * every failure category with shrunk examples.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { hasQemu, qemuImg, qemuIo } from "../qemu.js";
import { CI_LIMITS, LONG_LIMITS, generateCase, type Op } from "./gen.js";
import { GuestModel, MAYBE } from "./model.js";
import {
  bitmapBits,
  type CaseResult,
  formatFailure,
  ioCommands,
  opStatuses,
  runCase,
  runPool,
  shrink,
} from "./run.js";

const long = process.env.QIMG_LONG === "1";
const cases = Number(process.env.QIMG_DIFF_CASES ?? (long ? 5000 : 300));
const firstSeed = Number(process.env.QIMG_SEED ?? 20261202);
const keep = process.env.QIMG_DIFF_KEEP === "1";
const jobs = Number(process.env.QIMG_DIFF_JOBS ?? 2);

if (!hasQemu) console.log("skipping the differential suite: qemu-img is not on PATH");

const root = mkdtempSync(join(tmpdir(), "qimg-diff-"));
afterAll(() => {
  if (!keep) rmSync(root, { recursive: true, force: true });
});

describe("differential harness", () => {
  it("tells each operation's outcome apart by the marker reads, even for repeated lines", () => {
    const ops: Op[] = [
      { k: "write", off: 0, len: 512, pat: 1 },
      { k: "wc", off: 0, len: 512, pat: 2 },
      { k: "flush" },
      { k: "write", off: 0, len: 512, pat: 3 },
      { k: "discard", off: 7, len: 9 },
    ];
    expect(ioCommands(ops).filter((_, i) => i % 2 === 1)).toEqual([
      "write -P 1 0 512",
      "read 0 1",
      "write -c -P 2 0 512",
      "read 1 1",
      "flush",
      "read 2 1",
      "write -P 3 0 512",
      "read 3 1",
      "discard 7 9",
      "read 4 1",
    ]);
    const out = [
      "wrote 512/512 bytes at offset 0",
      "512 bytes, 1 ops; 00.00 sec (1 MiB/sec and 1 ops/sec)",
      "read 1/1 bytes at offset 0",
      "write failed: Input/output error",
      "read 1/1 bytes at offset 1",
      "flush failed: Input/output error",
      "read 1/1 bytes at offset 2",
      "wrote 512/512 bytes at offset 0",
      "read 1/1 bytes at offset 3",
      "discard 9/9 bytes at offset 7",
      "",
    ].join("\n");
    expect(opStatuses(ops, out)).toEqual([true, false, false, true, false]);
    // An aio group succeeds when every request reports before the group's marker.
    const aio: Op[] = [
      {
        k: "aio",
        parts: [
          { off: 0, len: 10, pat: 1, zero: false },
          { off: 10, len: 5, pat: 0, zero: true },
        ],
      },
    ];
    expect(ioCommands(aio)).toEqual([
      "-c",
      "aio_write -P 1 0 10",
      "-c",
      "aio_write -z 10 5",
      "-c",
      "aio_flush",
      "-c",
      "read 0 1",
    ]);
    const done =
      "wrote 5/5 bytes at offset 10\nwrote 10/10 bytes at offset 0\nread 1/1 bytes at offset 0\n";
    expect(opStatuses(aio, done)).toEqual([true]);
    expect(opStatuses(aio, "wrote 10/10 bytes at offset 0\nread 1/1 bytes at offset 0\n")).toEqual([
      false,
    ]);
  });

  it("follows snapshots and bitmaps in the model: apply restores bytes and size, only enabled bitmaps get marked", () => {
    const m = new GuestModel(4096, undefined);
    m.apply({ k: "bitmap", act: "add", name: "a", granularity: 512 });
    m.apply({ k: "bitmap", act: "add", name: "d", granularity: 1024 });
    m.apply({ k: "bitmap", act: "disable", name: "d" });
    m.apply({ k: "write", off: 100, len: 10, pat: 7 });
    m.apply({ k: "snapshot", act: "create", name: "s" });
    m.apply({ k: "snapshot", act: "create", name: "s" });
    m.apply({ k: "resize", delta: 1024 });
    m.apply({ k: "discard", off: 4600, len: 10 });
    m.failed({ k: "write", off: 1500, len: 1, pat: 1 });
    expect([...(m.bitmaps.get("a")?.bits ?? [])]).toEqual([1, 0, MAYBE, 0, 0, 0, 0, 0, 1, 1]);
    expect([...(m.bitmaps.get("d")?.bits ?? [])]).toEqual([0, 0, 0, 0, 0]);
    m.apply({ k: "bitmap", act: "merge", name: "d", source: "a" });
    expect([...(m.bitmaps.get("d")?.bits ?? [])]).toEqual([1, MAYBE, 0, 0, 1]);
    m.apply({ k: "bitmap", act: "clear", name: "a" });
    expect(m.bitmaps.get("a")?.bits.every((b) => b === 0)).toBe(true);
    expect(m.snapshots.map((x) => `${x.id} ${x.name}`)).toEqual(["1 s", "2 s"]);
    m.apply({ k: "write", off: 0, len: 5120, pat: 9 });
    m.apply({ k: "snapshot", act: "delete", name: "s" });
    expect(m.snapshots.map((x) => x.id)).toEqual(["2"]);
    m.apply({ k: "snapshot", act: "apply", name: "s" });
    expect(m.size).toBe(4096);
    expect(m.bytes[100]).toBe(7);
    expect(m.bytes[0]).toBe(0);
    expect(m.bitmaps.get("d")?.bits.length).toBe(4);
  });

  it.skipIf(!hasQemu)("reads the dirty bits of QEMU's persistent bitmaps", () => {
    const file = join(root, "bitmaps.qcow2");
    expect(qemuImg(["create", "-q", "-f", "qcow2", file, "3M"]).code).toBe(0);
    expect(qemuImg(["bitmap", "--add", "-g", "65536", file, "b0"]).code).toBe(0);
    expect(qemuImg(["bitmap", "--add", "-g", "512", file, "b1"]).code).toBe(0);
    const io = qemuIo([
      "-c",
      "write 100000 1",
      "-c",
      "discard 2000000 70000",
      "-c",
      "write -z 1000 1",
      file,
    ]);
    expect(io.code).toBe(0);
    expect(bitmapBits(file)).toEqual(
      new Map([
        ["b0", "[0,1] [30,31]"],
        ["b1", "[1,1] [195,195] [3906,4042]"],
      ]),
    );
  });
});

describe.skipIf(!hasQemu)("differential: qimg vs qemu-img/qemu-io on twin images", () => {
  it(
    `${cases} seeded cases from seed ${firstSeed} give the same bytes, statuses and clean checks`,
    async () => {
      const t0 = Date.now();
      const seeds = Array.from({ length: cases }, (_, i) => firstSeed + i);
      const limits = long ? LONG_LIMITS : CI_LIMITS;
      const results = await runPool(seeds, jobs, (seed) =>
        runCase(generateCase(seed, limits), root, keep),
      );
      const byCategory = new Map<string, CaseResult[]>();
      for (const r of results) {
        for (const c of new Set(r.failures.map((f) => f.category))) {
          byCategory.set(c, [...(byCategory.get(c) ?? []), r]);
        }
      }
      const skipped = results.filter((r) => r.skipped).length;
      console.log(
        `differential: ${cases} cases from seed ${firstSeed} (${skipped} with options QEMU refuses) in ${((Date.now() - t0) / 1000).toFixed(1)} s; ${byCategory.size} failure categories`,
      );
      const reports: string[] = [];
      for (const [category, rs] of [...byCategory].sort(([a], [b]) => a.localeCompare(b))) {
        // Shrink the smallest failing case of each category (a bounded number of re-runs).
        const smallest = rs.reduce((a, b) => (a.spec.ops.length <= b.spec.ops.length ? a : b));
        const minimal = reports.length < 12 ? await shrink(smallest, root, category, 40) : smallest;
        reports.push(
          `${category}: ${rs.length} case(s), seeds ${rs
            .slice(0, 10)
            .map((r) => r.spec.seed)
            .join(" ")}\n${formatFailure(minimal, category)}`,
        );
      }
      if (reports.length > 0) console.log(reports.join("\n\n"));
      expect(
        [...byCategory.keys()].sort(),
        `replay one case with QIMG_SEED=<seed> QIMG_DIFF_CASES=1 (reports above)`,
      ).toEqual([]);
    },
    long ? 6 * 3600_000 : 900_000,
  );
});

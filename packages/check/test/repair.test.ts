import { copyFileSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { copyFixture, listFixtures } from "@qimg/fixtures";
import { FileBackend } from "@qimg/io/node";
import { decodeHeader } from "@qimg/qcow2";
import { checkImage, formatCheckHuman, toQemuJson } from "../src/index.js";
import type { CheckResult, LostRange, RepairMode } from "../src/index.js";
import { haveQemu, qemuCheck, qemuToRaw } from "./helpers.js";

/** Damaged (or dirty) fixtures that qemu-img can open. */
const broken = listFixtures({ broken: true }).filter(
  (f) => f.check !== null && f.check.json !== null,
);

async function repair(
  path: string,
  format: "qcow2" | "qed",
  mode: RepairMode,
): Promise<CheckResult> {
  const backend = await FileBackend.open(path);
  try {
    return await checkImage(backend, format, { repair: mode, filename: path.split("/").pop() });
  } finally {
    await backend.close();
  }
}

/** Fixtures where our -r all goes further than QEMU's, so the post-repair JSON differs. */
const BEYOND_QEMU: Record<string, string> = {
  "qcow2-broken-l2-past-eof":
    "we unmap the L2 entry pointing past EOF; QEMU leaves that corruption",
  "qcow2-broken-l1-misaligned":
    "we drop the misaligned L1 entry; QEMU rewrites entries inside the data cluster and leaves the L1 corruption",
  "qcow2-broken-l2-overlaps-refcount-table":
    "our rebuilt refcount structures go at the end of the file (image end offset differs)",
};

function sameOutside(a: Uint8Array, b: Uint8Array, lost: readonly LostRange[]): string | undefined {
  if (a.byteLength !== b.byteLength) return `sizes differ: ${a.byteLength} vs ${b.byteLength}`;
  const isLost = (i: number): boolean => lost.some((r) => i >= r.offset && i < r.offset + r.length);
  for (let i = 0; i < a.byteLength; i += 512) {
    if (isLost(i)) continue;
    for (let j = i; j < Math.min(i + 512, a.byteLength); j++) {
      if (a[j] !== b[j]) return `guest byte ${j} changed`;
    }
  }
  return undefined;
}

describe("repair -r all", () => {
  for (const f of broken) {
    const format = f.format as "qcow2" | "qed";
    it(`${f.name}: qemu-img check is clean afterwards and undamaged guest data is unchanged`, async () => {
      const path = copyFixture(f.name);
      const r = await repair(path, format, "all");
      // Our own re-check says clean.
      expect(r.exitCode, formatCheckHuman(r).stderr).toBe(0);
      if (r.repaired !== undefined) {
        expect(formatCheckHuman(r).stdout).toContain("Double checking the fixed image now...");
      }
      if (format === "qcow2") {
        const h = decodeHeader(readFileSync(path).subarray(0, 4096));
        expect(h.incompatibleFeatures & 3n).toBe(0n); // dirty and corrupt bits cleared
        expect(h.autoclearFeatures & ~3n).toBe(0n); // unknown autoclear bits cleared
      }
      if (!haveQemu()) return;
      const q = qemuCheck(path);
      expect(q.status, q.stderr + q.stdout).toBe(0);
      // Guest data outside the reported lost ranges is what qemu-img read before.
      const before = join(tmpdir(), `qimg-check-before-${process.pid}-${f.name}.raw`);
      const after = join(tmpdir(), `qimg-check-after-${process.pid}-${f.name}.raw`);
      try {
        const original = copyFixture(f.name);
        if (qemuToRaw(original, format, before)) {
          expect(qemuToRaw(path, format, after)).toBe(true);
          expect(
            sameOutside(readFileSync(before), readFileSync(after), r.lostRanges),
          ).toBeUndefined();
        } else {
          console.warn(
            `${f.name}: qemu-img cannot convert the damaged image; data comparison skipped`,
          );
        }
      } finally {
        rmSync(before, { force: true });
        rmSync(after, { force: true });
      }
    });

    it(`${f.name}: -r all / -r leaks report what qemu-img reports`, async (ctx) => {
      if (!haveQemu()) return ctx.skip();
      for (const mode of ["leaks", "all"] as const) {
        const ours = copyFixture(f.name);
        const theirs = `${ours}.qemu`;
        copyFileSync(ours, theirs);
        const q = qemuCheck(theirs, "-r", mode, "--output=json");
        const r = await repair(ours, format, mode);
        expect(
          r.exitCode === 0 || q.status !== 0,
          `${mode}: qemu-img's repair is clean, ours is not`,
        ).toBe(true);
        if (mode === "all" && BEYOND_QEMU[f.name] !== undefined) continue;
        expect(r.exitCode, mode).toBe(q.status);
        if (q.status === 1) continue; // check failed: no JSON
        const json = { ...toQemuJson(r)!, filename: theirs.split("/").pop()! };
        expect(json, mode).toEqual(JSON.parse(q.stdout));
      }
    });
  }
});

describe("lost guest ranges", () => {
  it("reports the guest cluster whose L2 entry pointed past the end of the file", async () => {
    const r = await repair(copyFixture("qcow2-broken-l2-past-eof"), "qcow2", "all");
    expect(r.lostRanges.map(({ offset, length }) => ({ offset, length }))).toEqual([
      { offset: 0, length: 65536 },
    ]);
    expect(r.repaired).toEqual({ leaks: 1, corruptions: 1 });
  });
  it("reports the guest range of a dropped misaligned L1 entry", async () => {
    const r = await repair(copyFixture("qcow2-broken-l1-misaligned"), "qcow2", "all");
    expect(r.lostRanges.map(({ offset, length }) => ({ offset, length }))).toEqual([
      { offset: 0, length: 2 * 1024 * 1024 },
    ]);
    expect(r.exitCode).toBe(0);
  });
  it("a read-only check changes nothing", async () => {
    const path = copyFixture("qcow2-broken-refcount-zero");
    const before = readFileSync(path);
    const backend = await FileBackend.open(path, { readOnly: true });
    const r = await checkImage(backend, "qcow2");
    await backend.close();
    expect(r.exitCode).toBe(2);
    expect(readFileSync(path).equals(before)).toBe(true);
  });
});

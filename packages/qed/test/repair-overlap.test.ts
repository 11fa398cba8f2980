/**
 * QED repair never writes into a "table" that is also something else: an L1 entry pointing at
 * a data cluster makes the walk read guest data as an L2 table, whose entries are invalid;
 * clearing them would overwrite the guest data (qemu-img check -r all does exactly that).
 * Against the real qemu-img / qemu-io; skips with a printed reason without them.
 */
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { FileBackend } from "@qimg/io/node";
import { checkQed } from "@qimg/qed";
import { prng } from "../src/testing/util.js";
import { SEED, haveQemu, noteSkipWithoutQemu, qemuCounts, run, workDir } from "./helpers.js";

noteSkipWithoutQemu("QED repair-overlap tests");
const work = workDir("qimg-qed-overlap-");

function problems(file: string): number {
  const c = qemuCounts(file);
  return c.corruptions + c.leaks + c.errors;
}

describe.skipIf(!haveQemu)(`QED repair and overlapping tables (seed ${SEED})`, () => {
  it("an L1 entry pointing at a data cluster: the repair leaves the guest data alone", async () => {
    const rnd = prng(SEED);
    for (const cs of [4096, 65536]) {
      const file = join(work, `l1-data-${cs}.qed`);
      expect(
        run("qemu-img", [
          "create",
          "-f",
          "qed",
          "-o",
          `cluster_size=${cs},table_size=2`,
          file,
          "4G",
        ]).status,
      ).toBe(0);
      // Data in the range of L1 entry 1 (an L2 table of 2 clusters maps cs*cs/4 bytes).
      const span = ((cs * 2) / 8) * cs;
      const at = span + Math.floor(rnd() * 16) * cs;
      const p = 0x20 + Math.floor(rnd() * 0x50);
      expect(run("qemu-io", ["-c", `write -P ${p} ${at} ${2 * cs}`, file]).status).toBe(0);
      const f = new Uint8Array(readFileSync(file));
      const dv = new DataView(f.buffer);
      const l1 = Number(dv.getBigUint64(40, true));
      const l2 = Number(dv.getBigUint64(l1 + 8, true));
      const data = Number(dv.getBigUint64(l2 + ((at / cs) % ((cs * 2) / 8)) * 8, true));
      // L1 entry 0 (walked first) now names the data clusters as its L2 table.
      dv.setBigUint64(l1, BigInt(data), true);
      writeFileSync(file, f);
      const twin = join(work, `l1-data-${cs}-qemu.qed`);
      copyFileSync(file, twin);
      const before = problems(file);
      const backend = await FileBackend.open(file);
      try {
        await checkQed(backend, { repair: true });
      } finally {
        await backend.close();
      }
      const where = `seed ${SEED} cs ${cs} at ${at}`;
      expect(problems(file), where).toBeLessThanOrEqual(before);
      // Before the fix the "L2 table" was cleared: the guest data became zeros.
      const read = run("qemu-io", ["-f", "qed", "-c", `read -P ${p} ${at} ${2 * cs}`, file]);
      expect(read.stdout, where).not.toMatch(/verification failed/);
      // qemu-img's own repair destroys it (documents the difference).
      run("qemu-img", ["check", "-r", "all", twin]);
      const theirs = run("qemu-io", ["-f", "qed", "-c", `read -P ${p} ${at} ${2 * cs}`, twin]);
      expect(theirs.stdout).toMatch(/verification failed/);
    }
  });
});

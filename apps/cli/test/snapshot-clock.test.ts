/**
 * Snapshot fields that are not offsets or sizes may hold any 64-bit value: a VM clock at or
 * above 2^53 ns (and an icount with the top bit set) must not make the image unreadable, and
 * `qimg info` and `qimg snapshot -l` must print them exactly as qemu-img does (issue 10).
 */
import { readFileSync, writeFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, qemuImg } from "./qemu.js";

const dir = mkdtempSync(join(tmpdir(), "qimg-snapclock-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

if (!hasQemu) console.log("skipping snapshot clock tests: qemu-img is not on PATH");

/** Byte offsets of the snapshot table entries (header fields read straight from the file). */
function entryOffsets(b: Buffer): number[] {
  const n = b.readUInt32BE(60);
  let pos = Number(b.readBigUInt64BE(64));
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    out.push(pos);
    const idLen = b.readUInt16BE(pos + 12);
    const nameLen = b.readUInt16BE(pos + 14);
    const extra = b.readUInt32BE(pos + 36);
    pos += Math.ceil((40 + extra + idLen + nameLen) / 8) * 8;
  }
  return out;
}

describe.skipIf(!hasQemu)("snapshot VM clock and icount past 2^53", () => {
  it("qimg info prints what qemu-img info prints (human and JSON)", async () => {
    const file = join(dir, "snap.qcow2");
    expect(qemuImg(["create", "-f", "qcow2", file, "1000448"]).code).toBe(0);
    expect(qemuImg(["snapshot", "-c", "first", file]).code).toBe(0);
    expect(qemuImg(["snapshot", "-c", "second", file]).code).toBe(0);
    expect(qemuImg(["snapshot", "-c", "third", file]).code).toBe(0);
    const b = readFileSync(file);
    const [e1, e2, e3] = entryOffsets(b) as [number, number, number];
    b.writeBigUInt64BE(2n ** 63n + 123_456_789_012n, e1 + 24); // vm_clock_nsec
    b.writeBigUInt64BE(2n ** 64n - 1n, e2 + 24);
    b.writeBigUInt64BE(2n ** 63n + 5n, e2 + 40 + 16); // icount (extra data)
    b.writeBigUInt64BE(2n ** 53n + 1n, e3 + 24);
    b.writeBigUInt64BE(2n ** 53n + 3n, e3 + 40 + 16);
    writeFileSync(file, b);
    for (const output of ["human", "json"]) {
      const want = qemuImg(["info", `--output=${output}`, file], dir);
      expect(want.code, want.stderr).toBe(0);
      const got = await qimg(["info", `--output=${output}`, file], dir);
      expect(got.stderr).toBe("");
      expect(got.code).toBe(0);
      expect(got.stdout).toBe(want.stdout);
    }
    // and `snapshot -l` lists the same rows (an icount with the top bit set is signed there too)
    const want = qemuImg(["snapshot", "-l", file], dir);
    expect(want.code, want.stderr).toBe(0);
    expect(want.stdout).toMatch(/-9223372036854775803/);
    const got = await qimg(["snapshot", "-l", file], dir);
    expect([got.code, got.stderr]).toEqual([0, ""]);
    expect(got.stdout).toBe(want.stdout);
  });
});

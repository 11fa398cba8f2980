/**
 * `convert --salvage` against qemu-img 7.2 on damaged qcow2 sources: a compressed cluster
 * whose data does not inflate, and an L1 entry naming a misaligned L2 table. With --salvage
 * both copy unreadable sectors as zeros, print the same warnings (per 512-byte sector, for
 * reads and for block status) in the same order, and exit 0 with the same guest bytes;
 * without it both fail with exit 1 (and qimg leaves no target).
 */
import { existsSync, mkdtempSync, openSync, readSync, rmSync, writeSync, closeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, qemuImg, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping convert --salvage tests: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-salvage-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function ok(run: { code: number; stdout: string; stderr: string }): void {
  if (run.code !== 0 || /error|failed/i.test(run.stdout)) throw new Error(run.stdout + run.stderr);
}

function u64(fd: number, at: number): bigint {
  const b = Buffer.alloc(8);
  readSync(fd, b, 0, 8, at);
  return b.readBigUInt64BE(0);
}

function putU64(fd: number, at: number, v: bigint): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  writeSync(fd, b, 0, 8, at);
}

/** The L1 table's offset (header bytes 40..47). */
function l1Offset(fd: number): number {
  return Number(u64(fd, 40));
}

/** A qcow2 image `name` (64 KiB clusters) of `size` in the scratch directory, then `writes` by qemu-io. */
function makeQcow2(name: string, size: string, writes: readonly string[]): void {
  ok(qemuImg(["create", "-q", "-f", "qcow2", name, size], tmp));
  ok(qemuIo([...writes.flatMap((c) => ["-c", c]), name], tmp));
}

/**
 * Overwrite the start of the deflate stream of the compressed clusters that the entries at
 * `indexes` of `name`'s first L2 table point to (64 KiB clusters).
 */
function spoilCompressed(name: string, indexes: readonly number[]): void {
  const fd = openSync(join(tmp, name), "r+");
  const l2 = Number(u64(fd, l1Offset(fd)) & 0x00fffffffffffe00n);
  const offsetBits = 62n - (16n - 8n); // cluster_bits 16
  for (const index of indexes) {
    const host = Number(u64(fd, l2 + 8 * index) & ((1n << offsetBits) - 1n));
    writeSync(fd, Buffer.alloc(64, 0xff), 0, 64, host);
  }
  closeSync(fd);
}

describe.skipIf(!hasQemu)("convert --salvage against qemu-img", () => {
  beforeAll(() => {
    // 64 KiB clusters; size not a multiple of the cluster.
    makeQcow2("comp.qcow2", "1000000", [
      "write -c -P 5 0 64k",
      "write -P 6 64k 64k",
      "write -c -P 7 128k 64k",
    ]);
    // Overwrite the start of the first compressed cluster's deflate stream.
    spoilCompressed("comp.qcow2", [0]);

    makeQcow2("l2.qcow2", "600000", [
      "write -P 5 0 64k",
      "write -P 6 256k 64k",
      "write -P 7 512k 64k",
    ]);
    // The first L1 entry names an L2 table at a misaligned offset.
    const fd2 = openSync(join(tmp, "l2.qcow2"), "r+");
    const l1 = l1Offset(fd2);
    const e = u64(fd2, l1);
    putU64(fd2, l1, (e & ~0xffffn) | 0x8000n);
    closeSync(fd2);
  });

  for (const out of ["raw", "qcow2", "qed"]) {
    it(`a compressed cluster that does not inflate, -O ${out}`, async () => {
      const args = ["convert", "--salvage", "-O", out, "comp.qcow2"];
      const theirs = qemuImg([...args, `c-theirs.${out}`], tmp);
      const ours = await qimg([...args, `c-ours.${out}`], tmp);
      expect(theirs.code).toBe(0);
      expect(ours.code).toBe(0);
      // 128 sectors of the broken cluster, one line each, in qemu-img's words.
      expect(ours.stderr.split("\n").filter(Boolean)).toHaveLength(128);
      expect(ours.stderr).toBe(theirs.stderr.replaceAll("qemu-img: ", "qimg: "));
      const cmp = qemuImg(
        ["compare", "-f", out, "-F", out, `c-theirs.${out}`, `c-ours.${out}`],
        tmp,
      );
      expect(cmp.stdout).toBe("Images are identical.\n");
      if (out !== "raw") expect(qemuImg(["check", "-f", out, `c-ours.${out}`], tmp).code).toBe(0);
    });
  }

  // (A small image: qemu-img prints some 20 lines per unreadable KiB.)
  it("an L2 table at a misaligned offset: same bytes, the same warnings in the same order", async () => {
    const args = ["convert", "--salvage", "-O", "qcow2", "l2.qcow2"];
    const theirs = qemuImg([...args, "l-theirs.qcow2"], tmp);
    const ours = await qimg([...args, "l-ours.qcow2"], tmp);
    expect(theirs.code).toBe(0);
    expect(ours.code).toBe(0);
    expect(qemuImg(["compare", "l-theirs.qcow2", "l-ours.qcow2"], tmp).stdout).toBe(
      "Images are identical.\n",
    );
    expect(qemuImg(["check", "l-ours.qcow2"], tmp).code).toBe(0);
    // Each sector whose block status fails is warned of in a first walk, then again before
    // its read during the copy, followed by the read's own warning. qemu-img's qcow2 driver
    // also reports the corruption itself once (a line qimg does not print).
    const lines = theirs.stderr.split("\n");
    expect(lines[0]).toMatch(/^qcow2: Image is corrupt: /);
    const expected = lines.slice(1).join("\n").replaceAll("qemu-img: ", "qimg: ");
    expect(ours.stderr).toMatch(/error while reading block status at offset 0: /);
    expect(ours.stderr).toBe(expected);
  });

  it("two broken clusters chunks apart: the same warnings (qemu-img interleaves its parallel requests' lines; qimg prints them in offset order)", async () => {
    makeQcow2("two.qcow2", "8M", [
      "write -c -P 5 1M 64k",
      "write -P 6 3M 1M",
      "write -c -P 7 5M 64k",
    ]);
    spoilCompressed("two.qcow2", [16, 80]); // the clusters at 1M and 5M
    for (const extra of [[], ["-W", "-m", "16"]]) {
      const args = ["convert", "--salvage", ...extra, "-O", "raw", "two.qcow2"];
      const theirs = qemuImg([...args, "two-theirs.raw"], tmp);
      const ours = await qimg([...args, "two-ours.raw"], tmp);
      expect([theirs.code, ours.code]).toEqual([0, 0]);
      const lines = ours.stderr.split("\n").filter(Boolean);
      expect(lines).toHaveLength(256);
      const offsets = lines.map((l) => Number(/offset (\d+)/.exec(l)![1]));
      expect(offsets).toEqual([...offsets].sort((a, b) => a - b));
      const sorted = (t: string) => t.split("\n").filter(Boolean).sort();
      expect(sorted(ours.stderr)).toEqual(sorted(theirs.stderr.replaceAll("qemu-img: ", "qimg: ")));
      const cmp = qemuImg(
        ["compare", "-f", "raw", "-F", "raw", "two-theirs.raw", "two-ours.raw"],
        tmp,
      );
      expect(cmp.stdout).toBe("Images are identical.\n");
    }
  });

  it("without --salvage both fail with exit 1, and qimg leaves no target", async () => {
    for (const src of ["comp.qcow2", "l2.qcow2"]) {
      const theirs = qemuImg(["convert", "-O", "qcow2", src, "f-theirs.qcow2"], tmp);
      const ours = await qimg(["convert", "-O", "qcow2", src, "f-ours.qcow2"], tmp);
      expect(theirs.code, src).toBe(1);
      expect(ours.code, src).toBe(1);
      expect(ours.stderr.split("\n"), src).toHaveLength(2);
      expect(existsSync(join(tmp, "f-ours.qcow2")), src).toBe(false);
    }
  });

  it("-n: a convert that fails part-way leaves the existing target (partly written), as qemu-img", async () => {
    for (const who of ["theirs", "ours"]) {
      expect(qemuImg(["create", "-q", "-f", "qcow2", `n-${who}.qcow2`, "1000448"], tmp).code).toBe(
        0,
      );
    }
    const args = ["convert", "-n", "-O", "qcow2", "comp.qcow2"];
    const theirs = qemuImg([...args, "n-theirs.qcow2"], tmp);
    const ours = await qimg([...args, "n-ours.qcow2"], tmp);
    expect(theirs.code).toBe(1);
    expect(ours.code).toBe(1);
    expect(existsSync(join(tmp, "n-ours.qcow2"))).toBe(true);
    expect(qemuImg(["check", "n-ours.qcow2"], tmp).code).toBe(0);
  });
});

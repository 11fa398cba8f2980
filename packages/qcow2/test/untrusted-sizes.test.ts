/**
 * Memory from untrusted sizes (issue 10): a dirty lazy-refcounts image is repaired on a
 * read-write open by counting every reference. One changed byte in an L2 entry used to make
 * that count size an array by the highest referenced cluster (~6 GB for a reference near
 * 6 TiB): `Array buffer allocation failed` after 10 s. References past the end of the file
 * are corruption, dropped as QEMU's repair drops them: the open is quick, memory stays
 * bounded by the file, and the result matches qemu-io's on a twin.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { requireQemu } from "@qimg/fixtures";
import { compareImages, driverOps, qemuCheck, qemuImg, qemuIoOps, tool } from "./twins.js";
import type { Op } from "./twins.js";
import { prng } from "./prng.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("skipping untrusted-size twin tests: qemu-img/qemu-io are not on PATH");
const LONG = process.env.QIMG_LONG === "1";
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-untrusted-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A lazy-refcounts image left dirty by qemu-io (writes, then abort). */
function dirtyImage(file: string, seed: number): void {
  const r = prng(seed);
  const ok = (x: { code: number; stdout: string; stderr: string }, allowAbort = false): void => {
    if (x.code !== 0 && !allowAbort) throw new Error(x.stdout + x.stderr);
  };
  ok(qemuImg(["create", "-f", "qcow2", "-o", "lazy_refcounts=on", file, "20971008"]));
  const cmds: string[] = [];
  for (let i = 0; i < 6; i++) {
    const off = Math.floor(r() * 20_000_000);
    cmds.push(`write -P ${1 + i} ${off} ${1 + Math.floor(r() * 200_000)}`);
  }
  // abort leaves the dirty bit set and the refcounts stale (the -c abort of QEMU's iotest 039)
  tool("qemu-io", [...cmds.flatMap((c) => ["-c", c]), "-c", "abort", file]);
  const dirty = (fs.readFileSync(file).readBigUInt64BE(72) & 1n) === 1n;
  if (!dirty) throw new Error("qemu-io abort did not leave the image dirty");
}

/** Byte offsets of the L2 entries that map data (read from the file). */
function dataEntries(b: Buffer): number[] {
  const l1 = Number(b.readBigUInt64BE(40));
  const l1Size = b.readUInt32BE(36);
  const out: number[] = [];
  for (let i = 0; i < l1Size; i++) {
    const l2 = Number(b.readBigUInt64BE(l1 + i * 8) & 0x00ff_ffff_ffff_fe00n);
    if (l2 === 0 || l2 + 65536 > b.length) continue;
    for (let j = 0; j < 8192; j++) {
      if ((b.readBigUInt64BE(l2 + j * 8) & 0x00ff_ffff_ffff_fe00n) !== 0n) out.push(l2 + j * 8);
    }
  }
  return out;
}

describe.skipIf(!haveQemu)("a dirty image with references past the end of the file", () => {
  it("opens quickly with bounded memory and ends like qemu-io's twin", async () => {
    for (const seed of LONG ? [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] : [1, 2, 3]) {
      const dir = path.join(tmp, `s${seed}`);
      fs.mkdirSync(dir);
      const a = path.join(dir, "a.qcow2");
      const b = path.join(dir, "b.qcow2");
      dirtyImage(a, seed);
      const bytes = fs.readFileSync(a);
      const entries = dataEntries(bytes);
      expect(entries.length).toBeGreaterThan(0);
      const r = prng(seed * 7);
      const at = entries[Math.floor(r() * entries.length)]!;
      // One changed byte: the host offset's bits 40..47 (seed 1: the issue's ~6 TiB).
      bytes[at + 2] = seed === 1 ? 0x06 : 1 + Math.floor(r() * 255);
      fs.writeFileSync(a, bytes);
      fs.writeFileSync(b, bytes);
      const ops: Op[] = [
        { k: "write", off: 1_000_001, len: 70_000, seed },
        { k: "write", off: 15_000_000, len: 3000, seed: seed + 1 },
      ];
      const q = qemuIoOps(a, ops, dir);
      expect(q.code, q.stdout + q.stderr).toBe(0);
      const memBefore = process.memoryUsage().arrayBuffers;
      const t0 = performance.now();
      const failure = await driverOps(b, ops);
      const ms = performance.now() - t0;
      const grew = process.memoryUsage().arrayBuffers - memBefore;
      const ctx = `seed ${seed}, entry at ${at}: ${ms.toFixed(0)} ms, +${grew} bytes`;
      expect(failure, ctx).toBeUndefined();
      expect(ms, ctx).toBeLessThan(5000);
      expect(grew, ctx).toBeLessThan(64 * 1024 * 1024);
      // Same guest bytes, no worse verdict, and no file grown far past its data.
      expect(compareImages(a, b), ctx).toBe("");
      const A = qemuCheck(a);
      const B = qemuCheck(b);
      expect(B.checkErrors, `${ctx}\n${B.raw}`).toBeLessThanOrEqual(A.checkErrors);
      expect(B.corruptions, `${ctx}\n${B.raw}\nqemu-io's:\n${A.raw}`).toBeLessThanOrEqual(
        A.corruptions,
      );
      expect(fs.statSync(b).size, ctx).toBeLessThan(64 * 1024 * 1024);
      expect((fs.readFileSync(b).readBigUInt64BE(72) & 1n) === 0n, ctx).toBe(true);
    }
  });
});

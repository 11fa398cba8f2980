/**
 * Qcow2Image.makeEmpty on images written by qemu-io (data, zero, discarded and compressed
 * clusters; extended L2, version 2, lazy refcounts, internal snapshots): afterwards the image
 * reads exactly as its backing file (`qemu-img compare`), `qemu-img map` shows nothing
 * allocated in it, `qemu-img check` is clean, and a snapshot still reads as before.
 */
import path from "node:path";
import { describe, expect, it } from "vitest";
import { requireQemu } from "@qimg/fixtures";
import { prng } from "./prng.js";
import { openRw, qemuImg, qemuIoOps, qemuMap, randomOps, scratchDirs, tool } from "./twins.js";

const haveQemu = requireQemu();
const LONG = process.env.QIMG_LONG === "1";
const SEED = Number(process.env.QIMG_SEED ?? 90);
const freshDir = scratchDirs("qimg-make-empty-");

describe.skipIf(!haveQemu)("makeEmpty, as QEMU's bdrv_make_empty", () => {
  const runs = LONG ? 80 : 12;
  for (let k = 0; k < runs; k++) {
    const seed = SEED + k;
    it(`seed ${seed}`, async () => {
      const r = prng(seed);
      const dir = freshDir();
      const cs = [512, 4096, 65536][k % 3]!;
      const size = 200_000 + Math.floor(r() * 900_000) * 2;
      const sectorSize = Math.ceil(size / 512) * 512;
      const base = path.join(dir, "base.raw");
      const top = path.join(dir, "top.qcow2");
      expect(qemuImg(["create", "-q", "-f", "raw", base, String(sectorSize)]).code).toBe(0);
      expect(tool("qemu-io", ["-f", "raw", "-c", `write -P 9 0 ${sectorSize}`, base]).code).toBe(0);
      const v2 = r() < 0.2;
      const opts = [`cluster_size=${cs}`, `compat=${v2 ? "0.10" : "1.1"}`];
      if (!v2 && cs >= 16384 && r() < 0.3) opts.push("extended_l2=on");
      if (!v2 && r() < 0.3) opts.push("lazy_refcounts=on");
      const mk = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts.join(","),
        "-b",
        "base.raw",
        "-F",
        "raw",
      ];
      expect(qemuImg([...mk, top, String(size)]).code).toBe(0);
      const ops = randomOps(seed, sectorSize, cs, 14, { compressed: true });
      const io = qemuIoOps(top, ops, dir);
      expect(io.code, io.stderr).toBe(0);
      const snap = r() < 0.4;
      let snapRaw = "";
      if (snap) {
        expect(qemuImg(["snapshot", "-c", "s1", top]).code).toBe(0);
        expect(qemuIoOps(top, randomOps(seed + 1, sectorSize, cs, 6), dir).code).toBe(0);
        snapRaw = path.join(dir, "snap.raw");
        expect(qemuImg(["convert", "-l", "s1", "-O", "raw", top, snapRaw]).code).toBe(0);
      }
      const image = await openRw(top);
      await image.makeEmpty();
      await image.close();
      const label = `seed ${seed} (${opts.join(",")}${snap ? ", snapshot" : ""})`;
      const check = qemuImg(["check", top]);
      expect(check.code, `${label}: ${check.stdout}${check.stderr}`).toBe(0);
      const cmp = qemuImg(["compare", "-f", "qcow2", "-F", "raw", top, base]);
      expect(cmp.stdout + cmp.stderr, label).toMatch(/Images are identical/);
      // (The raw base covers the whole disk: every range the top does not hold is at depth 1.)
      const own = qemuMap(top).filter((e) => e.depth === 0);
      expect(own, label).toEqual([]);
      if (snap) {
        const after = path.join(dir, "snap-after.raw");
        expect(qemuImg(["convert", "-l", "s1", "-O", "raw", top, after]).code).toBe(0);
        const c2 = qemuImg(["compare", "-f", "raw", "-F", "raw", snapRaw, after]);
        expect(c2.stdout, `${label}: snapshot`).toMatch(/Images are identical/);
      }
    });
  }
});

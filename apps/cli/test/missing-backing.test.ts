/**
 * An image whose backing file is missing: qemu-img check fails (exit 1, "Could not open ...:
 * Could not open backing file: ..."), never a silent success; info (without the chain) still
 * works; map, convert and qemu-io fail with exit 1. qimg must give the same verdicts, on twin
 * images made by qemu-img (qcow2 and QED, odd sizes, relative and absolute backing names).
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping missing-backing interop: qemu-img is not on PATH");

const SEED = Number(process.env.QIMG_SEED ?? Date.now() % 1_000_000);
const tmp = mkdtempSync(join(tmpdir(), "qimg-missing-backing-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const firstLine = (s: string): string => s.split("\n")[0] ?? "";

describe.skipIf(!hasQemu)(`missing backing file: qemu-img's verdicts (seed ${SEED})`, () => {
  const rnd = prng(SEED);
  let n = 0;
  for (const fmt of ["qcow2", "qed"] as const) {
    for (const naming of ["relative", "absolute", "subdir"] as const) {
      const size = 1 + Math.floor(rnd() * 50_000_000);
      it(`${fmt}, ${naming} backing name, size ${size}`, async () => {
        const dir = join(tmp, `case${n++}`);
        mkdirSync(join(dir, "sub"), { recursive: true });
        const base =
          naming === "absolute"
            ? join(dir, `base.${fmt}`)
            : naming === "subdir"
              ? `sub/base.${fmt}`
              : `base.${fmt}`;
        const baseOnDisk = base.startsWith("/") ? base : join(dir, base);
        expect(qemuImg(["create", "-q", "-f", fmt, baseOnDisk, String(size)]).code).toBe(0);
        expect(
          qemuImg(["create", "-q", "-f", fmt, "-b", base, "-F", fmt, "top." + fmt], dir).code,
        ).toBe(0);
        // A twin for each side, so a repair attempt by one cannot change what the other sees.
        expect(
          qemuImg(["create", "-q", "-f", fmt, "-b", base, "-F", fmt, "twin." + fmt], dir).code,
        ).toBe(0);
        rmSync(baseOnDisk);
        const theirsFile = `top.${fmt}`;
        const oursFile = `twin.${fmt}`;
        const same = (s: string): string =>
          s.replaceAll("qemu-img:", "qimg:").replaceAll(theirsFile, oursFile);

        for (const args of [
          ["check"],
          ["check", "--output=json"],
          ["check", "-q"],
          ["check", "-r", "leaks"],
          ["check", "-r", "all"],
          ["check", "-f", fmt],
        ]) {
          const theirs = qemuImg([...args, theirsFile], dir);
          const ours = await qimg([...args, oursFile], dir);
          expect(theirs.code, `qemu-img ${args.join(" ")}`).toBe(1);
          expect({ args, code: ours.code, stdout: ours.stdout, stderr: ours.stderr }).toEqual({
            args,
            code: theirs.code,
            stdout: theirs.stdout,
            stderr: same(theirs.stderr),
          });
        }

        // info without --backing-chain does not open the backing file: it succeeds.
        const ti = qemuImg(["info", theirsFile], dir);
        const oi = await qimg(["info", oursFile], dir);
        expect(ti.code).toBe(0);
        expect(oi.code).toBe(ti.code);
        expect(firstLine(oi.stdout)).toBe(same(firstLine(ti.stdout)));

        // map, convert and qemu-io fail to open the image.
        for (const args of [["map"], ["map", "--output=json"]]) {
          const theirs = qemuImg([...args, theirsFile], dir);
          const ours = await qimg([...args, oursFile], dir);
          expect(theirs.code).toBe(1);
          expect(ours.code).toBe(theirs.code);
          expect(ours.stdout).toBe("");
          // qemu-img's line: "Could not open '<file>': Could not open backing file: ...".
          expect(firstLine(ours.stderr)).toBe(same(firstLine(theirs.stderr)));
        }
        // Other commands that open the image: the same line and exit code.
        const others = (f: string): string[][] => [
          ["compare", f, f],
          ["dd", `if=${f}`, "of=dd.raw", "-O", "raw"],
          ["measure", "-O", "raw", f],
          ["bench", "-c", "1", f],
        ];
        for (const [i, args] of others(theirsFile).entries()) {
          const theirs = qemuImg(args, dir);
          const ours = await qimg(others(oursFile)[i]!, dir);
          expect(ours.code, args.join(" ")).toBe(theirs.code);
          expect(firstLine(ours.stderr), args.join(" ")).toBe(same(firstLine(theirs.stderr)));
        }
        const tc = qemuImg(["convert", "-O", "raw", theirsFile, "theirs.raw"], dir);
        const oc = await qimg(["convert", "-O", "raw", oursFile, "ours.raw"], dir);
        expect(tc.code).toBe(1);
        expect(oc.code).toBe(tc.code);
        expect(firstLine(oc.stderr)).toBe(same(firstLine(tc.stderr)));
        expect(existsSync(join(dir, "theirs.raw"))).toBe(false);
        expect(existsSync(join(dir, "ours.raw"))).toBe(false);
        const tio = qemuIo(["-c", "read 0 512", theirsFile], dir);
        const oio = await qimg(["io", "-c", "read 0 512", oursFile], dir);
        expect(tio.code).toBe(1);
        expect(oio.code).toBe(tio.code);
        // qemu-io's line: "can't open device <file>: Could not open backing file: ...".
        expect(firstLine(oio.stderr)).toBe(
          same(firstLine(tio.stderr).replace(/^qemu-io:/, "qemu-img:")),
        );
      });
    }
  }

  for (const absolute of [false, true]) {
    const size = 1 + Math.floor(rnd() * 50_000_000);
    it(`qcow2 with a missing external data file (${absolute ? "absolute" : "relative"} name, size ${size})`, async () => {
      const dir = join(tmp, `case${n++}`);
      mkdirSync(dir, { recursive: true });
      for (const side of ["theirs", "ours"]) {
        const df = absolute ? join(dir, `${side}.raw`) : `${side}.raw`;
        expect(
          qemuImg(
            ["create", "-q", "-f", "qcow2", "-o", `data_file=${df}`, `${side}.qcow2`, String(size)],
            dir,
          ).code,
        ).toBe(0);
        rmSync(join(dir, `${side}.raw`));
      }
      const same = (s: string): string =>
        s.replaceAll("qemu-img:", "qimg:").replaceAll("theirs.", "ours.");
      for (const args of [["check"], ["check", "--output=json"], ["check", "-r", "all"]]) {
        const theirs = qemuImg([...args, "theirs.qcow2"], dir);
        const ours = await qimg([...args, "ours.qcow2"], dir);
        expect(theirs.code).toBe(1);
        expect({ code: ours.code, stdout: ours.stdout, stderr: ours.stderr }).toEqual({
          code: theirs.code,
          stdout: theirs.stdout,
          stderr: same(theirs.stderr),
        });
      }
    });
  }
});

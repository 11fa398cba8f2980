/**
 * qemu-img command lines that qimg refused or misread: `resize FILE -1M` (a negative size
 * without `--`), `check --output=xml` (accepted silently before; qemu-img refuses it),
 * `convert -q` and `convert -O qcow2 -o help` (no file names).
 */
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { sizeLast } from "../src/cli.js";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg } from "./qemu.js";

if (!hasQemu) console.log("skipping the qemu-img side of the syntax tests: no qemu-img");

const tmp = mkdtempSync(join(tmpdir(), "qimg-syntax-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function randomFile(name: string, size: number, seed: number): string {
  const rnd = prng(seed);
  const buf = new Uint8Array(size);
  for (let i = 0; i < size; i++) buf[i] = Math.floor(rnd() * 256);
  const path = join(tmp, name);
  writeFileSync(path, buf);
  return path;
}

describe("resize FILE -SIZE (no --)", () => {
  const seed = Number(process.env.QIMG_SEED ?? 31337);

  it("shrinks a raw image by 1M exactly as qemu-img resize does", async () => {
    const ours = randomFile("ours.raw", 3_000_123, seed);
    const r = await qimg(["resize", "--shrink", "-f", "raw", ours, "-1M"]);
    expect(r.code, `seed ${seed}: ${r.stderr}`).toBe(0);
    expect(r.stdout).toBe("Image resized.\n");
    if (hasQemu) {
      const theirs = randomFile("theirs.raw", 3_000_123, seed);
      expect(qemuImg(["resize", "--shrink", "-f", "raw", theirs, "-1M"]).code).toBe(0);
      expect(statSync(ours).size).toBe(statSync(theirs).size);
      expect(readFileSync(ours).equals(readFileSync(theirs))).toBe(true);
    } else {
      expect(statSync(ours).size).toBe(Math.ceil((3_000_123 - 1048576) / 512) * 512);
    }
  });

  it("without --shrink, refuses as qemu-img does and leaves the file as it was", async () => {
    const file = randomFile("keep.raw", 2_000_001, seed + 1);
    const before = readFileSync(file);
    const r = await qimg(["resize", "-f", "raw", file, "-1M"]);
    expect(r.code).toBe(1);
    // qemu-img prints its warning about shrinking after the refusal, and so does qimg.
    expect(r.stderr).toBe(
      "qimg: Use the --shrink option to perform a shrink operation.\n" +
        "qimg: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.\n",
    );
    expect(readFileSync(file).equals(before)).toBe(true);
    if (hasQemu) {
      const q = qemuImg(["resize", "-f", "raw", file, "-1M"]);
      expect(q.code).toBe(1);
      expect(q.stderr.replace(/^qemu-img:/gm, "qimg:")).toBe(r.stderr);
    }
  });

  it("only resize's last argument is moved behind --", () => {
    expect(sizeLast(["resize", "f", "-1M"])).toEqual(["resize", "f", "--", "-1M"]);
    expect(sizeLast(["--debug", "resize", "--shrink", "f", "-.5G"])).toEqual([
      "--debug",
      "resize",
      "--shrink",
      "f",
      "--",
      "-.5G",
    ]);
    for (const argv of [
      ["resize", "f", "--", "-1M"],
      ["resize", "f", "+1M"],
      ["resize", "--help"],
      ["info", "f", "-1"],
    ]) {
      expect(sizeLast(argv)).toEqual(argv);
    }
  });
});

describe("check --output=FMT", () => {
  it("refuses anything but human and json, as info does and as qemu-img does", async () => {
    const image = join(tmp, "c.qcow2");
    expect((await qimg(["create", "-q", "-f", "qcow2", image, "1000000"])).code).toBe(0);
    const check = await qimg(["check", "--output=xml", image]);
    const info = await qimg(["info", "--output=xml", image]);
    expect(check.code).toBe(1);
    expect(check.stdout).toBe("");
    expect(check.stderr.trim().split("\n")).toHaveLength(1);
    expect(check.stderr).toMatch(/argument 'xml' is invalid\. Allowed choices are human, json/);
    expect(check.stderr.replace(/<\w+>/, "<x>")).toBe(info.stderr.replace(/<\w+>/, "<x>"));
    expect((await qimg(["check", "--output=json", image])).code).toBe(0);
    if (hasQemu) expect(qemuImg(["check", "--output=xml", image]).code).toBe(check.code);
  });
});

describe("convert -q and convert -O FMT -o help", () => {
  it("-o help needs no file names and prints what qemu-img prints", async () => {
    for (const fmt of ["qcow2", "qed", "raw"]) {
      const r = await qimg(["convert", "-O", fmt, "-o", "help"]);
      expect(r.stderr).toBe("");
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(new RegExp(`^Supported ${fmt} options:\\n`));
      if (hasQemu) {
        const q = qemuImg(["convert", "-O", fmt, "-o", "help"]);
        expect(q.code).toBe(0);
        expect(r.stdout.split("\n")[0]).toBe(q.stdout.split("\n")[0]);
      }
    }
  });

  it("without file names (and no -o help), refuses as qemu-img does", async () => {
    for (const args of [
      ["convert", "-O", "qcow2"],
      ["convert", "-O", "qcow2", join(tmp, "x.raw")],
    ]) {
      const r = await qimg(args);
      expect(r.code).toBe(1);
      expect(r.stderr).toBe("qimg: Must specify image file name\n");
      if (hasQemu) expect(qemuImg(args).stderr).toBe("qemu-img: Must specify image file name\n");
    }
  });

  it("-q is accepted and silences -p, as in qemu-img", async () => {
    const src = randomFile("q.raw", 1_500_007, 99);
    const r = await qimg([
      "convert",
      "-q",
      "-p",
      "-f",
      "raw",
      "-O",
      "qcow2",
      src,
      join(tmp, "q.qcow2"),
    ]);
    expect(r).toEqual({ code: 0, stdout: "", stderr: "" });
    if (hasQemu) {
      const q = qemuImg([
        "convert",
        "-q",
        "-p",
        "-f",
        "raw",
        "-O",
        "qcow2",
        src,
        join(tmp, "qq.qcow2"),
      ]);
      expect(q).toEqual({ code: 0, stdout: "", stderr: "" });
      expect(qemuImg(["compare", "-f", "raw", "-F", "qcow2", src, join(tmp, "q.qcow2")]).code).toBe(
        0,
      );
    }
  });
});

import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { requireQemu } from "@qimg/fixtures";
import { qimg, qimgProcess } from "./helpers.js";

const hasQemu = requireQemu();
if (!hasQemu) console.log("skipping resize/QED interop: qemu-img is not on PATH");
const tmp = mkdtempSync(join(tmpdir(), "qimg-resize-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe.skipIf(!hasQemu)("qimg resize", () => {
  it.each(["qcow2", "qed"])(
    "%s: grows; qemu-img sees the new size and a clean image",
    async (fmt) => {
      const file = join(tmp, `grow.${fmt}`);
      expect((await qimg(["create", "-q", "-f", fmt, file, "1M"])).code).toBe(0);
      expect((await qimg(["io", "-c", "write -P 0x42 0 64k", file])).code).toBe(0);
      const r = await qimg(["resize", file, "+3G"]);
      expect(r.stdout).toBe("Image resized.\n");
      expect(r.code).toBe(0);
      const info = JSON.parse(
        execFileSync("qemu-img", ["info", "--output=json", file], { encoding: "utf8" }),
      );
      expect(info["virtual-size"]).toBe((1 << 20) + 3 * 2 ** 30);
      expect(spawnSync("qemu-img", ["check", file]).status).toBe(0);
      expect(spawnSync("qemu-io", ["-f", fmt, "-c", "read -P 0x42 0 64k", file]).status).toBe(0);
    },
  );

  it("refuses to shrink without --shrink, as qemu-img (error, then its warning)", async () => {
    const file = join(tmp, "shrink.qcow2");
    await qimg(["create", "-q", "-f", "qcow2", file, "2M"]);
    const r = await qimg(["resize", file, "1M"]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(
      "qimg: Use the --shrink option to perform a shrink operation.\n" +
        "qimg: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.\n",
    );
    const q = await qimg(["resize", "--shrink", file, "1M"]);
    expect(q.code).toBe(0);
    expect(q.stdout).toBe("Image resized.\n");
    expect(spawnSync("qemu-img", ["check", file]).status).toBe(0);
  });

  it("shrinks a raw file with --shrink", async () => {
    const file = join(tmp, "r.raw");
    await qimg(["create", "-q", "-f", "raw", file, "2M"]);
    expect((await qimg(["resize", "-f", "raw", "--shrink", file, "512K"])).code).toBe(0);
    expect(statSync(file).size).toBe(512 * 1024);
  });
});

describe.skipIf(!hasQemu)("QED need-check bit through qimg io", () => {
  const needCheck = (file: string): boolean => (readFileSync(file).readUInt32LE(16) & 2) !== 0;

  it("is set after an aborted qimg io and repaired by the next read-write open", () => {
    const file = join(tmp, "abort.qed");
    execFileSync("qemu-img", ["create", "-q", "-f", "qed", file, "4M"]);
    const r = qimgProcess(["io", "-c", "write -P 0x11 0 64k", "-c", "abort", file]);
    expect(r.code).not.toBe(0);
    expect(needCheck(file)).toBe(true);
    const clean = qimgProcess(["io", "-c", "read -P 0x11 0 64k", file]);
    expect(clean.code, clean.stdout + clean.stderr).toBe(0);
    expect(needCheck(file)).toBe(false);
    expect(spawnSync("qemu-img", ["check", file]).status).toBe(0);
  });

  it("is clear after a clean close", () => {
    const file = join(tmp, "clean.qed");
    execFileSync("qemu-img", ["create", "-q", "-f", "qed", file, "4M"]);
    expect(qimgProcess(["io", "-c", "write -P 0x22 0 128k", file]).code).toBe(0);
    expect(needCheck(file)).toBe(false);
    expect(spawnSync("qemu-io", ["-f", "qed", "-c", "read -P 0x22 0 128k", file]).status).toBe(0);
  });

  it("QED refuses compression and snapshots-like operations with a clear message", async () => {
    const src = join(tmp, "c.raw");
    await qimg(["create", "-q", "-f", "raw", src, "1M"]);
    const r = await qimg(["convert", "-c", "-O", "qed", src, join(tmp, "c.qed")]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/Compression not supported for this file format/);
  });
});

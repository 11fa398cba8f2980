/**
 * `create -b` with a backing file that cannot be opened: qemu-img's first line ("Could not open
 * 'X': <strerror words>"), chosen by the error's errno code, with the same exit code, and no
 * image left behind.
 */
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, qemuImg } from "./qemu.js";

if (!hasQemu) console.log("skipping create -b error tests: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-create-backing-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe.skipIf(!hasQemu)("create -b with a backing file that cannot be opened", () => {
  it.each([
    ["a missing file", "nope.qcow2"],
    ["a missing directory", "nodir/base.qcow2"],
  ])("%s: qemu-img's first line and exit code, no image made", async (_what, backing) => {
    for (const format of ["qcow2", "qed"]) {
      const args = (out: string) => ["create", "-f", format, "-b", backing, "-F", "qcow2", out];
      const theirs = qemuImg(args(`theirs.${format}`), tmp);
      const ours = await qimg(args(`ours.${format}`), tmp);
      expect(ours.code).toBe(theirs.code);
      const first = theirs.stderr.split("\n")[0]!.replace(/^qemu-img: /, "qimg: ");
      expect(ours.stderr).toBe(first.replace(`theirs.${format}`, `ours.${format}`) + "\n");
      expect(existsSync(join(tmp, `ours.${format}`))).toBe(false);
    }
  });
});

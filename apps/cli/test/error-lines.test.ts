/**
 * System errors and lock refusals print one line with qemu-img's words: `convert` and `dd`
 * onto a target that cannot be created (name too long, a file where a directory should be, a
 * symbolic link loop) or that a QEMU process has open. qemu-img's line, with its
 * "Could not create 'X': " detail removed and its second line joined, is qimg's line.
 */
import { existsSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { IoError } from "@qimg/structs";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { describeError } from "../src/errors.js";
import { qimg } from "./helpers.js";
import { hasQemu, qemuImg, holdWithQemuIo, releaseQemuIo } from "./qemu.js";

const haveProcLocks = existsSync("/proc/locks");
if (!hasQemu) console.log("skipping error-line tests against qemu-img: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-error-lines-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

afterEach(releaseQemuIo);

/** qemu-img's stderr as qimg words it: one line, without "Could not create 'X': ". */
function asQimg(stderr: string): string {
  return stderr
    .replace(/^qemu-img: /, "qimg: ")
    .replace(/Could not create '[^']*': /, "")
    .replace(/\n(?=.)/, ". ");
}

describe.skipIf(!hasQemu)("convert and dd onto targets that cannot be written", () => {
  it("print qemu-img's line, on one line, with the same exit code", async () => {
    expect(qemuImg(["create", "-q", "-f", "qcow2", "src.qcow2", "1000448"], tmp).code).toBe(0);
    writeFileSync(join(tmp, "afile"), "x");
    symlinkSync("loop2", join(tmp, "loop1"));
    symlinkSync("loop1", join(tmp, "loop2"));
    const targets = ["n".repeat(300), "afile/x", "loop1"];
    if (haveProcLocks) {
      expect(qemuImg(["create", "-q", "-f", "qcow2", "held.qcow2", "1M"], tmp).code).toBe(0);
      await holdWithQemuIo(join(tmp, "held.qcow2"));
      targets.push("held.qcow2");
    } else {
      console.log("skipping the lock case: no /proc/locks (not Linux)");
    }
    for (const target of targets) {
      const runs = [
        ...["raw", "qcow2", "qed"].map((f) => ["convert", "-O", f, "src.qcow2", target]),
        ["dd", "if=src.qcow2", `of=${target}`],
      ];
      for (const args of runs) {
        const what = args.join(" ").slice(0, 80);
        const theirs = qemuImg(args, tmp);
        const ours = await qimg(args, tmp);
        expect(theirs.code, what).toBe(1);
        expect(ours.code, `${what}: ${ours.stderr}`).toBe(1);
        expect(ours.stderr.split("\n"), what).toHaveLength(2);
        expect(ours.stderr, what).toBe(asQimg(theirs.stderr));
      }
    }
  }, 60_000);
});

describe("system errors in strerror words", () => {
  const sys = (code: string, text: string): Error =>
    Object.assign(new Error(`${code}: ${text}, write`), { code });

  it.each([
    ["ENOSPC", "No space left on device"],
    ["EDQUOT", "Disk quota exceeded"],
    ["EFBIG", "File too large"],
    ["EROFS", "Read-only file system"],
    ["EIO", "Input/output error"],
  ])("%s after a write", (code, words) => {
    const e = new IoError(
      `x.qcow2: write of 512 bytes at offset 4096 failed: ${code}: raw, write`,
      {
        cause: sys(code, "raw"),
      },
    );
    const d = describeError(e);
    expect(d.internal).toBe(false);
    expect(d.line).toBe(`qimg: x.qcow2: write of 512 bytes at offset 4096 failed: ${words}`);
  });

  it.each([
    ["ENAMETOOLONG", "File name too long"],
    ["EMFILE", "Too many open files"],
    ["EISDIR", "Is a directory"],
    ["ENOTDIR", "Not a directory"],
    ["ELOOP", "Too many levels of symbolic links"],
  ])("%s from the system (not a qimg error) is an expected error", (code, words) => {
    const d = describeError(sys(code, "raw"));
    expect(d.internal).toBe(false);
    expect(d.line).toBe(`qimg: ${words}`);
  });
});

/**
 * An image whose bitmaps extension has lost its autoclear bit (a program without bitmap support
 * wrote it): every command that opens it prints qemu-img's two warning lines (once per open),
 * and a read-write open drops the extension as QEMU's does — the file afterwards is
 * byte-identical to the one qemu-io leaves. qemu-img 7.2 ends the second line without a
 * newline; qimg ends it (a named difference), so stderr is compared with that newline added.
 */
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, qemuImg, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping stale bitmap tests: qemu-img is not on PATH");
const dir = mkdtempSync(join(tmpdir(), "qimg-stale-bitmaps-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const WARNING =
  "warning: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent\n" +
  "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.";

/** qemu's stderr in qimg's words: program name, and the missing newline after the warning. */
function asQimg(stderr: string, tool = "qemu-img"): string {
  return stderr
    .replaceAll(`${tool}: warning:`, "qimg: warning:")
    .replaceAll("on the image file to fix.", "on the image file to fix.\n")
    .replaceAll("fix.\n\n", "fix.\n");
}

/** A qcow2 image with a bitmap whose header's autoclear bitmaps bit has been cleared. */
function staleImage(name: string): string {
  const file = join(dir, name);
  expect(qemuImg(["create", "-q", "-f", "qcow2", file, "1000448"]).code).toBe(0);
  expect(qemuIo(["-c", "write -P 7 0 70000", file]).code).toBe(0);
  expect(qemuImg(["bitmap", "--add", file, "b0"]).code).toBe(0);
  const b = readFileSync(file);
  b.writeBigUInt64BE(0n, 88); // autoclear_features
  writeFileSync(file, b);
  return file;
}

describe.skipIf(!hasQemu)("a bitmaps extension without its autoclear bit", () => {
  it("every open prints qemu-img's warning, and the outputs are the same", async () => {
    const src = staleImage("stale.qcow2");
    const cases: string[][] = [
      ["info", "F"],
      ["info", "--output=json", "F"],
      ["map", "--output=json", "F"],
      ["compare", "F", "F"],
      ["convert", "-O", "raw", "F", "OUT"],
      ["check", "F"],
    ];
    for (const args of cases) {
      const what = args.join(" ");
      const theirs = join(dir, "theirs.qcow2");
      const ours = join(dir, "ours.qcow2");
      copyFileSync(src, theirs);
      copyFileSync(src, ours);
      const q = qemuImg(
        args.map((a) => (a === "F" ? theirs : a === "OUT" ? join(dir, "t.raw") : a)),
      );
      const m = await qimg(
        args.map((a) => (a === "F" ? ours : a === "OUT" ? join(dir, "o.raw") : a)),
      );
      expect(q.stderr, what).toContain(WARNING);
      expect(m.code, what).toBe(q.code);
      expect(m.stderr.replaceAll(ours, "F"), what).toBe(asQimg(q.stderr).replaceAll(theirs, "F"));
      expect(m.stdout.replaceAll(ours, "F"), what).toBe(q.stdout.replaceAll(theirs, "F"));
    }
  });

  it("a read-write open drops the extension as QEMU's does: the same file as qemu-io leaves", async () => {
    const src = staleImage("stale-rw.qcow2");
    const theirs = join(dir, "rw-theirs.qcow2");
    const ours = join(dir, "rw-ours.qcow2");
    copyFileSync(src, theirs);
    copyFileSync(src, ours);
    const q = qemuIo(["-c", "write -P 9 4096 512", theirs]);
    const m = await qimg(["io", "-c", "write -P 9 4096 512", ours]);
    expect([m.code, m.stderr]).toEqual([q.code, asQimg(q.stderr, "qemu-io")]);
    expect(readFileSync(ours).equals(readFileSync(theirs)), "byte-identical files").toBe(true);
    // Opened again, neither warns any more; both checkers see the bitmap's clusters leaked.
    const again = await qimg(["info", ours]);
    expect(again.stderr).toBe("");
    const qc = qemuImg(["check", theirs]);
    const mc = await qimg(["check", ours]);
    expect(qc.code).toBe(3);
    expect([mc.code, mc.stdout.replaceAll(ours, "F")]).toEqual([
      qc.code,
      qc.stdout.replaceAll(theirs, "F"),
    ]);
  });
});

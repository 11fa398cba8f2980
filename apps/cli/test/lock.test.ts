/**
 * Second-writer protection: while a QEMU process (qemu-io here) has an image open, every qimg
 * command that would write it is refused with qemu-img's words and leaves the file as it was;
 * once QEMU is gone the same commands work. Inside one process, a second writer is refused.
 */
import type { ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { FileBackend } from "@qimg/io/node";
import { qimg } from "./helpers.js";
import { hasQemu, qemuImg, holdWithQemuIo, releaseQemuIo } from "./qemu.js";

const haveProcLocks = existsSync("/proc/locks");
if (!hasQemu) console.log("skipping qimg lock tests: qemu-img is not on PATH");
if (!haveProcLocks) console.log("skipping qimg lock tests: no /proc/locks (not Linux)");

const tmp = mkdtempSync(join(tmpdir(), "qimg-lock-cli-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

afterEach(releaseQemuIo);

async function stop(c: ChildProcess): Promise<void> {
  const exited = new Promise((r) => c.once("exit", r));
  c.kill("SIGTERM");
  await exited;
}

const LOCKED = (file: string): RegExp =>
  new RegExp(
    `^qimg: ${file}: .*Failed to get "write" lock\\. Is another process using the image \\[${file}\\]\\?\\n$`,
  );

describe.skipIf(!hasQemu || !haveProcLocks)("while qemu-io has the image open", () => {
  const writers: readonly (readonly string[])[] = [
    ["io", "-c", "write -P 0x11 1000 70001", "IMG"],
    ["create", "-q", "-f", "qcow2", "IMG", "2M"],
    ["create", "-q", "-f", "raw", "IMG", "2M"],
    ["resize", "IMG", "3M"],
    ["check", "-r", "all", "IMG"],
    ["convert", "-O", "qcow2", "SRC", "IMG"],
    ["convert", "-O", "raw", "SRC", "IMG"],
    ["dd", "if=SRC", "of=IMG", "bs=512", "count=3"],
  ];

  for (const readOnly of [false, true]) {
    it(`${readOnly ? "read-only" : "read-write"}: every write is refused, the file unchanged; reads work`, async () => {
      const img = `held-${readOnly}.qcow2`;
      const src = `src-${readOnly}.qcow2`;
      expect(qemuImg(["create", "-q", "-f", "qcow2", img, "1000000"], tmp).code).toBe(0);
      expect(qemuImg(["create", "-q", "-f", "qcow2", src, "1000448"], tmp).code).toBe(0);
      const before = readFileSync(join(tmp, img));
      const c = await holdWithQemuIo(join(tmp, img), readOnly);
      for (const args of writers) {
        const argv = args.map((a) => a.replace(/IMG$/, img).replace(/SRC$/, src));
        const r = await qimg(argv, tmp);
        expect(r.code, `${argv.join(" ")}: ${r.stderr}`).toBe(1);
        expect(r.stderr, argv.join(" ")).toMatch(LOCKED(img));
        expect(Buffer.compare(readFileSync(join(tmp, img)), before), argv.join(" ")).toBe(0);
      }
      // qemu-img agrees that writing is refused.
      const theirs = qemuImg(["resize", img, "3M"], tmp);
      expect(theirs.stderr).toMatch(/Failed to get "write" lock/);
      // Reading is allowed with -U (without it, see force-share.test.ts).
      const info = await qimg(["info", "-U", "--output=json", img], tmp);
      expect(info.code, info.stderr).toBe(0);
      await stop(c);
      // Once QEMU is gone, the same write works.
      const w = await qimg(["io", "-c", "write -P 0x11 1000 70001", img], tmp);
      expect(w.code, w.stderr).toBe(0);
      const check = qemuImg(["check", img], tmp);
      expect(check.code, check.stdout).toBe(0);
    });
  }
});

describe("inside one process", () => {
  it("a command cannot write an image this process already has open for writing", async () => {
    const img = join(tmp, "mine.qcow2");
    expect((await qimg(["create", "-q", "-f", "qcow2", img, "1M"])).code).toBe(0);
    const before = readFileSync(img);
    const held = await FileBackend.open(img);
    try {
      for (const argv of [
        ["io", "-c", "write 0 512", img],
        ["create", "-q", "-f", "qcow2", img, "2M"],
        ["resize", img, "2M"],
      ]) {
        const r = await qimg(argv);
        expect(r.code, argv.join(" ")).toBe(1);
        // (resize looks at the image read-only first: "shared" for it)
        expect(r.stderr.replace('shared "write"', '"write"')).toMatch(LOCKED(img));
      }
      // Reading a file open for writing is refused too (QEMU's default shared permissions).
      const r = await qimg(["info", img]);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/Failed to get shared "write" lock/);
    } finally {
      await held.close();
    }
    expect(Buffer.compare(readFileSync(img), before)).toBe(0);
    expect((await qimg(["resize", img, "2M"])).code).toBe(0);
  });
});

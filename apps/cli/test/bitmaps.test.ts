/**
 * Persistent dirty bitmaps through the CLI's write paths (io, bench -w, resize), with QEMU as
 * the oracle: the same commands through qemu-io / qemu-img on a twin image must leave the same
 * bitmap list and flags (qemu-img info), and qimg's image must check clean (no leaked bitmap
 * clusters, as before the fix: every qimg write cleared the bitmaps autoclear bit).
 */
import { copyFileSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg, qimgProcess } from "./helpers.js";
import { hasQemu, qemuImg, qemuInfo, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping qimg bitmap interop tests: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-bitmaps-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function ok(r: { code: number; stderr: string }): void {
  if (r.code !== 0) throw new Error(r.stderr);
}

function bitmaps(file: string): unknown {
  const info = qemuInfo(file, "qcow2") as { "format-specific"?: { data?: { bitmaps?: unknown } } };
  return info["format-specific"]?.data?.bitmaps;
}

async function checkClean(file: string): Promise<void> {
  // qimg's own checker agrees (it counts bitmap directory, tables and data too).
  const ours = await qimg(["check", "--output=json", file]);
  expect(ours.code, ours.stdout + ours.stderr).toBe(0);
  const r = qemuImg(["check", "--output=json", file]);
  const result = JSON.parse(r.stdout) as { leaks?: number; corruptions?: number };
  expect(result.leaks ?? 0).toBe(0);
  expect(result.corruptions ?? 0).toBe(0);
  expect(r.code).toBe(0);
}

/** A 10000 KiB - 512 image (not a multiple of the cluster) with an enabled and a disabled bitmap. */
function twins(name: string): { ours: string; theirs: string } {
  const base = join(tmp, `${name}.qcow2`);
  ok(qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "10239488"]));
  ok(qemuImg(["bitmap", "--add", "-g", "8192", base, "daily"]));
  ok(qemuImg(["bitmap", "--add", "--disable", base, "frozen"]));
  ok(qemuIo(["-f", "qcow2", "-c", "write -P 1 100000 3000", base]));
  const ours = join(tmp, `${name}-ours.qcow2`);
  const theirs = join(tmp, `${name}-theirs.qcow2`);
  copyFileSync(base, ours);
  copyFileSync(base, theirs);
  return { ours, theirs };
}

describe.skipIf(!hasQemu)("persistent bitmaps through the CLI", () => {
  it("after a qimg io write, qemu-img check is clean and qemu-img info still lists the bitmaps without in-use", async () => {
    const { ours, theirs } = twins("io");
    const cmds = ["write -P 7 5000 70001", "write -z 2000000 123456", "discard 4096000 1000000"];
    ok(qemuIo(["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), theirs]));
    ok(await qimg(["io", "-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), ours]));
    await checkClean(ours);
    expect(bitmaps(ours)).toEqual([
      { name: "daily", granularity: 8192, flags: ["auto"] },
      { name: "frozen", granularity: 4096, flags: [] },
    ]);
    expect(bitmaps(ours)).toEqual(bitmaps(theirs));
    expect(qemuImg(["compare", "-q", theirs, ours]).code).toBe(0);
    await checkClean(theirs);
  });

  it("bench -w keeps the bitmaps", async () => {
    const { ours } = twins("bench");
    ok(await qimg(["bench", "-q", "-w", "-f", "qcow2", "-c", "300", "-s", "4608", ours]));
    await checkClean(ours);
    expect(bitmaps(ours)).toEqual([
      { name: "daily", granularity: 8192, flags: ["auto"] },
      { name: "frozen", granularity: 4096, flags: [] },
    ]);
  });

  it("io -c abort after a write leaves the bitmaps in use, as qemu-io's abort", () => {
    const { ours, theirs } = twins("abort");
    const args = ["-f", "qcow2", "-c", "write -P 9 12345 67890", "-c", "abort"];
    qemuIo([...args, theirs]);
    const r = qimgProcess(["io", ...args, ours]);
    expect(r.code).toBe(134);
    expect(bitmaps(ours)).toEqual(bitmaps(theirs));
    expect(bitmaps(ours)).toEqual([
      { name: "daily", granularity: 8192, flags: ["in-use", "auto"] },
      { name: "frozen", granularity: 4096, flags: ["in-use"] },
    ]);
    // The data is there (writethrough), and the image checks as QEMU's does.
    expect(qemuImg(["compare", "-q", theirs, ours]).code).toBe(0);
    expect(qemuImg(["check", ours]).code).toBe(qemuImg(["check", theirs]).code);
  });

  it("resize grows the bitmaps as qemu-img resize does, and is refused with an inconsistent one", async () => {
    const { ours, theirs } = twins("resize");
    ok(qemuImg(["resize", "-q", theirs, "20971008"]));
    ok(await qimg(["resize", ours, "20971008"]));
    await checkClean(ours);
    expect(bitmaps(ours)).toEqual(bitmaps(theirs));
    // Inconsistent bitmaps (a crash) make qemu-img refuse to resize; qimg refuses too.
    qemuIo(["-f", "qcow2", "-c", "write 0 512", "-c", "abort", theirs]);
    qimgProcess(["io", "-f", "qcow2", "-c", "write 0 512", "-c", "abort", ours]);
    expect(qemuImg(["resize", theirs, "31457280"]).code).toBe(1);
    // (A consistent bitmap next to it would be marked in use by a read-write open.)
    ok(qemuImg(["bitmap", "--add", ours, "late"]));
    ok(qemuImg(["bitmap", "--add", theirs, "late"]));
    const before = readFileSync(ours);
    const r = await qimg(["resize", ours, "31457280"]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/Bitmap 'daily' is inconsistent/);
    // A refused resize changes nothing.
    expect(readFileSync(ours).equals(before)).toBe(true);
    expect((qemuInfo(ours, "qcow2") as { "virtual-size": number })["virtual-size"]).toBe(20971008);
    expect(bitmaps(ours)).toEqual(bitmaps(theirs));
  });
});

describe.skipIf(!hasQemu)("qimg info lists bitmaps as qemu-img does", () => {
  it("human and JSON output equal qemu-img's: bitmaps added by qimg bitmap, in use under a read-write open, inconsistent after a crash", async () => {
    const file = join(tmp, "info-bitmaps.qcow2");
    ok(qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=2048", file, "7340544"]));
    ok(await qimg(["bitmap", "--add", file, "first"]));
    ok(await qimg(["bitmap", "--add", "-g", "1M", "--disable", file, "second"]));
    const same = async (args: string[], what: string): Promise<void> => {
      const mine = await qimg(["info", ...args, file]);
      const theirs = qemuImg(["info", ...args, file]);
      expect(mine.code, what).toBe(theirs.code);
      expect(mine.stdout, what).toBe(theirs.stdout);
    };
    await same([], "clean");
    await same(["--output=json"], "clean json");
    // While qimg holds it open read-write, every bitmap is in use on disk (qemu-img info -U shows it).
    const { openQcow2 } = await import("@qimg/qcow2");
    const { FileBackend } = await import("@qimg/io/node");
    const image = await openQcow2(await FileBackend.open(file), { readOnly: false });
    try {
      await image.write(0, new Uint8Array(512).fill(1));
      await same(["-U"], "open read-write by qimg");
      await same(["-U", "--output=json"], "open read-write by qimg, json");
      expect(JSON.stringify(bitmaps(file))).toContain("in-use");
    } finally {
      await image.close();
    }
    await same([], "closed again");
    // A crash (qemu-io abort) leaves them in use: inconsistent.
    qemuIo(["-f", "qcow2", "-c", "write 0 512", "-c", "abort", file]);
    await same([], "after a crash");
    await same(["--output=json"], "after a crash, json");
  });
});

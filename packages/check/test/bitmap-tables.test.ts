/**
 * Persistent bitmaps as qemu-img check 7.2 opens them (H2's report on the API board): the
 * table of every bitmap not in use is read at open, and an entry with reserved bits (or an
 * unaligned offset) fails the open — check exits 1 with "Could not read bitmap_table table from
 * image for bitmap 'b': Invalid argument" — while the same entry in an in-use bitmap is only
 * counted by the check. Images made by qemu-img (4 KiB clusters, a 512-byte granularity
 * bitmap), twins checked by qemu-img and by us.
 */
import { readFileSync } from "node:fs";
import { basename, join } from "node:path";
import { describe, expect, it } from "vitest";
import { QimgError } from "@qimg/structs";
import { formatCheckHuman } from "../src/index.js";
import { haveQemu, qemuCheck } from "./helpers.js";
import {
  be64,
  create,
  expectSameReadOnly,
  expectSameRepair,
  ourCheck,
  peek,
  poke,
  qemuIo,
  run,
  scratch,
  twins,
} from "./iotest-helpers.js";

/** The first bitmap's directory entry offset and table offset (bitmaps header extension). */
function firstBitmap(f: string): { entry: number; table: number } {
  const headerLength = peek(f, 100, 4);
  const file = readFileSync(f);
  let p = headerLength;
  for (;;) {
    const type = file.readUInt32BE(p);
    const len = file.readUInt32BE(p + 4);
    if (type === 0) throw new Error("no bitmaps extension");
    if (type === 0x23852875) {
      const dir = Number(file.readBigUInt64BE(p + 8 + 16));
      return { entry: dir, table: Number(file.readBigUInt64BE(dir)) };
    }
    p += 8 + Math.ceil(len / 8) * 8;
  }
}

function bitmapImage(): string {
  const f = join(scratch("bitmaps"), "t.qcow2");
  create(f, 4 * 1024 * 1024 - 3 * 512, "cluster_size=4096");
  run("qemu-img", ["bitmap", "--add", "-g", "512", f, "b"]);
  qemuIo(f, "write -P 7 0 3M");
  return f;
}

describe("bitmap tables read at open, as qemu-img check", () => {
  it("a bitmaps extension without its autoclear bit: QEMU's warning; -r drops the extension", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = bitmapImage();
    poke(f, 0x58, be64(0n));
    // qemu-img 7.2 prints no newline after its warning's second line: compare with one added.
    const fixNewline = (s: string): string => s.replace(/to fix\.(?!\n)/, "to fix.\n");
    for (const mode of [undefined, "leaks", "all"] as const) {
      const { q, ours } = twins(f);
      const theirs = mode === undefined ? qemuCheck(q) : qemuCheck(q, "-r", mode);
      const r = await ourCheck(ours, mode);
      if (r instanceof QimgError) throw r;
      const h = formatCheckHuman(r);
      expect(h.stderr).toBe(fixNewline(theirs.stderr.replaceAll(/^qemu-img: /gm, "")));
      expect(h.stdout).toBe(theirs.stdout);
      expect(r.exitCode).toBe(theirs.status);
      // The header area afterwards (the extension dropped by a repair, kept by a check).
      const head = (x: string): Buffer => readFileSync(x).subarray(0, 4096);
      expect(head(ours).equals(head(q)), `header after -r ${mode ?? "(none)"}`).toBe(true);
    }
  });

  it("a clean image with a bitmap: same verdicts", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = bitmapImage();
    await expectSameReadOnly(f);
    // QEMU's read-write open stores the bitmaps again when it closes (in new clusters): the
    // image end offset afterwards differs; the repair's report does not.
    await expectSameRepair(f, "leaks", { sameJsonAfter: false });
  });

  for (const [what, value] of [
    ["reserved bits", 0x1234n],
    ["an unaligned offset", 0x2000n + 512n],
    ["an offset with the all-ones flag", 0x3000n + 1n],
  ] as const) {
    it(`a table entry with ${what}: the check refuses the image as qemu-img does`, async (ctx) => {
      if (!haveQemu()) return ctx.skip();
      const f = bitmapImage();
      poke(f, firstBitmap(f).table, be64(value));
      for (const mode of [undefined, "leaks", "all"] as const) {
        const { q, ours } = twins(f);
        const before = readFileSync(ours);
        const theirs = mode === undefined ? qemuCheck(q) : qemuCheck(q, "-r", mode);
        expect(theirs.status).toBe(1);
        const r = await ourCheck(ours, mode);
        expect(r).toBeInstanceOf(QimgError);
        expect(`qemu-img: Could not open '${basename(q)}': ${(r as QimgError).message}\n`).toBe(
          theirs.stderr,
        );
        // Refused before anything was written.
        expect(readFileSync(ours).equals(before)).toBe(true);
      }
    });
  }

  it("the same entry in a bitmap in use: not read at open; the check fails with EINVAL", async (ctx) => {
    if (!haveQemu()) return ctx.skip();
    const f = bitmapImage();
    const { entry, table } = firstBitmap(f);
    poke(f, table, be64(0x1234n));
    poke(f, entry + 12 + 3, [1]); // flags: in use (with auto cleared)
    const r = await expectSameReadOnly(f);
    expect(r.failure).toBe("Invalid argument");
    await expectSameRepair(f, "leaks");
    await expectSameRepair(f, "all");
  });
});

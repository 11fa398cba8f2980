/**
 * Persistent bitmap management and reading through the library (Qcow2Image.addBitmap and
 * friends, bitmapDirtyRanges, copyBitmaps), with QEMU as the oracle: qemu-img info for the
 * list and flags, qemu-img check for the refcounts, and qemu-nbd -B + nbdinfo
 * --map=qemu:dirty-bitmap:NAME for the dirty ranges.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FileBackend } from "@qimg/io/node";
import { requireQemu } from "@qimg/fixtures";
import { copyBitmaps, openQcow2 } from "../src/index.js";
import type { Qcow2Image } from "../src/index.js";
import { prng } from "./prng.js";
import {
  check,
  closeCrashes,
  createQcow2,
  expectedRanges,
  haveNbdinfo,
  infoBitmaps,
  must,
  nbdinfoDirtyRanges,
  run,
} from "./bitmap-oracle.js";
import type { Ranges } from "./bitmap-oracle.js";

const haveQemu = requireQemu();
const haveNbd = haveQemu && haveNbdinfo();
const LONG = process.env.QIMG_LONG === "1";
if (!haveQemu)
  console.log("bitmap-manage.test: qemu-img not found, skipping the QEMU oracle tests");
else if (!haveNbd)
  console.log("bitmap-manage.test: nbdinfo/qemu-nbd not found, skipping the NBD tests");
if (process.env.QIMG_REQUIRE_NBD === "1" && !haveNbd) throw new Error("nbdinfo/qemu-nbd required");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-bitmap-manage-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

async function openRw(file: string): Promise<Qcow2Image> {
  return openQcow2(await FileBackend.open(file, { readOnly: false }), { readOnly: false });
}

async function openRo(file: string): Promise<Qcow2Image> {
  return openQcow2(await FileBackend.open(file, { readOnly: true }));
}

const asRanges = (r: readonly { offset: number; length: number }[]): Ranges =>
  r.map((x): [number, number] => [x.offset, x.length]);

/** Clip ranges to [from, to). */
function clip(ranges: Ranges, from: number, to: number): Ranges {
  const out: Ranges = [];
  for (const [o, l] of ranges) {
    const a = Math.max(o, from);
    const b = Math.min(o + l, to);
    if (b > a) out.push([a, b - a]);
  }
  return out;
}

describe.skipIf(!haveNbd)("dirty ranges of bitmaps added and written by qimg", () => {
  const cases = LONG ? 60 : 8;
  it(`read back through qemu-nbd -B + nbdinfo and bitmapDirtyRanges as the written ranges (${cases} seeds)`, async () => {
    for (let seed = 1; seed <= cases; seed++) {
      const r = prng(seed * 7919);
      const where = `seed ${seed * 7919}`;
      const cs = 2 ** (9 + Math.floor(r() * 8)); // 512 .. 64k
      const size = 512 * (1 + Math.floor(r() * 20000)) + (r() < 0.5 ? 0 : 512 * 3);
      const file = path.join(tmp, `ranges-${seed}.qcow2`);
      createQcow2(file, size, `cluster_size=${cs}`);
      const image = await openRw(file);
      const grans: Record<string, number> = {};
      const nb = 1 + Math.floor(r() * 3);
      for (let i = 0; i < nb; i++) {
        const g = 2 ** (9 + Math.floor(r() * 12));
        grans[`b${i}`] = g;
        image.addBitmap(`b${i}`, { granularity: g });
      }
      const writes: [number, number][] = [];
      for (let k = 0, n = 1 + Math.floor(r() * 12); k < n; k++) {
        const off = Math.floor(r() * size);
        const len = Math.max(1, Math.min(size - off, Math.floor(r() * 200_000)));
        const kind = r();
        if (kind < 0.6) await image.write(off, new Uint8Array(len).fill(k + 1));
        else await image.writeZeroes(off, len, { mayUnmap: r() < 0.5 });
        writes.push([off, len]);
      }
      // The live bits, before the close.
      for (const [name, g] of Object.entries(grans)) {
        expect(asRanges(await image.bitmapDirtyRanges(name)), `${where} live ${name}`).toEqual(
          expectedRanges(writes, g, size),
        );
      }
      await image.close();
      const c = check(file);
      expect(c.code, `${where}: ${JSON.stringify(c.result)}`).toBe(0);
      const nbd = await nbdinfoDirtyRanges(file, Object.keys(grans), tmp);
      const ro = await openRo(file);
      try {
        for (const [name, g] of Object.entries(grans)) {
          const want = expectedRanges(writes, g, size);
          expect(nbd.get(name), `${where} nbdinfo ${name} (g ${g})`).toEqual(want);
          expect(asRanges(await ro.bitmapDirtyRanges(name)), `${where} ours ${name}`).toEqual(want);
          // One extent at a time, as NBD block status asks.
          for (let w = 0; w < 4; w++) {
            const from = Math.floor(r() * size);
            const len = 1 + Math.floor(r() * (size - from));
            const st = await ro.bitmapStatus(name, from, len);
            const inWindow = clip(want, from, from + len);
            const head = inWindow[0];
            if (head && head[0] === from)
              expect(st, `${where} status ${from}`).toEqual({ length: head[1], dirty: true });
            else
              expect(st, `${where} status ${from}`).toEqual({
                length: (head?.[0] ?? from + len) - from,
                dirty: false,
              });
          }
          // Windows: clipped to the query.
          for (let w = 0; w < 4; w++) {
            const from = Math.floor(r() * size);
            const len = Math.floor(r() * (size - from + 1));
            expect(
              asRanges(await ro.bitmapDirtyRanges(name, from, len)),
              `${where} ${name} window ${from}+${len}`,
            ).toEqual(clip(want, from, from + len));
          }
        }
      } finally {
        await ro.close();
      }
    }
  });

  it("merge from another image and clear, as qemu-img bitmap does them, read back through nbdinfo", async () => {
    const size = 5 * 1024 * 1024 + 512;
    const a = path.join(tmp, "merge-a.qcow2");
    const b = path.join(tmp, "merge-b.qcow2");
    const twin = path.join(tmp, "merge-twin.qcow2");
    for (const f of [a, b]) must("qemu-img", ["create", "-q", "-f", "qcow2", f, String(size)]);
    must("qemu-img", ["bitmap", "--add", "-g", "4096", b, "src"]);
    must("qemu-io", ["-f", "qcow2", "-c", "write 70000 9000", "-c", "write 3000000 1", b]);
    must("qemu-img", ["bitmap", "--add", "-g", "1M", a, "dst"]);
    must("qemu-io", ["-f", "qcow2", "-c", "write 4200000 10", a]);
    fs.copyFileSync(a, twin);
    must("qemu-img", ["bitmap", "--merge", "src", "-b", b, twin, "dst"]);
    const image = await openRw(a);
    const src = await openRo(b);
    await image.mergeBitmap("dst", "src", src);
    await src.close();
    await image.close();
    expect(infoBitmaps(a)).toEqual(infoBitmaps(twin));
    expect(await nbdinfoDirtyRanges(a, ["dst"], tmp)).toEqual(
      await nbdinfoDirtyRanges(twin, ["dst"], tmp),
    );
    const again = await openRw(a);
    again.clearBitmap("dst");
    await again.close();
    must("qemu-img", ["bitmap", "--clear", twin, "dst"]);
    expect(await nbdinfoDirtyRanges(a, ["dst"], tmp)).toEqual(new Map([["dst", []]]));
    expect(await nbdinfoDirtyRanges(twin, ["dst"], tmp)).toEqual(new Map([["dst", []]]));
    expect(check(a).code).toBe(0);
    expect(check(a).result.leaks ?? 0).toBe(0);
  });

  it("copyBitmaps gives the target what qemu-img convert --bitmaps gives it", async () => {
    const size = 3 * 1024 * 1024 - 512;
    const src = path.join(tmp, "copy-src.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", src, String(size)]);
    must("qemu-img", ["bitmap", "--add", src, "one"]);
    must("qemu-img", ["bitmap", "--add", "-g", "512", "--disable", src, "two"]);
    must("qemu-io", ["-f", "qcow2", "-c", "write 1000 70000", src]);
    must("qemu-img", ["bitmap", "--enable", src, "two"]);
    must("qemu-io", ["-f", "qcow2", "-c", "write 2000000 3", src]);
    const theirs = path.join(tmp, "copy-theirs.qcow2");
    must("qemu-img", ["convert", "--bitmaps", "-O", "qcow2", src, theirs]);
    const ours = path.join(tmp, "copy-ours.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", ours, String(size)]);
    const from = await openRo(src);
    const to = await openRw(ours);
    await copyBitmaps(from, to);
    await from.close();
    await to.close();
    expect(infoBitmaps(ours)).toEqual(infoBitmaps(theirs));
    expect(await nbdinfoDirtyRanges(ours, ["one", "two"], tmp)).toEqual(
      await nbdinfoDirtyRanges(theirs, ["one", "two"], tmp),
    );
    expect(check(ours).code).toBe(0);
  });
});

describe.skipIf(!haveQemu)("copyBitmaps with inconsistent source bitmaps", () => {
  it("refuses as qemu-img convert --bitmaps refuses, and skips as --skip-broken-bitmaps skips", async () => {
    const size = 2 * 1024 * 1024;
    const src = path.join(tmp, "copy-broken-src.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", src, String(size)]);
    for (const n of ["a", "b", "c"]) must("qemu-img", ["bitmap", "--add", src, n]);
    run("qemu-io", ["-f", "qcow2", "-c", "write 0 512", "-c", "abort", src]);
    must("qemu-img", ["bitmap", "--remove", src, "b"]);
    must("qemu-img", ["bitmap", "--add", "-g", "4k", src, "good"]);
    must("qemu-io", ["-f", "qcow2", "-c", "write 100000 1", src]);
    const theirs = path.join(tmp, "copy-broken-theirs.qcow2");
    const refused = run("qemu-img", ["convert", "--bitmaps", "-O", "qcow2", src, theirs]);
    expect(refused.code).toBe(1);
    const ours = path.join(tmp, "copy-broken-ours.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", ours, String(size)]);
    const before = fs.readFileSync(ours);
    const from = await openRo(src);
    let to = await openRw(ours);
    const error = await copyBitmaps(from, to).catch((e: unknown) => e as Error);
    expect(`qemu-img: ${error instanceof Error ? error.message : "none"}\n`).toBe(refused.stderr);
    expect(to.listBitmaps()).toEqual([]);
    await to.close();
    expect(fs.readFileSync(ours).equals(before)).toBe(true);
    const skipped = run("qemu-img", [
      ...["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", src, theirs],
    ]);
    expect(skipped.code).toBe(0);
    const warnings: string[] = [];
    to = await openRw(ours);
    await copyBitmaps(from, to, {
      skipBroken: true,
      onSkip: (n) => warnings.push(`qemu-img: warning: Skipping inconsistent bitmap '${n}'\n`),
    });
    await to.close();
    await from.close();
    expect(warnings.join("")).toBe(skipped.stderr);
    expect(infoBitmaps(ours)).toEqual(infoBitmaps(theirs));
    if (haveNbd) {
      expect(await nbdinfoDirtyRanges(ours, ["good"], tmp)).toEqual(
        await nbdinfoDirtyRanges(theirs, ["good"], tmp),
      );
    }
    expect(check(ours).code).toBe(0);
  });
});

describe.skipIf(!haveNbd)("bitmaps follow a shrink as QEMU's do", () => {
  it("shrink (and shrink then grow in one open) leaves the bits qemu-img resize --shrink leaves", async () => {
    for (let seed = 1; seed <= (LONG ? 30 : 4); seed++) {
      const r = prng(seed * 613);
      const where = `seed ${seed * 613}`;
      const cs = 2 ** (9 + Math.floor(r() * 8));
      const size = 512 * (2000 + Math.floor(r() * 8000));
      const base = path.join(tmp, `shrink-${seed}.qcow2`);
      createQcow2(base, size, `cluster_size=${cs}`);
      const names: string[] = [];
      for (let i = 0; i < 2; i++) {
        const g = 2 ** (9 + Math.floor(r() * 10));
        names.push(`s${i}`);
        must("qemu-img", ["bitmap", "--add", "-g", String(g), base, `s${i}`]);
      }
      const cmds: string[] = [];
      for (let k = 0; k < 5; k++) {
        const off = Math.floor(r() * (size - 1));
        cmds.push(
          "-c",
          `write ${off} ${Math.max(1, Math.min(size - off, Math.floor(r() * 300_000)))}`,
        );
      }
      must("qemu-io", ["-f", "qcow2", ...cmds, base]);
      const small = 512 * Math.max(1, Math.floor((r() * size) / 512));
      const regrow = r() < 0.5 ? 512 * Math.floor((small + r() * size) / 512) : small;
      const ours = path.join(tmp, `shrink-${seed}-ours.qcow2`);
      const theirs = path.join(tmp, `shrink-${seed}-theirs.qcow2`);
      fs.copyFileSync(base, ours);
      fs.copyFileSync(base, theirs);
      must("qemu-img", ["resize", "-q", "--shrink", theirs, String(small)]);
      if (regrow !== small) must("qemu-img", ["resize", "-q", theirs, String(regrow)]);
      const image = await openRw(ours);
      await image.resizeWith(small, { shrink: true });
      if (regrow !== small) await image.resizeWith(regrow, {});
      const live: Record<string, Ranges> = {};
      for (const n of names) live[n] = asRanges(await image.bitmapDirtyRanges(n));
      await image.close();
      const msg = `${where} (size ${size} -> ${small} -> ${regrow}, cluster ${cs})`;
      expect(infoBitmaps(ours), msg).toEqual(infoBitmaps(theirs));
      const c = check(ours);
      expect(c.code, `${msg}: ${JSON.stringify(c.result)}`).toBe(0);
      expect(c.result.leaks ?? 0, msg).toBe(0);
      const want = await nbdinfoDirtyRanges(theirs, names, tmp);
      expect(await nbdinfoDirtyRanges(ours, names, tmp), msg).toEqual(want);
      expect(new Map(Object.entries(live)), `${msg}: live`).toEqual(want);
    }
  });
});

describe.skipIf(!haveQemu)("bitmap management rules, as QEMU's", () => {
  it("refuses what qemu-img refuses, with its words, and keeps the in-use rules", async () => {
    const file = path.join(tmp, "rules.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", file, "1M"]);
    must("qemu-img", ["bitmap", "--add", file, "iu"]);
    must("qemu-img", ["bitmap", "--add", file, "ok"]);
    // A crash while QEMU had it open leaves both in use: inconsistent.
    run("qemu-io", ["-f", "qcow2", "-c", "write 0 512", "-c", "abort", file]);
    must("qemu-img", ["bitmap", "--remove", file, "ok"]);
    const image = await openRw(file);
    try {
      expect(image.listBitmaps()).toEqual([
        {
          name: "iu",
          granularity: 4096,
          granularityBits: 12,
          inUse: true,
          enabled: true,
          flags: ["in-use", "auto"],
        },
      ]);
      const inconsistent =
        "Bitmap 'iu' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk";
      expect(() => image.clearBitmap("iu")).toThrow(inconsistent);
      expect(() => image.enableBitmap("iu")).toThrow(inconsistent);
      expect(() => image.disableBitmap("iu")).toThrow(inconsistent);
      await expect(image.bitmapDirtyRanges("iu")).rejects.toThrow(inconsistent);
      image.addBitmap("new");
      expect(image.listBitmaps()[1]).toMatchObject({ name: "new", granularity: 4096 });
      await expect(image.mergeBitmap("new", "iu")).rejects.toThrow(inconsistent);
      await expect(image.mergeBitmap("nope", "iu")).rejects.toThrow(
        "Dirty bitmap 'nope' not found",
      );
      expect(() => image.addBitmap("")).toThrow("Bitmap name cannot be empty");
      expect(() => image.addBitmap("iu")).toThrow("Bitmap already exists: iu");
      expect(() => image.addBitmap("x", { granularity: 256 })).toThrow(
        "Granularity must be power of 2 and at least 512",
      );
      expect(() => image.addBitmap("x", { granularity: 3000 })).toThrow(
        "Granularity must be power of 2 and at least 512",
      );
      expect(() => image.addBitmap("x", { granularity: 2 ** 32 })).toThrow(
        "Granularity exceeds maximum",
      );
      expect(() => image.addBitmap("a".repeat(1024), { nodeName: "#block1" })).toThrow(
        `Can't make bitmap '${"a".repeat(1024)}' persistent in '#block1': Name length exceeds maximum (1023 characters)`,
      );
      image.addBitmap("é".repeat(511)); // 1022 bytes
      expect(() => image.removeBitmap("gone")).toThrow("Dirty bitmap 'gone' not found");
      // An inconsistent bitmap can be removed, and then the disk can grow again.
      image.removeBitmap("iu");
      await image.resize(2 * 1024 * 1024);
    } finally {
      await image.close();
    }
    const c = check(file);
    expect(c.code).toBe(0);
    expect(c.result.leaks ?? 0).toBe(0);
    expect(infoBitmaps(file).map((b) => b.name)).toEqual(["new", "é".repeat(511)]);
  });

  it("a wholly dirty bitmap cluster is stored as an all-ones table entry without a cluster, and QEMU reads it so", async () => {
    const file = path.join(tmp, "ones.qcow2");
    // 512-byte clusters and granularity: one bitmap cluster covers 2 MiB of guest data.
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", file, "5M"]);
    const image = await openRw(file);
    image.addBitmap("b", { granularity: 512 });
    await image.writeZeroes(0, 2 * 1024 * 1024 + 4096);
    await image.close();
    const ro = await openRo(file);
    const entry = ro.bitmaps.find((b) => b.name === "b")!;
    const table = fs
      .readFileSync(file)
      .subarray(entry.bitmapTableOffset, entry.bitmapTableOffset + entry.bitmapTableSize * 8);
    expect(table.readBigUInt64BE(0)).toBe(1n); // all ones, no cluster
    expect(table.readBigUInt64BE(8) % 512n).toBe(0n); // a data cluster (partly dirty)
    expect(table.readBigUInt64BE(8)).not.toBe(0n);
    expect(table.readBigUInt64BE(16)).toBe(0n); // all zeros, no cluster
    await ro.close();
    expect(check(file).code).toBe(0);
    if (haveNbd) {
      expect(await nbdinfoDirtyRanges(file, ["b"], tmp)).toEqual(
        new Map([["b", [[0, 2 * 1024 * 1024 + 4096]]]]),
      );
    }
  });

  it("a version 2 image cannot store bitmaps", async () => {
    const file = path.join(tmp, "v2.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", file, "1M"]);
    const before = fs.readFileSync(file);
    const image = await openRw(file);
    expect(() => image.addBitmap("b", { nodeName: "#block7" })).toThrow(
      "Can't make bitmap 'b' persistent in '#block7': Cannot store dirty bitmaps in qcow2 v2 files",
    );
    await image.close();
    expect(fs.readFileSync(file).equals(before)).toBe(true);
  });

  it("removing the last bitmap drops the extension and the autoclear bit, as qemu-img does", async () => {
    const ours = path.join(tmp, "last-ours.qcow2");
    const theirs = path.join(tmp, "last-theirs.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", ours, "1M"]);
    must("qemu-img", ["bitmap", "--add", ours, "b"]);
    fs.copyFileSync(ours, theirs);
    must("qemu-img", ["bitmap", "--remove", theirs, "b"]);
    const image = await openRw(ours);
    image.removeBitmap("b");
    await image.close();
    // Same header area (autoclear bit and extensions), no leak.
    expect(fs.readFileSync(ours).subarray(0, 512)).toEqual(
      fs.readFileSync(theirs).subarray(0, 512),
    );
    expect(check(ours).result.leaks ?? 0).toBe(0);
  });
});

describe.skipIf(!haveQemu)("crash safety of the directory switch", () => {
  it("power loss at any write of a close that adds and removes bitmaps leaves the old or the new set, never a broken image", async () => {
    const base = path.join(tmp, "switch-base.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "4000256"]);
    must("qemu-img", ["bitmap", "--add", "-g", "4096", base, "keep"]);
    must("qemu-img", ["bitmap", "--add", base, "drop"]);
    must("qemu-io", ["-f", "qcow2", "-c", "write -P 1 10000 50000", base]);
    const bytes = fs.readFileSync(base);
    const session = async (img: Qcow2Image): Promise<void> => {
      img.removeBitmap("drop");
      img.addBitmap("fresh", { granularity: 512 });
      await img.write(1_000_001, new Uint8Array(100_000).fill(2));
      await img.mergeBitmap("fresh", "keep");
    };
    const ref = path.join(tmp, "switch-ref.qcow2");
    fs.writeFileSync(ref, bytes);
    const refImage = await openRw(ref);
    await session(refImage);
    await refImage.close();
    const newList = infoBitmaps(ref);
    const newRanges = await ourRanges(ref);
    const oldNames = ["keep", "drop"];
    const out = path.join(tmp, "switch-crash.qcow2");
    let sawOld = false;
    let sawNew = false;
    const last = await closeCrashes(bytes, session, out, async (where, completed) => {
      const list = infoBitmaps(out);
      const names = list.map((b) => b.name);
      if (names.length > 0) {
        if (names.join() === oldNames.join()) sawOld = true;
        else {
          expect(names, where).toEqual(newList.map((b) => b.name));
          sawNew = true;
          const ranges = await ourRanges(out);
          for (const b of list) {
            if (!b.flags.includes("in-use"))
              expect(ranges[b.name], `${where}: ${b.name}`).toEqual(newRanges[b.name]);
          }
        }
      }
      if (completed) {
        expect(list).toEqual(newList);
        expect(check(out).result.leaks ?? 0).toBe(0);
      }
    });
    expect(last).toBeGreaterThan(5);
    expect(sawOld && sawNew).toBe(true);
  });
});

/** Every consistent bitmap's dirty ranges, as our read-only open reads them. */
async function ourRanges(file: string): Promise<Record<string, Ranges>> {
  const image = await openRo(file);
  try {
    const out: Record<string, Ranges> = {};
    for (const b of image.listBitmaps()) {
      if (!b.inUse) out[b.name] = asRanges(await image.bitmapDirtyRanges(b.name));
    }
    return out;
  } finally {
    await image.close();
  }
}

/**
 * `convert -l` / `-s` (internal snapshots) and `convert --bitmaps` against qemu-img 7.2: the
 * snapshot's content is exported (at the image's current size, as qemu-img 7.2 does) into
 * qcow2, QED and raw targets with qemu-img's bytes and `info` facts; snapshots are chosen by
 * ID or name as qemu-img chooses them. `--bitmaps` gives the target the same bitmaps (names,
 * granularity, flags in `qemu-img info`) holding the same dirty ranges, with a clean check.
 */
import {
  closeSync,
  copyFileSync,
  existsSync,
  mkdtempSync,
  openSync,
  readSync,
  rmSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FileBackend } from "@qimg/io/node";
import { openQcow2 } from "@qimg/qcow2";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, qemuImg, qemuInfo, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping convert -l/--bitmaps tests: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-convsnap-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function ok(r: { code: number; stdout: string; stderr: string }): void {
  if (r.code !== 0 || /error|failed/i.test(r.stdout)) throw new Error(r.stdout + r.stderr);
}

/** Every bitmap's dirty ranges, read with the library. */
async function dirty(file: string): Promise<Record<string, unknown>> {
  const image = await openQcow2(await FileBackend.open(file, { readOnly: true }), {
    readOnly: true,
    noBacking: true,
  });
  try {
    const out: Record<string, unknown> = {};
    for (const b of image.listBitmaps()) out[b.name] = await image.bitmapDirtyRanges(b.name);
    return out;
  } finally {
    await image.close();
  }
}

/** Set the in-use flag of the bitmap `name` in the image's bitmap directory (as a crash would leave it). */
function markInUse(file: string, name: string): void {
  const fd = openSync(file, "r+");
  try {
    const read = (at: number, n: number): Buffer => {
      const b = Buffer.alloc(n);
      readSync(fd, b, 0, n, at);
      return b;
    };
    let at = read(100, 4).readUInt32BE(0); // header_length: the extensions follow
    for (;;) {
      const magic = read(at, 4).readUInt32BE(0);
      const len = read(at + 4, 4).readUInt32BE(0);
      if (magic === 0) throw new Error("no bitmaps extension");
      if (magic === 0x23852875) break;
      at += 8 + Math.ceil(len / 8) * 8;
    }
    const ext = read(at + 8, 24);
    const count = ext.readUInt32BE(0);
    let entry = Number(ext.readBigUInt64BE(16));
    for (let i = 0; i < count; i++) {
      const e = read(entry, 24);
      const nameSize = e.readUInt16BE(18);
      const extra = e.readUInt32BE(20);
      const entryName = read(entry + 24 + extra, nameSize).toString("utf8");
      if (entryName === name) {
        const flags = Buffer.alloc(4);
        flags.writeUInt32BE(e.readUInt32BE(12) | 1);
        writeSync(fd, flags, 0, 4, entry + 12);
        return;
      }
      entry += Math.ceil((24 + extra + nameSize) / 8) * 8;
    }
    throw new Error(`no bitmap ${name}`);
  } finally {
    closeSync(fd);
  }
}

describe.skipIf(!hasQemu)("convert -l / -s / --bitmaps against qemu-img", () => {
  beforeAll(() => {
    // Snapshot ID 1 is named "2" and ID 2 is "x", so that ID-first resolution shows.
    ok(qemuImg(["create", "-q", "-f", "qcow2", "snap.qcow2", "1000000"], tmp));
    ok(qemuIo(["-c", "write -P 1 0 100k", "-c", "write -c -P 4 256k 64k", "snap.qcow2"], tmp));
    ok(qemuImg(["snapshot", "-c", "2", "snap.qcow2"], tmp));
    ok(qemuIo(["-c", "write -P 2 50k 300k", "-c", "write -z 600k 64k", "snap.qcow2"], tmp));
    ok(qemuImg(["snapshot", "-c", "x", "snap.qcow2"], tmp));
    ok(qemuIo(["-c", "write -P 3 0 20k", "snap.qcow2"], tmp));
    ok(qemuImg(["resize", "-q", "snap.qcow2", "3000320"], tmp));

    ok(qemuImg(["create", "-q", "-f", "qcow2", "bm.qcow2", "5000000"], tmp));
    ok(qemuImg(["bitmap", "--add", "bm.qcow2", "b1"], tmp));
    ok(qemuIo(["-c", "write -P 7 100k 200k", "-c", "write -P 8 3M 10k", "bm.qcow2"], tmp));
    ok(qemuImg(["bitmap", "--add", "-g", "128k", "bm.qcow2", "b2"], tmp));
    ok(qemuIo(["-c", "write -P 9 1M 64k", "bm.qcow2"], tmp));
    ok(qemuImg(["bitmap", "--disable", "bm.qcow2", "b2"], tmp));
    ok(qemuIo(["-c", "write -P 9 4M 64k", "bm.qcow2"], tmp));
  });

  const selectors = [
    ["-l", "2"], // ID 2 ("x"), not the snapshot named "2"
    ["-l", "x"],
    ["-l", "snapshot.name=2"],
    ["-l", "snapshot.id=1"],
    ["-l", "snapshot.id=2,snapshot.name=x"],
  ];
  for (const out of ["qcow2", "qed", "raw"]) {
    it(`-l exports a snapshot, -O ${out}`, async () => {
      for (const sel of selectors) {
        const what = `${sel.join(" ")} -O ${out}`;
        const theirs = qemuImg(["convert", ...sel, "-O", out, "snap.qcow2", "theirs"], tmp);
        const ours = await qimg(["convert", ...sel, "-O", out, "snap.qcow2", "ours"], tmp);
        expect(theirs.code, `${what}: ${theirs.stderr}`).toBe(0);
        expect([ours.code, ours.stderr], what).toEqual([0, ""]);
        const cmp = qemuImg(["compare", "-f", out, "-F", out, "theirs", "ours"], tmp);
        expect(cmp.stdout, what).toBe("Images are identical.\n");
        const facts = (f: string) => {
          const i = qemuInfo(join(tmp, f), out);
          return [i["virtual-size"], i.format];
        };
        expect(facts("ours"), what).toEqual(facts("theirs"));
        if (out !== "raw") expect(qemuImg(["check", "-f", out, "ours"], tmp).code, what).toBe(0);
      }
      // -s NAME (qemu-img's old spelling, gone from 7.2) reads as -l NAME.
      const ours = await qimg(["convert", "-s", "x", "-O", out, "snap.qcow2", "ours-s"], tmp);
      expect(ours.code).toBe(0);
      ok(qemuImg(["convert", "-l", "x", "-O", out, "snap.qcow2", "theirs"], tmp));
      const cmp = qemuImg(["compare", "-f", out, "-F", out, "theirs", "ours-s"], tmp);
      expect(cmp.stdout).toBe("Images are identical.\n");
    });
  }

  it("--bitmaps copies every persistent bitmap with its dirty ranges", async () => {
    for (const extra of [[], ["-c"], ["-S", "0"]]) {
      const what = extra.join(" ");
      const args = ["convert", "--bitmaps", ...extra, "-O", "qcow2", "bm.qcow2"];
      rmSync(join(tmp, "bm-theirs.qcow2"), { force: true });
      rmSync(join(tmp, "bm-ours.qcow2"), { force: true });
      ok(qemuImg([...args, "bm-theirs.qcow2"], tmp));
      const ours = await qimg([...args, "bm-ours.qcow2"], tmp);
      expect([ours.code, ours.stderr], what).toEqual([0, ""]);
      const bitmaps = (f: string) =>
        (qemuInfo(join(tmp, f), "qcow2")["format-specific"] as { data: { bitmaps?: unknown } }).data
          .bitmaps;
      expect(bitmaps("bm-ours.qcow2"), what).toEqual(bitmaps("bm-theirs.qcow2"));
      expect(bitmaps("bm-ours.qcow2"), what).toHaveLength(2);
      const mine = await dirty(join(tmp, "bm-ours.qcow2"));
      expect(mine.b1, what).not.toEqual([]);
      expect(mine.b2, what).not.toEqual([]);
      expect(mine, what).toEqual(await dirty(join(tmp, "bm-theirs.qcow2")));
      expect(qemuImg(["check", "bm-ours.qcow2"], tmp).code, what).toBe(0);
      expect(qemuImg(["compare", "bm-theirs.qcow2", "bm-ours.qcow2"], tmp).stdout, what).toBe(
        "Images are identical.\n",
      );
    }
    // -n into an existing qcow2 image of the same size.
    ok(qemuImg(["create", "-q", "-f", "qcow2", "bm-n.qcow2", "5000000"], tmp));
    const ours = await qimg(
      ["convert", "-n", "--bitmaps", "-O", "qcow2", "bm.qcow2", "bm-n.qcow2"],
      tmp,
    );
    expect([ours.code, ours.stderr]).toEqual([0, ""]);
    expect(await dirty(join(tmp, "bm-n.qcow2"))).toEqual(await dirty(join(tmp, "bm.qcow2")));
  });

  it("--bitmaps refuses an inconsistent bitmap (or skips it with --skip-broken-bitmaps) and a source without bitmaps, as qemu-img", async () => {
    copyFileSync(join(tmp, "bm.qcow2"), join(tmp, "inuse.qcow2"));
    markInUse(join(tmp, "inuse.qcow2"), "b1");
    const firstLine = (s: string) => `${s.split("\n")[0]!.replace(/^qemu-img: /, "qimg: ")}\n`;
    for (const [args, code] of [
      [["--bitmaps", "-O", "qcow2", "inuse.qcow2"], 1],
      [["--bitmaps", "-O", "qcow2", "-f", "raw", "inuse.qcow2"], 1],
      [["--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "inuse.qcow2"], 0],
    ] as const) {
      const what = args.join(" ");
      for (const f of ["i-theirs.qcow2", "i-ours.qcow2"]) rmSync(join(tmp, f), { force: true });
      const theirs = qemuImg(["convert", ...args, "i-theirs.qcow2"], tmp);
      const ours = await qimg(["convert", ...args, "i-ours.qcow2"], tmp);
      expect(theirs.code, `${what}: ${theirs.stderr}`).toBe(code);
      expect(ours.code, what).toBe(code);
      if (code === 1) {
        expect(ours.stderr, what).toBe(firstLine(theirs.stderr));
        expect(existsSync(join(tmp, "i-ours.qcow2")), what).toBe(false);
      } else {
        expect(ours.stderr, what).toBe(theirs.stderr.replaceAll("qemu-img: ", "qimg: "));
        const bitmaps = (f: string) =>
          (qemuInfo(join(tmp, f), "qcow2")["format-specific"] as { data: { bitmaps?: unknown } })
            .data.bitmaps;
        expect(bitmaps("i-ours.qcow2"), what).toEqual(bitmaps("i-theirs.qcow2"));
        expect(qemuImg(["check", "i-ours.qcow2"], tmp).code, what).toBe(0);
      }
    }
  });
});

/**
 * Qcow2Image.changeBackingFile: the header names the new backing file and format as
 * `qemu-img info` reads them (other extensions, bitmaps included, kept; `qemu-img check`
 * clean), refusals write nothing, and a power loss after any write leaves the old or the new
 * backing file named, never a broken header, with the guest data intact.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend } from "@qimg/io";
import { requireQemu } from "@qimg/fixtures";
import { createQcow2, openQcow2 } from "../src/index.js";
import { prng } from "./prng.js";
import { openRw, qemuImg, scratchDirs } from "./twins.js";

const haveQemu = requireQemu();
const LONG = process.env.QIMG_LONG === "1";
const SEED = Number(process.env.QIMG_SEED ?? 40);
const freshDir = scratchDirs("qimg-backing-");

function randomName(r: () => number, max: number): string {
  const len = 1 + Math.floor(r() * max);
  const chars = "abcdefghijklmnopqrstuvwxyz0123456789._-/";
  let s = "";
  for (let i = 0; i < len; i++) s += chars[Math.floor(r() * chars.length)];
  return s;
}

type Change = { filename: string | undefined; format?: string | undefined };

/** A random change; `cs` 512 keeps names short enough for cluster 0 and a staging copy. */
function randomChange(r: () => number, cs: number): Change {
  const x = r();
  if (x < 0.2) return { filename: undefined };
  const filename = randomName(r, r() < 0.2 ? (cs === 512 ? 150 : 1023) : 60);
  return {
    filename,
    format: r() < 0.7 ? (["qcow2", "raw", "qed"] as const)[Math.floor(r() * 3)] : undefined,
  };
}

describe.skipIf(!haveQemu)("changeBackingFile, read back by qemu-img info", () => {
  const runs = LONG ? 100 : 16;
  for (let k = 0; k < runs; k++) {
    const seed = SEED + k;
    it(`seed ${seed}`, async () => {
      const r = prng(seed);
      const dir = freshDir();
      const file = path.join(dir, "img.qcow2");
      const cs = [512, 4096, 65536][k % 3]!;
      const opts = [`cluster_size=${cs}`, `compat=${r() < 0.7 ? "1.1" : "0.10"}`];
      const args = ["create", "-q", "-f", "qcow2", "-o", opts.join(",")];
      if (r() < 0.6) args.push("-b", "old-backing.raw", "-F", "raw", "-u");
      expect(qemuImg([...args, file, "1000000"]).code).toBe(0);
      const v3 = opts[1] === "compat=1.1";
      const hadBitmap = v3 && r() < 0.5;
      if (hadBitmap) expect(qemuImg(["bitmap", "--add", file, "bm0"]).code).toBe(0);
      const change = randomChange(r, cs);
      const image = await openRw(file, { noBacking: true });
      await image.changeBackingFile(change);
      expect(image.backingFilename).toBe(change.filename);
      await image.close();
      const info = JSON.parse(qemuImg(["info", "--output=json", file]).stdout) as Record<
        string,
        unknown
      >;
      expect(info["backing-filename"], `seed ${seed}`).toBe(change.filename);
      expect(info["backing-filename-format"], `seed ${seed}`).toBe(
        change.filename === undefined ? undefined : change.format,
      );
      // (Checked without opening the backing file, which does not exist.)
      const spec = { driver: "qcow2", file: { driver: "file", filename: file }, backing: null };
      const check = qemuImg(["check", `json:${JSON.stringify(spec)}`]);
      expect(check.code, `seed ${seed}: ${check.stdout}${check.stderr}`).toBe(0);
      expect(JSON.stringify(info).includes('"bm0"'), `seed ${seed}: bitmap kept`).toBe(hadBitmap);
    });
  }

  it("refuses a name over 1023 bytes and writes nothing", async () => {
    const dir = freshDir();
    const file = path.join(dir, "img.qcow2");
    expect(qemuImg(["create", "-q", "-f", "qcow2", file, "1M"]).code).toBe(0);
    const before = fs.readFileSync(file);
    const image = await openRw(file);
    await expect(
      image.changeBackingFile({ filename: "x".repeat(1024), format: "raw" }),
    ).rejects.toThrow(/longer than 1023/);
    await image.close();
    expect(fs.readFileSync(file).equals(before)).toBe(true);
  });
});

describe("changeBackingFile survives a power loss after any write", () => {
  const runs = LONG ? 400 : 60;
  it(`${runs} seeded runs`, async () => {
    for (let seed = SEED; seed < SEED + runs; seed++) {
      const r = prng(seed);
      const mem = new MemoryBackend();
      const cs = [512, 4096, 65536][seed % 3]!;
      // (A 512-byte cluster 0 holds the header, extensions and a name of at most ~350 bytes.)
      const oldName =
        r() < 0.8 ? randomName(r, r() < 0.3 ? (cs === 512 ? 200 : 900) : 40) : undefined;
      await createQcow2(mem, {
        size: 500_000,
        clusterSize: cs,
        compat: r() < 0.8 ? "1.1" : "0.10",
        ...(oldName === undefined ? {} : { backingFile: oldName, backingFormat: "raw" }),
      });
      const data = new Uint8Array(70_000).map((_, i) => (i * 7 + seed) & 255);
      {
        const img = await openQcow2(mem, { readOnly: false, noBacking: true });
        await img.write(12_345, data);
        await img.close();
      }
      const change = randomChange(r, cs);
      let ops = 0;
      const lossAt = Math.floor(r() * 8);
      const fault = await FaultBackend.wrap(MemoryBackend.from(mem.bytes()), {
        failWhen: (op) => (op === "write" || op === "flush") && ++ops > lossAt,
      });
      try {
        const img = await openQcow2(fault, { readOnly: false, noBacking: true });
        await img.changeBackingFile(change);
        await img.close();
      } catch {
        // The power is gone.
      }
      const after = fault.powerLoss({ tearLastWrite: r() < 0.5, seed });
      const img = await openQcow2(after, { noBacking: true });
      const named = [img.backingFilename, img.backingFormat];
      const olds = [oldName, oldName === undefined ? undefined : "raw"];
      const news = [change.filename, change.filename === undefined ? undefined : change.format];
      expect([olds, news], `seed ${seed} (loss after ${lossAt})`).toContainEqual(named);
      const back = new Uint8Array(data.length);
      await img.read(12_345, back);
      expect(Buffer.compare(back, data), `seed ${seed}: data`).toBe(0);
      await img.close();
    }
  }, 600_000);
});

/**
 * `qimg check` on images with persistent bitmaps, against `qemu-img check` 7.2: bitmap
 * directory, tables and data clusters are counted as QEMU counts them, so a bitmap cluster
 * whose refcount is off is found (and `-r` repairs it) exactly as qemu-img finds it.
 * (Known difference: `-r all` rebuilds land elsewhere. An image whose bitmaps autoclear bit
 * is clear: stale-bitmaps.test.ts; bitmap table entries that break the spec:
 * packages/check/test/bitmap-tables.test.ts.)
 */
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu } from "./qemu.js";

function run(
  tool: string,
  args: readonly string[],
): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(tool, args, { encoding: "utf8", env: { ...process.env, LC_ALL: "C" } });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

function must(tool: string, args: readonly string[]): void {
  const r = run(tool, args);
  if (r.code !== 0) throw new Error(`${tool} ${args.join(" ")}: ${r.stderr}`);
}

if (!hasQemu) console.log("bitmap-check.test: qemu-img not found, skipping");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-bitmap-check-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** Where the first bitmap's structures are: directory, table, first data cluster. */
function bitmapClusters(bytes: Buffer): { dir: number; table: number; data: number } {
  const cs = 2 ** bytes.readUInt32BE(20);
  let p = bytes.readUInt32BE(100);
  while (p + 8 <= cs) {
    const type = bytes.readUInt32BE(p);
    const len = bytes.readUInt32BE(p + 4);
    if (type === 0) break;
    if (type === 0x23852875) {
      const dir = Number(bytes.readBigUInt64BE(p + 8 + 16));
      const table = Number(bytes.readBigUInt64BE(dir));
      const data = Number(bytes.readBigUInt64BE(table) & 0x00ff_ffff_ffff_fe00n);
      return { dir, table, data };
    }
    p += 8 + Math.ceil(len / 8) * 8;
  }
  throw new Error("no bitmaps extension");
}

/** Set the 16-bit refcount of the cluster at `offset`. */
function setRefcount(file: string, offset: number, value: number): void {
  const bytes = fs.readFileSync(file);
  const cs = 2 ** bytes.readUInt32BE(20);
  const table = Number(bytes.readBigUInt64BE(48));
  const c = Math.floor(offset / cs);
  const per = cs / 2;
  const block = Number(bytes.readBigUInt64BE(table + 8 * Math.floor(c / per)));
  bytes.writeUInt16BE(value, block + 2 * (c % per));
  fs.writeFileSync(file, bytes);
}

describe.skipIf(!hasQemu)("qimg check counts bitmap clusters as qemu-img check does", () => {
  const base = path.join(tmp, "base.qcow2");
  const cases: [what: "dir" | "table" | "data", refcount: number][] = [
    ["table", 0],
    ["table", 2],
    ["dir", 0],
    ["dir", 2],
    ["data", 0],
    ["data", 2],
  ];
  for (const [what, refcount] of cases) {
    it(`bitmap ${what} cluster with refcount ${refcount}: check and check -r leaks say and do what qemu-img does`, async () => {
      if (!fs.existsSync(base)) {
        must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "4M"]);
        must("qemu-img", ["bitmap", "--add", "-g", "512", base, "b"]);
        must("qemu-io", ["-f", "qcow2", "-c", "write 0 3M", base]);
      }
      const broken = path.join(tmp, `${what}-${refcount}.qcow2`);
      fs.copyFileSync(base, broken);
      setRefcount(broken, bitmapClusters(fs.readFileSync(broken))[what], refcount);
      for (const args of [[], ["--output=json"], ["-r", "leaks"]]) {
        const ours = path.join(tmp, `${what}-${refcount}-ours.qcow2`);
        const theirs = path.join(tmp, `${what}-${refcount}-theirs.qcow2`);
        fs.copyFileSync(broken, ours);
        fs.copyFileSync(broken, theirs);
        const mine = await qimg(["check", ...args, ours]);
        const q = run("qemu-img", ["check", ...args, theirs]);
        const where = `${what} refcount ${refcount}, check ${args.join(" ")}`;
        expect(mine.code, where).toBe(q.code);
        expect(mine.stdout.replaceAll(ours, theirs), where).toBe(q.stdout);
        // qemu-img also prints a line about the bitmaps it could not store when -r cannot
        // repair; the verdict lines must match.
        expect(mine.stderr.replaceAll(/^qimg: /gm, "qemu-img: "), where).toBe(
          q.stderr
            .split("\n")
            .filter((l) => !l.startsWith("qcow2: ") && !l.includes("Lost persistent bitmaps"))
            .join("\n"),
        );
        if (args[0] === "-r") {
          // After the repair ours checks no worse than qemu-img's (which, after a failed
          // -r leaks on a data cluster with refcount 0, even breaks the bitmap directory).
          const theirsAgain = run("qemu-img", ["check", theirs]).code;
          if (theirsAgain === 0) expect(run("qemu-img", ["check", ours]).code, where).toBe(0);
        }
      }
    });
  }
});

/**
 * A plain check gathers the COPIED verdicts in the same walk as the reference counts (issue
 * 12's speed work) and reports them after the refcount comparison, where qemu-img reports
 * them. Seeded images made by qemu-io (with a snapshot, so refcounts of 2 are common) get
 * random COPIED flips in L1 and L2 entries and random refcount changes; qimg's human and JSON
 * output must equal qemu-img check's byte for byte.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FileBackend } from "@qimg/io/node";
import { U64TableView } from "@qimg/structs";
import { checkImage, formatCheckHuman, formatCheckJson } from "../src/index.js";
import { haveQemu, prng, qemuCheck } from "./helpers.js";

const dir = mkdtempSync(join(tmpdir(), "qimg-copied-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const SEEDS = process.env.QIMG_LONG === "1" ? 60 : 6;

function be32(b: Uint8Array, o: number): number {
  return new DataView(b.buffer, b.byteOffset).getUint32(o, false);
}

/** A qemu-made image, then random COPIED flips and refcount changes (seeded). */
function makeImage(seed: number): string {
  const file = join(dir, `c-${seed}.qcow2`);
  const r = prng(seed);
  const cs = 4096;
  const size = 2 * 1024 * 1024 + 3 * 512 + 7;
  const run = (cmd: string, args: string[]): void => {
    const p = spawnSync(cmd, args, { encoding: "utf8" });
    if (p.status !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${p.stderr}`);
  };
  run("qemu-img", ["create", "-q", "-f", "qcow2", "-o", `cluster_size=${cs}`, file, String(size)]);
  const io = (n: number): string[] =>
    Array.from({ length: n }, () => {
      const off = Math.floor(r() * (size - 9000));
      return ["-c", `write -P ${Math.floor(r() * 255)} ${off} ${1 + Math.floor(r() * 9000)}`];
    }).flat();
  run("qemu-io", [...io(12), file]);
  run("qemu-img", ["snapshot", "-c", "s", file]);
  run("qemu-io", [...io(6), file]);
  const b = new Uint8Array(readFileSync(file));
  const l1Off = Number(new DataView(b.buffer).getBigUint64(40, false));
  const l1Size = be32(b, 36);
  const rtOff = Number(new DataView(b.buffer).getBigUint64(48, false));
  const l1 = new U64TableView(b.subarray(l1Off, l1Off + l1Size * 8), "big");
  for (let i = 0; i < l1Size; i++) {
    if (l1.isZero(i)) continue;
    if (r() < 0.3) l1.setWords(i, (l1.hi(i) ^ 0x8000_0000) >>> 0, l1.lo(i));
    const l2Off = (l1.hi(i) & 0x00ff_ffff) * 2 ** 32 + (l1.lo(i) & 0xffff_fe00);
    const l2 = new U64TableView(b.subarray(l2Off, l2Off + cs), "big");
    for (let j = 0; j < l2.length; j++) {
      if (!l2.isZero(j) && r() < 0.05) l2.setWords(j, (l2.hi(j) ^ 0x8000_0000) >>> 0, l2.lo(j));
    }
  }
  // Refcounts (16-bit, one block at the first table entry): a few clusters up or down.
  const rb = Number(new DataView(b.buffer).getBigUint64(rtOff, false));
  const clusters = Math.ceil(b.byteLength / cs);
  for (let n = 0; n < 4; n++) {
    const c = 1 + Math.floor(r() * (clusters - 1));
    const v = new DataView(b.buffer).getUint16(rb + c * 2, false);
    new DataView(b.buffer).setUint16(rb + c * 2, r() < 0.5 ? v + 1 : Math.max(0, v - 1), false);
  }
  writeFileSync(file, b);
  return file;
}

describe.skipIf(!haveQemu())("COPIED verdicts of a plain check, in qemu-img's order", () => {
  for (let n = 0; n < SEEDS; n++) {
    const seed = 4242 + n * 101;
    it(`seed ${seed}`, async () => {
      const file = makeImage(seed);
      const q = qemuCheck(file);
      const qj = qemuCheck(file, "--output=json");
      const backend = await FileBackend.open(file, { readOnly: true });
      try {
        const res = await checkImage(backend, "qcow2", { filename: `c-${seed}.qcow2` });
        const human = formatCheckHuman(res);
        expect(human.stderr, `seed ${seed}`).toBe(q.stderr);
        expect(human.stdout, `seed ${seed}`).toBe(q.stdout);
        expect(formatCheckJson(res), `seed ${seed}`).toBe(qj.stdout);
        expect(res.exitCode).toBe(q.status);
      } finally {
        await backend.close();
      }
    });
  }
});

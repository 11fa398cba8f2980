/**
 * Metadata overlap protection against qemu-io (issue 10): an image whose pointers were poked
 * so that one metadata structure lies on another (the L1 table on the refcount table, an L2
 * table on a refcount block, data on a snapshot's L1 table...). The same writes go through
 * qemu-io on one twin and through the driver on the other; the driver's image must end no
 * worse than qemu-io's: `qemu-img check` still runs, finds no more corruptions, the header is
 * the same, and the corrupt bit is set exactly when QEMU sets it.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { CorruptImageError } from "@qimg/structs";
import { requireQemu } from "@qimg/fixtures";
import {
  compareImages,
  describeOps,
  driverOps,
  qemuCheck,
  qemuImg,
  qemuIoOps,
  tool,
} from "./twins.js";
import type { Op } from "./twins.js";
import { prng } from "./prng.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("skipping overlap twin tests: qemu-img/qemu-io are not on PATH");
const LONG = process.env.QIMG_LONG === "1";
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-overlap-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const COPIED = 1n << 63n;

/** A qemu-made image with data, a snapshot and data written after it (own and shared L2s). */
function baseImage(): Buffer {
  const file = path.join(tmp, "base.qcow2");
  if (!fs.existsSync(file)) {
    const ok = (r: { code: number; stdout: string; stderr: string }): void => {
      if (r.code !== 0) throw new Error(r.stdout + r.stderr);
    };
    const io = (cmds: string[]): void =>
      ok(tool("qemu-io", [...cmds.flatMap((c) => ["-c", c]), file]));
    ok(qemuImg(["create", "-f", "qcow2", file, String(1000 * 1024 * 1024 + 512 * 3)]));
    io(["write -P 0x11 0 200k", "write -P 0x12 600M 70k"]);
    ok(qemuImg(["snapshot", "-c", "snap", file]));
    io(["write -P 0x13 100k 10k", "write -P 0x14 3M 64k"]);
  }
  return fs.readFileSync(file);
}

/** Where every structure of the base image lives (read straight from the bytes). */
function layout(b: Buffer) {
  const l1 = Number(b.readBigUInt64BE(40));
  const reftable = Number(b.readBigUInt64BE(48));
  const refblock = Number(b.readBigUInt64BE(reftable) & 0x00ff_ffff_ffff_fe00n);
  const l2 = Number(b.readBigUInt64BE(l1) & 0x00ff_ffff_ffff_fe00n);
  const l2b = Number(b.readBigUInt64BE(l1 + 8) & 0x00ff_ffff_ffff_fe00n);
  const snapTable = Number(b.readBigUInt64BE(64));
  const snapL1 = Number(b.readBigUInt64BE(snapTable));
  const snapL2 = Number(b.readBigUInt64BE(snapL1) & 0x00ff_ffff_ffff_fe00n);
  const data = Number(b.readBigUInt64BE(l2) & 0x00ff_ffff_ffff_fe00n);
  return { l1, reftable, refblock, l2, l2b, snapTable, snapL1, snapL2, data };
}

type Layout = ReturnType<typeof layout>;
type Target = Exclude<keyof Layout, "data" | "l2b">;

/** Pointer fields that can be bent onto another structure. */
const POKES: Record<string, (b: Buffer, L: Layout, target: number) => void> = {
  "header l1_table_offset": (b, _L, t) => b.writeBigUInt64BE(BigInt(t), 40),
  "L1 entry 0": (b, L, t) => b.writeBigUInt64BE(BigInt(t) | COPIED, L.l1),
  "L1 entry 1": (b, L, t) => b.writeBigUInt64BE(BigInt(t) | COPIED, L.l1 + 8),
  "refcount table entry 0": (b, L, t) => b.writeBigUInt64BE(BigInt(t), L.reftable),
  "L2 entry 0 (data)": (b, L, t) => b.writeBigUInt64BE(BigInt(t) | COPIED, L.l2),
  "snapshot L1 offset": (b, L, t) => b.writeBigUInt64BE(BigInt(t), L.snapTable),
};
const TARGETS: Target[] = ["l1", "reftable", "refblock", "l2", "snapTable", "snapL1", "snapL2"];

/** Writes, zero writes and discards that reach the poked structures (in place, allocating, in the second L2's range). */
function opsOf(seed: number): Op[] {
  const r = prng(seed);
  const ops: Op[] = [];
  const spots = [0, 70_000, 3 * 1024 * 1024 + 1000, 600 * 1024 * 1024 + 5000, 900 * 1024 * 1024];
  for (let i = 0; i < 3; i++) {
    const off = spots[Math.floor(r() * spots.length)]! + Math.floor(r() * 3000);
    const len = 1 + Math.floor(r() * (r() < 0.5 ? 9000 : 200_000));
    const x = r();
    if (x < 0.7) ops.push({ k: "write", off, len, seed: seed * 10 + i });
    else if (x < 0.85) ops.push({ k: "zero", off, len, unmap: r() < 0.5 });
    else ops.push({ k: "discard", off, len });
    // qemu-io's default cache mode is writethrough: every write is flushed at once.
    ops.push({ k: "flush" });
  }
  return ops;
}

interface Outcome {
  readonly problems: string[];
  readonly detail: string;
}

async function twinOutcome(
  name: string,
  poke: string,
  target: Target,
  seed: number,
): Promise<Outcome> {
  const dir = path.join(tmp, name);
  fs.mkdirSync(dir, { recursive: true });
  const b = Buffer.from(baseImage());
  const L = layout(b);
  POKES[poke]!(b, L, L[target]);
  const a = path.join(dir, "a.qcow2");
  const mine = path.join(dir, "b.qcow2");
  fs.writeFileSync(a, b);
  fs.writeFileSync(mine, b);
  const before = qemuCheck(a);
  const ops = opsOf(seed);
  const q = qemuIoOps(a, ops, dir);
  const qemuRefused = /failed/.test(q.stdout + q.stderr);
  const failure = await driverOps(mine, ops);
  const problems: string[] = [];
  if (failure !== undefined && !(failure instanceof CorruptImageError))
    problems.push(
      `driver failed with something else than a refused write: ${failure instanceof Error ? failure.message : "?"}`,
    );
  const A = qemuCheck(a);
  const B = qemuCheck(mine);
  if (B.code === 1 && A.code !== 1)
    problems.push(`qemu-img check cannot run on the driver's image: ${B.raw}`);
  // A write the driver refused may leave the image as it was even where qemu-io's write
  // happened to lower the count (by writing over a structure the driver protects, such as a
  // snapshot's L2 table): no worse than before is no worse.
  const refused =
    failure instanceof CorruptImageError && /Preventing invalid write/.test(failure.message);
  if (B.corruptions > A.corruptions && !(refused && B.corruptions <= before.corruptions))
    problems.push(
      `driver's image has ${B.corruptions} corruptions, qemu-io's ${A.corruptions}\n--- driver's:\n${B.raw}\n--- qemu-io's:\n${A.raw}`,
    );
  if (B.checkErrors > A.checkErrors)
    problems.push(`driver's image has ${B.checkErrors} check errors, qemu-io's ${A.checkErrors}`);
  // The header is QEMU's, except for the corrupt bit (byte 79, bit 1): the driver checks
  // more structures than QEMU's default (inactive L2 tables), so it may refuse (and mark the
  // image corrupt) where QEMU writes; a write refused for an overlap always marks it.
  const ha = Buffer.from(fs.readFileSync(a).subarray(0, 104));
  const hb = Buffer.from(fs.readFileSync(mine).subarray(0, 104));
  const corruptBit = (hb[79]! & 2) !== 0;
  if (refused && !corruptBit)
    problems.push("a write refused for an overlap did not set the corrupt bit");
  ha[79] = ha[79]! & ~2;
  hb[79] = hb[79]! & ~2;
  if (!ha.equals(hb))
    problems.push(`headers differ: qemu-io ${ha.toString("hex")} driver ${hb.toString("hex")}`);
  // Where neither refused, the guest bytes agree too (unless QEMU cannot read its own image).
  if (!qemuRefused && failure === undefined) {
    const cmp = compareImages(a, mine);
    if (cmp !== "" && !cmp.includes("reading offset")) problems.push(`guest bytes differ: ${cmp}`);
  }
  const detail = `${poke} -> ${target}, seed ${seed} (${describeOps(ops)}): before ${before.corruptions}c/${before.leaks}l; qemu-io ${qemuRefused ? "refused" : "wrote"} (${A.corruptions}c/${A.leaks}l/${A.checkErrors}e), driver ${failure === undefined ? "wrote" : "refused"} (${B.corruptions}c/${B.leaks}l/${B.checkErrors}e)`;
  return { problems, detail };
}

describe.skipIf(!haveQemu)("metadata overlap protection, as qemu-io", () => {
  it("the L1 table placed on the refcount table: the write is refused, the refcount table intact", async () => {
    const o = await twinOutcome("l1-on-reftable", "header l1_table_offset", "reftable", 1);
    expect(o.problems, o.detail).toEqual([]);
    const b = fs.readFileSync(path.join(tmp, "l1-on-reftable", "b.qcow2"));
    expect(b.readBigUInt64BE(72) & 2n).toBe(2n); // corrupt bit, as QEMU sets it
  });

  it("every pointer bent onto every other structure ends no worse than qemu-io's image", async () => {
    const bad: string[] = [];
    let n = 0;
    for (const poke of Object.keys(POKES)) {
      for (const target of TARGETS) {
        for (const seed of LONG ? [1, 2, 3, 4, 5] : [n % 5]) {
          const o = await twinOutcome(`p${n++}`, poke, target, seed);
          if (o.problems.length > 0) bad.push(`${o.detail}\n  ${o.problems.join("\n  ")}`);
        }
      }
    }
    expect(bad, bad.join("\n")).toEqual([]);
  });
});

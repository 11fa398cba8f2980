/**
 * QED images with hostile feature bits or damaged tables: qimg gives qemu-img's verdicts —
 * open refused or not, `check`'s JSON and exit code, and what `check -r leaks` / `-r all`
 * leave behind (the header bytes and a second check) — on twin images made by qemu-img and
 * damaged by the same pokes.
 */
import {
  copyFileSync,
  mkdtempSync,
  openSync,
  readFileSync,
  closeSync,
  readSync,
  rmSync,
  statSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping QED verdict interop: qemu-img is not on PATH");

const SEED = Number(process.env.QIMG_SEED ?? Date.now() % 1_000_000);
const tmp = mkdtempSync(join(tmpdir(), "qimg-qed-verdicts-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function peek64(file: string, at: number): bigint {
  const fd = openSync(file, "r");
  const b = Buffer.alloc(8);
  readSync(fd, b, 0, 8, at);
  closeSync(fd);
  return b.readBigUInt64LE(0);
}
function poke64(file: string, at: number, value: bigint): void {
  const fd = openSync(file, "r+");
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(value);
  writeSync(fd, b, 0, 8, at);
  closeSync(fd);
}

interface Layout {
  file: string;
  cluster: number;
  l1: number;
  l2: number;
  size: number;
}

/** A QED image with data in its first two clusters (so L1[0] and L2[0], L2[1] are set). */
function makeImage(name: string, size: number, cluster: number): Layout {
  const file = join(tmp, name);
  expect(
    qemuImg(["create", "-q", "-f", "qed", "-o", `cluster_size=${cluster}`, file, String(size)])
      .code,
  ).toBe(0);
  expect(qemuIo(["-f", "qed", "-c", `write -P 0x5a 0 ${cluster * 2}`, file]).code).toBe(0);
  const l1 = Number(peek64(file, 40));
  const l2 = Number(peek64(file, l1));
  return { file, cluster, l1, l2, size: statSync(file).size };
}

type Poke = (l: Layout) => [number, bigint][];
const scenarios: [string, Poke][] = [
  ["unknown feature bit", () => [[16, 0x10n]]],
  ["unknown high feature bit", () => [[16, 1n << 40n]]],
  ["unknown compat feature", () => [[24, 0x3n]]],
  ["unknown autoclear bits", () => [[32, 0x8000_0000_0000_0001n]]],
  ["need-check bit", () => [[16, 0x2n]]],
  ["L1 entry past the end of the file", (l) => [[l.l1, BigInt(l.size + 16 * l.cluster)]]],
  ["L1 entry unaligned", (l) => [[l.l1, BigInt(l.l2 + 512)]]],
  ["L1 entry pointing into the header", (l) => [[l.l1, 512n]]],
  ["L2 entry past the end of the file", (l) => [[l.l2, BigInt(l.size + 4 * l.cluster)]]],
  ["L2 entry unaligned", (l) => [[l.l2 + 8, peek64(l.file, l.l2 + 8) + 4096n]]],
  ["L2 entry pointing at the header", (l) => [[l.l2, 1n]]],
  ["L2 entry pointing at the L1 table", (l) => [[l.l2, BigInt(l.l1)]]],
  ["L2 entries sharing a cluster", (l) => [[l.l2 + 8, peek64(l.file, l.l2)]]],
  ["L1 table offset past the end", (l) => [[40, BigInt(l.size + l.cluster * 64)]]],
  ["L1 table offset unaligned", (l) => [[40, BigInt(l.l1 + 512)]]],
  ["L1 table offset zero", () => [[40, 0n]]],
];

const header = (file: string): string => readFileSync(file).subarray(0, 64).toString("hex");

describe.skipIf(!hasQemu)(`QED verdicts as qemu-img's (seed ${SEED})`, () => {
  const rnd = prng(SEED);
  let n = 0;
  for (const [what, poke] of scenarios) {
    const size = 3 * 65536 + 1 + Math.floor(rnd() * 40_000_000);
    const cluster = [4096, 65536][Math.floor(rnd() * 2)] ?? 65536;
    it(`${what} (size ${size}, cluster ${cluster})`, async () => {
      const base = makeImage(`img${n++}.qed`, size, cluster);
      for (const [at, v] of poke(base)) poke64(base.file, at, v);
      for (const mode of [[], ["-r", "leaks"], ["-r", "all"]]) {
        const theirs = `${base.file}.${mode.join("")}.theirs`;
        const ours = `${base.file}.${mode.join("")}.ours`;
        copyFileSync(base.file, theirs);
        copyFileSync(base.file, ours);
        const t = qemuImg(["check", "-f", "qed", "--output=json", ...mode, theirs]);
        const o = await qimg(["check", "-f", "qed", "--output=json", ...mode, ours]);
        const label = `check ${mode.join(" ")}: qemu-img said ${t.code} ${t.stdout} ${t.stderr}`;
        expect(o.code, label).toBe(t.code);
        const json = (s: string): unknown => {
          if (s === "") return s;
          const j = JSON.parse(s) as Record<string, unknown>;
          delete j.filename;
          return j;
        };
        expect(json(o.stdout), label).toEqual(json(t.stdout));
        expect(header(ours), label).toBe(header(theirs));
        const t2 = qemuImg(["check", "-f", "qed", "--output=json", theirs]);
        const o2 = await qimg(["check", "-f", "qed", "--output=json", ours]);
        expect(o2.code, `${label}; then ${t2.stdout}`).toBe(t2.code);
        expect(json(o2.stdout)).toEqual(json(t2.stdout));
      }
      // The human summary on stdout (qimg adds per-item lines on stderr, qemu-img has none
      // for QED), and the one error line when the image does not open.
      {
        const theirs = `${base.file}.human.theirs`;
        const ours = `${base.file}.human.ours`;
        copyFileSync(base.file, theirs);
        copyFileSync(base.file, ours);
        const t = qemuImg(["check", "-f", "qed", theirs]);
        const o = await qimg(["check", "-f", "qed", ours]);
        expect(o.code).toBe(t.code);
        expect(o.stdout).toBe(t.stdout);
        // An image that does not open: qemu-img's words after the file name (qimg's line is
        // "qimg: <file>: <why>" where qemu-img says "Could not open '<file>': <why>").
        if (t.stdout === "") {
          const why = t.stderr.replace(`qemu-img: Could not open '${theirs}': `, "");
          expect(o.stderr).toBe(`qimg: ${ours}: ${why}`);
        }
      }
      // Opening for reading and for writing (qemu-io) gives the same exit code.
      for (const io of [
        ["-r", "-c", "read 0 512"],
        ["-c", "write -P 0x11 0 512"],
      ]) {
        const theirs = `${base.file}.io.theirs`;
        const ours = `${base.file}.io.ours`;
        copyFileSync(base.file, theirs);
        copyFileSync(base.file, ours);
        const t = qemuIo(["-f", "qed", ...io, theirs]);
        const o = await qimg(["io", "-f", "qed", ...io, ours]);
        expect(o.code, `qemu-io ${io.join(" ")}: ${t.stdout} ${t.stderr}`).toBe(t.code);
        expect(header(ours)).toBe(header(theirs));
      }
    });
  }
});

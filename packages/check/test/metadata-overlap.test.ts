/**
 * A repair never writes into a "table" that is really the header or other metadata: an L1
 * entry holding only flags (offset 0), an L1 entry pointing at the refcount table or at the L1
 * table itself, an L2 entry whose data cluster is the header or an L1 table. Checked against
 * the real qemu-img on images it made (skips with a printed reason without qemu-img).
 */
import { spawnSync } from "node:child_process";
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FileBackend } from "@qimg/io/node";
import { checkImage } from "../src/index.js";
import { haveQemu, prng } from "./helpers.js";

const work = mkdtempSync(join(tmpdir(), "qimg-check-overlap-"));
afterAll(() => rmSync(work, { recursive: true, force: true }));
const SEED = Number(process.env.QIMG_SEED ?? Date.now() % 1_000_000);

function run(cmd: string, args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: "utf8", env: { ...process.env, LC_ALL: "C" } });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** corruptions + leaks + check errors as qemu-img check counts them (Infinity: cannot check). */
function qemuProblems(file: string): number {
  const r = run("qemu-img", ["check", "--output=json", file]);
  try {
    const j = JSON.parse(r.stdout) as Record<string, number | undefined>;
    return (j.corruptions ?? 0) + (j.leaks ?? 0) + (j["check-errors"] ?? 0);
  } catch {
    return Infinity;
  }
}

const u32 = (b: Uint8Array, o: number): number =>
  new DataView(b.buffer, b.byteOffset).getUint32(o, false);
const u64 = (b: Uint8Array, o: number): number => u32(b, o) * 0x1_0000_0000 + u32(b, o + 4);

/** A 2 GiB qcow2 (L1 of 4 or more entries) with data in the first and third GiB. */
function base(name: string, rnd: () => number): { file: string; cs: number } {
  const cs = [4096, 65536][Math.floor(rnd() * 2)]!;
  const file = join(work, `${name}.qcow2`);
  expect(
    run("qemu-img", ["create", "-f", "qcow2", "-o", `cluster_size=${cs}`, file, "2G"]).status,
  ).toBe(0);
  const a = Math.floor(rnd() * 100_000);
  const b = 1024 * 1024 * 1024 + Math.floor(rnd() * 100_000);
  const w = run("qemu-io", [
    "-c",
    `write -P 0x5a ${a} 12345`,
    "-c",
    `write -P 0xa5 ${b} 7777`,
    file,
  ]);
  expect(w.status, w.stderr).toBe(0);
  return { file, cs };
}

function setU64(file: string, offset: number, value: bigint): void {
  const f = new Uint8Array(readFileSync(file));
  new DataView(f.buffer).setBigUint64(offset, value, false);
  writeFileSync(file, f);
}

async function repairAll(file: string): Promise<void> {
  const backend = await FileBackend.open(file);
  try {
    await checkImage(backend, "qcow2", { repair: "all" });
  } finally {
    await backend.close();
  }
}

/** Mutate a copy of a clean image, repair it, and check what must hold. */
async function expectRepairKeeps(
  clean: string,
  cs: number,
  mutateAt: (bytes: Uint8Array) => {
    offset: number;
    value: bigint;
    keep: [number, number][];
    compareGuest?: boolean;
  },
): Promise<void> {
  const file = clean.replace(/\.qcow2$/, "-mutated.qcow2");
  copyFileSync(clean, file);
  const before = new Uint8Array(readFileSync(file));
  const m = mutateAt(before);
  setU64(file, m.offset, m.value);
  const mutated = new Uint8Array(readFileSync(file));
  const problems = qemuProblems(file);
  await repairAll(file);
  const repaired = new Uint8Array(readFileSync(file));
  const where = `seed ${SEED}, cs ${cs}, entry at 0x${m.offset.toString(16)} = 0x${m.value.toString(16)}`;
  // Before the fix this wrote zeros over the header: the file was no qcow2 image any more.
  expect(u32(repaired, 0), where).toBe(0x514649fb);
  // The header cluster and the structures named in `keep` are untouched (but a refcount
  // rebuild moves the refcount table: its offset and size, bytes 48..59, may change).
  const head = (b: Uint8Array): Buffer => {
    const c = Buffer.from(b.subarray(0, cs));
    c.fill(0, 48, 60);
    return c;
  };
  expect(Buffer.compare(head(repaired), head(mutated)), where).toBe(0);
  for (const [o, n] of m.keep) {
    expect(Buffer.compare(repaired.subarray(o, o + n), mutated.subarray(o, o + n)), where).toBe(0);
  }
  expect(qemuProblems(file), where).toBeLessThanOrEqual(problems);
  const after = run("qemu-img", ["check", file]);
  expect(qemuProblems(file), `${where}: ${after.stdout}${after.stderr}`).toBe(0);
  if (m.compareGuest === false) return;
  // Guest data as before the mutation (the mutated entries mapped nothing valid).
  const cmp = run("qemu-img", ["compare", clean, file]);
  expect(cmp.status, `${where}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
}

describe.skipIf(!haveQemu())(`repair never writes into metadata (seed ${SEED})`, () => {
  it("an L1 entry holding only the COPIED flag (offset 0) is not taken for an L2 table at offset 0", async () => {
    const rnd = prng(SEED);
    const { file, cs } = base("copied-only", rnd);
    // QEMU's repair keeps the header (its overlap check refuses writes into it).
    const twin = join(work, "copied-only-qemu.qcow2");
    copyFileSync(file, twin);
    const l1 = u64(new Uint8Array(readFileSync(file)), 40);
    setU64(twin, l1 + 8, 0x8000_0000_0000_0000n);
    run("qemu-img", ["check", "-r", "all", twin]);
    expect(u32(new Uint8Array(readFileSync(twin)), 0)).toBe(0x514649fb);
    await expectRepairKeeps(file, cs, () => ({
      offset: l1 + 8,
      value: 0x8000_0000_0000_0000n,
      keep: [],
    }));
  });

  it("an L1 entry pointing at the header or the L1 table is dropped; none is written through (the refcount table neither)", async () => {
    const rnd = prng(SEED + 1);
    for (const target of ["refcount table", "L1 table", "header"] as const) {
      const { file, cs } = base(`l1-${target.replace(" ", "-")}`, rnd);
      await expectRepairKeeps(file, cs, (f) => {
        const l1 = u64(f, 40);
        const rt = u64(f, 48);
        const to = target === "refcount table" ? rt : target === "L1 table" ? l1 : 0;
        return {
          offset: l1 + 8 * 3,
          value: 0x8000_0000_0000_0000n | BigInt(to),
          // After the rebuild the old refcount table is just the L2 table that L1 entry names
          // (QEMU's repair then fixes COPIED flags in it too), so it is only kept otherwise.
          keep: target === "refcount table" ? [] : [[rt, cs]],
          // An L2 table under the refcount table stays mapped, as in QEMU's repair (the
          // refcount structures are rebuilt elsewhere; a refcount table entry pointing at a
          // real L2 table looks the same, and dropping that would lose its data).
          compareGuest: target !== "refcount table",
        };
      });
    }
  });

  it("an L2 entry whose data cluster is the header or the L1 table is dropped", async () => {
    const rnd = prng(SEED + 2);
    for (const target of ["header", "L1 table"] as const) {
      const { file, cs } = base(`l2-${target.replace(" ", "-")}`, rnd);
      await expectRepairKeeps(file, cs, (f) => {
        const l1 = u64(f, 40);
        const rt = u64(f, 48);
        const l2Offset = (u32(f, l1) & 0x00ff_ffff) * 0x1_0000_0000 + (u32(f, l1 + 4) & ~0x1ff);
        const to = target === "header" ? 0 : l1;
        // An unused entry of the first L2 table, far from the written data.
        const index = cs / 8 - 1 - Math.floor(rnd() * 8);
        const value =
          target === "header"
            ? (1n << 62n) | 512n // compressed, inside the header cluster
            : 0x8000_0000_0000_0000n | BigInt(to);
        return {
          offset: l2Offset + index * 8,
          value,
          keep: [
            [l1, 8],
            [rt, cs],
          ],
        };
      });
    }
  });
});

describe.skipIf(!haveQemu())(
  `snapshot table entries that name no real L1 table (seed ${SEED})`,
  () => {
    for (const [what, field, value] of [
      ["L1 offset 0 (the header)", "offset", 0],
      ["L1 size far past the end of the file", "size", 65536],
    ] as const) {
      it(`${what}: the repair keeps the active image's data and is never worse`, async () => {
        const rnd = prng(SEED + (field === "offset" ? 3 : 4));
        const { file, cs } = base(`sn-${field}`, rnd);
        expect(run("qemu-img", ["snapshot", "-c", "s1", file]).status).toBe(0);
        // Data written after the snapshot: copied-on-write clusters, L2 tables shared and not.
        expect(run("qemu-io", ["-c", `write -P 0x77 ${cs * 3 + 17} ${cs * 2}`, file]).status).toBe(
          0,
        );
        const clean = file.replace(/\.qcow2$/, "-clean.qcow2");
        copyFileSync(file, clean);
        const f = new Uint8Array(readFileSync(file));
        const dv = new DataView(f.buffer);
        const sn = u64(f, 64);
        if (field === "offset") dv.setBigUint64(sn, BigInt(value), false);
        else dv.setUint32(sn + 8, value, false);
        writeFileSync(file, f);
        const before = qemuProblems(file);
        await repairAll(file);
        const where = `seed ${SEED}, cs ${cs}, snapshot ${field} -> ${value}`;
        const after = new Uint8Array(readFileSync(file));
        expect(u32(after, 0), where).toBe(0x514649fb);
        expect(qemuProblems(file), where).toBeLessThanOrEqual(before);
        if (before !== Infinity) {
          const cmp = run("qemu-img", ["compare", clean, file]);
          expect(cmp.status, `${where}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
        } else {
          // qemu-img cannot open it (snapshot L1 table past the end of the file): the active
          // L1 table must be as it was.
          const a = new Uint8Array(readFileSync(clean));
          const l1 = u64(a, 40);
          const n = u32(a, 36) * 8;
          expect(Buffer.compare(after.subarray(l1, l1 + n), a.subarray(l1, l1 + n)), where).toBe(0);
        }
      });
    }
  },
);

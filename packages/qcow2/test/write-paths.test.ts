/**
 * Write paths against real qemu-io on twin images (issue 10): the same operations through
 * qemu-io on one image and through the driver on the other; the guest bytes must match
 * (`qemu-img compare`), both images must check clean, and what the driver stores must look
 * like what QEMU stores. Seeds are printed on failure; QIMG_LONG=1 runs more of them.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { requireQemu } from "@qimg/fixtures";
import {
  compareImages,
  compressedBytes,
  describeOps,
  driverOps,
  firstDiff,
  modelOf,
  openRw,
  qemuCheck,
  qemuImg,
  qemuIoOps,
  qemuMap,
  qemuRaw,
  randomOps,
  scratchDirs,
} from "./twins.js";
import type { Op } from "./twins.js";
import { prng } from "./prng.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("skipping write-path twin tests: qemu-img/qemu-io are not on PATH");
const LONG = process.env.QIMG_LONG === "1";
const freshDir = scratchDirs("qimg-twins-");

function create(dir: string, name: string, opts: string, size: number, backing?: string): void {
  const args = ["create", "-f", "qcow2", "-o", opts, name, String(size)];
  if (backing !== undefined) args.push("-b", backing, "-F", "raw");
  const r = qemuImg(args, dir);
  if (r.code !== 0) throw new Error(`qemu-img create ${opts}: ${r.stderr}`);
}

/** Run `ops` on twins and return what differs (empty when the twins agree and check clean). */
async function twinProblems(
  dir: string,
  ops: readonly Op[],
  expectDriverError = false,
): Promise<string[]> {
  const problems: string[] = [];
  const a = path.join(dir, "a.qcow2");
  const b = path.join(dir, "b.qcow2");
  const q = qemuIoOps(a, ops, dir);
  if (q.code !== 0 || /failed|error/i.test(q.stdout + q.stderr))
    problems.push(`qemu-io failed: ${q.stdout}${q.stderr}`);
  const failure = await driverOps(b, ops);
  if (failure !== undefined && !expectDriverError)
    problems.push(`driver failed: ${(failure as Error).message}`);
  const cmp = compareImages(a, b);
  if (cmp !== "") problems.push(`guest bytes differ from qemu-io's twin: ${cmp}`);
  for (const [who, f] of [
    ["qemu-io's", a],
    ["the driver's", b],
  ] as const) {
    const c = qemuCheck(f);
    if (c.code !== 0) problems.push(`qemu-img check of ${who} image: ${c.raw}`);
  }
  return problems;
}

const seeds = (n: number, long: number, base: number): number[] =>
  Array.from({ length: LONG ? long : n }, (_, i) => base + i);

describe.skipIf(!haveQemu)("data_file_raw keeps the data file equal to the guest disk", () => {
  const cases = [
    { cs: 65536, extra: "" },
    { cs: 4096, extra: "" },
    { cs: 65536, extra: ",extended_l2=on" },
  ];
  for (const { cs, extra } of cases) {
    it(`cluster_size=${cs}${extra}: random writes, zero writes and discards`, async () => {
      for (const seed of seeds(3, 40, 1000 + cs)) {
        const dir = freshDir();
        const r = prng(seed);
        const size = (200 + Math.floor(r() * 3000)) * 512 + (r() < 0.5 ? 0 : 512 * 7);
        for (const n of ["a", "b"])
          create(
            dir,
            `${n}.qcow2`,
            `cluster_size=${cs},data_file=${n}.data,data_file_raw=on${extra}`,
            size,
          );
        const ops = randomOps(seed, size, cs, 24);
        const ctx = `seed ${seed} size ${size}: ${describeOps(ops)}`;
        expect(await twinProblems(dir, ops), ctx).toEqual([]);
        const guest = qemuRaw(path.join(dir, "b.qcow2"));
        const mine = new Uint8Array(fs.readFileSync(path.join(dir, "b.data")));
        const theirs = new Uint8Array(fs.readFileSync(path.join(dir, "a.data")));
        expect(firstDiff(mine.subarray(0, guest.length), guest), `data file vs guest, ${ctx}`).toBe(
          -1,
        );
        expect(firstDiff(mine, theirs), `data file vs qemu-io's data file, ${ctx}`).toBe(-1);
      }
    });
  }
});

describe.skipIf(!haveQemu)("discard on a version 2 image with a backing file", () => {
  it("changes nothing, as qemu-io's discard (the backing data never shows through)", async () => {
    for (const seed of seeds(4, 40, 2000)) {
      const dir = freshDir();
      const r = prng(seed);
      const cs = r() < 0.5 ? 65536 : 4096;
      const size = (300 + Math.floor(r() * 2000)) * 512;
      const baseSize = size - 512 * Math.floor(r() * 100) - 333;
      const base = new Uint8Array(baseSize);
      const g = prng(seed ^ 0x5555);
      for (let i = 0; i < baseSize; i++) base[i] = Math.floor(g() * 256) | 1;
      fs.writeFileSync(path.join(dir, "base.raw"), base);
      create(dir, "a.qcow2", `compat=0.10,cluster_size=${cs}`, size, "base.raw");
      create(dir, "b.qcow2", `compat=0.10,cluster_size=${cs}`, size, "base.raw");
      // Data first, so that discards meet allocated clusters.
      const ops: Op[] = [
        { k: "write", off: 0, len: Math.min(size, 5 * cs + 1234), seed },
        ...randomOps(seed, size, cs, 20),
        { k: "discard", off: 0, len: size },
      ];
      expect(await twinProblems(dir, ops), `seed ${seed}: ${describeOps(ops)}`).toEqual([]);
    }
  });
});

describe.skipIf(!haveQemu)("compressed writes where QEMU succeeds", () => {
  const cases = [
    { opts: "refcount_bits=1", cs: 65536 },
    { opts: "refcount_bits=2,cluster_size=4096", cs: 4096 },
    { opts: "refcount_bits=1,cluster_size=512", cs: 512 },
    { opts: "cluster_size=512", cs: 512 },
    { opts: "cluster_size=512,compression_type=zstd", cs: 512 },
  ];
  for (const { opts, cs } of cases) {
    it(`${opts}: same guest bytes, clean checks, similar compression`, async () => {
      let qemuCompressed = 0;
      let ours = 0;
      let qemuFile = 0;
      let ourFile = 0;
      for (const seed of seeds(3, 30, 3000 + cs)) {
        const dir = freshDir();
        const r = prng(seed);
        const size = cs * (16 + Math.floor(r() * 100)) + 512 * Math.floor((r() * cs) / 512) + 512;
        create(dir, "a.qcow2", opts, size);
        create(dir, "b.qcow2", opts, size);
        // The first half written compressed at once (host clusters shared by several
        // compressed clusters), then random traffic, with compressed writes to clusters
        // nothing touched yet.
        const half = Math.floor(size / 2 / cs) * cs;
        const touched = new Set<number>();
        for (let c = 0; c < half / cs; c++) touched.add(c);
        const ops: Op[] = [
          { k: "compressed", off: 0, len: half, seed, text: seed % 2 === 0 },
          ...randomOps(seed, size, cs, 24, { compressed: true, touched }),
        ];
        const ctx = `seed ${seed} size ${size}: ${describeOps(ops)}`;
        const problems = await twinProblems(dir, ops);
        // The model is the oracle of guest bytes: QEMU 7.2 itself loses data in some
        // refcount_bits=2 sequences (a write elsewhere changes a cluster next to compressed
        // data); such seeds are reported, and the driver is still held to the model.
        const model = modelOf(size, cs, ops);
        const mine = firstDiff(qemuRaw(path.join(dir, "b.qcow2")), model);
        expect(mine, `driver's guest bytes vs the model at ${mine}, ${ctx}`).toBe(-1);
        const theirs = firstDiff(qemuRaw(path.join(dir, "a.qcow2")), model);
        if (theirs >= 0) {
          console.log(`QEMU's twin differs from the model at ${theirs} (QEMU bug), ${ctx}`);
          continue;
        }
        expect(problems, ctx).toEqual([]);
        qemuCompressed += compressedBytes(path.join(dir, "a.qcow2"));
        ours += compressedBytes(path.join(dir, "b.qcow2"));
        qemuFile += fs.statSync(path.join(dir, "a.qcow2")).size;
        ourFile += fs.statSync(path.join(dir, "b.qcow2")).size;
      }
      expect(qemuCompressed).toBeGreaterThan(0);
      // The same data compresses about as well (zlib/zstd output sizes differ a little).
      expect(ours).toBeGreaterThanOrEqual(qemuCompressed * 0.8);
      // and packs about as densely (QEMU reuses freed clusters sooner: within 25%).
      expect(ourFile, `file sizes: qemu-io's ${qemuFile}, the driver's ${ourFile}`).toBeLessThan(
        qemuFile * 1.25,
      );
    });
  }
});

describe.skipIf(!haveQemu)("allocation past a partial last cluster", () => {
  it("writes after compressed data that ends the file mid-cluster never overlap it", async () => {
    for (const seed of seeds(4, 40, 4000)) {
      const dir = freshDir();
      const r = prng(seed);
      const cs = r() < 0.5 ? 65536 : 4096;
      const size = 8 * cs + (1 + Math.floor(r() * 2000)) * 512;
      create(dir, "a.qcow2", `cluster_size=${cs}`, size);
      // Compressed writes by QEMU leave the file ending inside a cluster that holds data.
      const setup: Op[] = [
        { k: "write", off: 3 * cs + 17, len: 1000, seed: seed + 1 },
        { k: "compressed", off: 0, len: Math.min(size, 3 * cs), seed },
        { k: "compressed", off: 5 * cs, len: cs, seed: seed + 2, text: true },
      ];
      expect(qemuIoOps(path.join(dir, "a.qcow2"), setup, dir).code).toBe(0);
      expect(fs.statSync(path.join(dir, "a.qcow2")).size % cs).not.toBe(0);
      fs.copyFileSync(path.join(dir, "a.qcow2"), path.join(dir, "b.qcow2"));
      // Normal and compressed writes (to clusters nothing has touched) allocate after it.
      const touched = new Set([0, 1, 2, 3, 5]);
      const ops = randomOps(seed, size, cs, 14, { compressed: true, touched });
      expect(await twinProblems(dir, ops), `seed ${seed}: ${describeOps(ops)}`).toEqual([]);
    }
  });
});

describe.skipIf(!haveQemu)("zero writes that do not cover a whole cluster", () => {
  // (Extended L2 is left out: there qimg allocates every subcluster of a new cluster where
  // QEMU allocates only the written ones, a layout difference of its own.)
  const cases = ["cluster_size=65536", "cluster_size=4096", "cluster_size=512"];
  for (const opts of cases) {
    it(`${opts}: where the rest reads as zeros nothing is allocated, as qemu-io`, async () => {
      for (const seed of seeds(3, 30, 5000)) {
        const dir = freshDir();
        const r = prng(seed);
        const size = (400 + Math.floor(r() * 3000)) * 512;
        create(dir, "a.qcow2", opts, size);
        create(dir, "b.qcow2", opts, size);
        const ops = randomOps(seed, size, 65536, 20).map((o) =>
          o.k === "discard" ? ({ k: "zero", off: o.off, len: o.len, unmap: false } as const) : o,
        );
        const ctx = `seed ${seed} size ${size}: ${describeOps(ops)}`;
        expect(await twinProblems(dir, ops), ctx).toEqual([]);
        // Same layout: the same ranges hold data, zeros or nothing (host offsets aside, so
        // runs that differ only in host contiguity are merged).
        const shape = (f: string): string => {
          const out: [number, number, boolean, boolean, number][] = [];
          for (const e of qemuMap(path.join(dir, f))) {
            const last = out.at(-1);
            if (last && last[2] === e.data && last[3] === e.zero && last[4] === e.depth)
              last[1] += e.length;
            else out.push([e.start, e.length, e.data, e.zero, e.depth]);
          }
          return JSON.stringify(out);
        };
        expect(shape("b.qcow2"), ctx).toBe(shape("a.qcow2"));
      }
    });
  }
});

describe.skipIf(!haveQemu)("compressed writes over clusters that have a host cluster", () => {
  it("fail as qemu-io's do (EIO), and succeed over unallocated or plain zero clusters", async () => {
    const dir = freshDir();
    const cs = 65536;
    const size = 8 * cs + 3584;
    create(dir, "a.qcow2", `cluster_size=${cs}`, size);
    create(dir, "b.qcow2", `cluster_size=${cs}`, size);
    const setup: Op[] = [
      { k: "write", off: 0, len: 2 * cs + 100, seed: 1 }, // clusters 0-2 hold data
      { k: "compressed", off: 3 * cs, len: cs, seed: 2, text: true }, // cluster 3 compressed
      { k: "zero", off: 4 * cs, len: cs, unmap: false }, // plain zero (nothing allocated)
      { k: "write", off: 5 * cs, len: cs, seed: 3 },
      { k: "zero", off: 5 * cs, len: cs, unmap: false }, // zero flag, host cluster kept
    ];
    expect(await twinProblems(dir, setup)).toEqual([]);
    const attempts: [number, boolean][] = [
      [1, false], // over data
      [3, false], // over compressed data
      [5, false], // over a preallocated zero cluster
      [4, true], // over a plain zero cluster
      [6, true], // unallocated
    ];
    for (const [c, ok] of attempts) {
      const op: Op = { k: "compressed", off: c * cs, len: cs, seed: 10 + c, text: true };
      const q = qemuIoOps(path.join(dir, "a.qcow2"), [op], dir);
      expect(
        /write failed: Input\/output error/.test(q.stdout + q.stderr),
        `qemu-io, cluster ${c}`,
      ).toBe(!ok);
      const failure = await driverOps(path.join(dir, "b.qcow2"), [op]);
      expect(failure === undefined, `driver, cluster ${c}: ${String(failure)}`).toBe(ok);
      expect(compareImages(path.join(dir, "a.qcow2"), path.join(dir, "b.qcow2"))).toBe("");
    }
    expect(qemuCheck(path.join(dir, "b.qcow2")).code).toBe(0);
  });
});

describe.skipIf(!haveQemu)("growing an image whose backing file reaches past the old end", () => {
  it("the new area reads as zeros (version 3), or the resize is refused (version 2), as qemu-img resize", async () => {
    for (const seed of seeds(4, 30, 6000)) {
      const dir = freshDir();
      const r = prng(seed);
      const v2 = seed % 2 === 1;
      const cs = r() < 0.5 ? 65536 : 4096;
      const extra = !v2 && r() < 0.3 ? ",extended_l2=on" : "";
      const oldSize = (200 + Math.floor(r() * 2000)) * 512;
      const baseSize = oldSize + 1 + Math.floor(r() * 3_000_000);
      const newSize = oldSize + 512 * (1 + Math.floor(r() * 8000));
      const base = new Uint8Array(baseSize);
      const g = prng(seed ^ 0x777);
      for (let i = 0; i < baseSize; i++) base[i] = 1 + Math.floor(g() * 255);
      fs.writeFileSync(path.join(dir, "base.raw"), base);
      const opts = `${v2 ? "compat=0.10," : ""}cluster_size=${Math.max(cs, extra ? 16384 : 0)}${extra}`;
      create(dir, "a.qcow2", opts, oldSize, "base.raw");
      create(dir, "b.qcow2", opts, oldSize, "base.raw");
      const ops = randomOps(seed, oldSize, cs, 8);
      expect(await twinProblems(dir, ops), `seed ${seed}`).toEqual([]);
      const before = fs.readFileSync(path.join(dir, "b.qcow2"));
      const q = qemuImg(["resize", "a.qcow2", String(newSize)], dir);
      const image = await openRw(path.join(dir, "b.qcow2"));
      const failure = await image.resize(newSize).then(
        () => undefined,
        (e: unknown) => e,
      );
      await image.close();
      const ctx = `seed ${seed} ${opts} ${oldSize} -> ${newSize} (backing ${baseSize}): qemu-img ${q.code} ${q.stderr}`;
      expect(failure === undefined, `${ctx}; driver: ${String(failure)}`).toBe(q.code === 0);
      if (q.code !== 0) {
        expect(fs.readFileSync(path.join(dir, "b.qcow2")).equals(before), ctx).toBe(true);
        continue;
      }
      expect(compareImages(path.join(dir, "a.qcow2"), path.join(dir, "b.qcow2")), ctx).toBe("");
      expect(qemuCheck(path.join(dir, "b.qcow2")).code, ctx).toBe(0);
    }
  });
});

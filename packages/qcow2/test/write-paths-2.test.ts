/**
 * More write paths against real qemu-io on twin images (differential findings F8, F10, F11):
 * zeroing or discarding over compressed clusters, subclusters and the partial last cluster,
 * and zeroing on version 2 images. The same operations run through qemu-io on one image and
 * through the driver on its copy; guest bytes (`qemu-img compare`), `qemu-img check` and what
 * is allocated where (`qemu-img map`: data / zero / has a host cluster) must agree. A trailing
 * compressed write shows whether a cluster was freed (QEMU only fills unallocated clusters).
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { requireQemu } from "@qimg/fixtures";
import {
  compareImages,
  describeOps,
  driverOps,
  openRw,
  qemuCheck,
  qemuImg,
  qemuIoOps,
  qemuMap,
  scratchDirs,
} from "./twins.js";
import type { Op } from "./twins.js";
import { prng } from "./prng.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("skipping write-path twin tests (2): qemu-img/qemu-io are not on PATH");
const LONG = process.env.QIMG_LONG === "1";
const freshDir = scratchDirs("qimg-twins2-");

/** Creates twins a.qcow2 (for qemu-io) and b.qcow2 (for the driver). */
function createTwins(dir: string, opts: string, size: number, backing?: string): void {
  for (const name of ["a.qcow2", "b.qcow2"]) {
    const args = ["create", "-q", "-f", "qcow2", "-o", opts, name, String(size)];
    if (backing !== undefined) args.push("-b", backing, "-F", "raw");
    const r = qemuImg(args, dir);
    if (r.code !== 0) throw new Error(`qemu-img create ${opts}: ${r.stderr}`);
  }
}

/**
 * Allocation per cluster from `qemu-img map`: "H" has a host cluster, "C" compressed (data
 * without a host offset), "B" from the backing file, "." nothing. Subcluster details and
 * holes in the host file are not compared (QEMU leaves the unwritten subclusters of a
 * newly written cluster unallocated; the driver writes them: same guest bytes).
 */
function shape(file: string, cs: number): string {
  const runs: string[] = [];
  for (const e of qemuMap(file)) {
    const k = e.depth > 0 && e.data ? "B" : e.offset !== undefined ? "H" : e.data ? "C" : ".";
    for (let g = Math.floor(e.start / cs); g * cs < e.start + e.length; g++) {
      const cur = runs[g];
      if (cur === undefined || cur === "." || (cur === "B" && k !== ".")) runs[g] = k;
    }
  }
  return runs.join("");
}

function clusterSizeOf(file: string): number {
  const r = qemuImg(["info", "--output=json", file], path.dirname(file));
  return Number((JSON.parse(r.stdout) as { "cluster-size": number })["cluster-size"]);
}

/** Run `ops` on the twins; returns what differs (empty when they agree). */
async function twinProblems(dir: string, ops: readonly Op[]): Promise<string[]> {
  const problems: string[] = [];
  const a = path.join(dir, "a.qcow2");
  const b = path.join(dir, "b.qcow2");
  const q = qemuIoOps(a, ops, dir);
  const qemuFailed = q.code !== 0 || /failed|error/i.test(q.stdout + q.stderr);
  const failure = await driverOps(b, ops);
  if (qemuFailed !== (failure !== undefined))
    problems.push(
      `qemu-io ${qemuFailed ? `failed: ${q.stdout}${q.stderr}` : "succeeded"}, driver ${
        failure !== undefined ? `failed: ${(failure as Error).message}` : "succeeded"
      }`,
    );
  const cmp = compareImages(a, b);
  if (cmp !== "") problems.push(`guest bytes differ from qemu-io's twin: ${cmp}`);
  for (const [who, f] of [
    ["qemu-io's", a],
    ["the driver's", b],
  ] as const) {
    const c = qemuCheck(f);
    if (c.code !== 0) problems.push(`qemu-img check of ${who} image: ${c.raw}`);
  }
  const cs = clusterSizeOf(a);
  const sa = shape(a, cs);
  const sb = shape(b, cs);
  if (sa !== sb) problems.push(`allocation differs:\n  qemu:   ${sa}\n  driver: ${sb}`);
  return problems;
}

const KiB = 1024;

describe.skipIf(!haveQemu)("zeroing over compressed clusters (F11)", () => {
  // Each case: compressed data in the first clusters, then a zero write or discard over part
  // of them; qemu-io's twin decides what the guest reads and what stays allocated.
  const cases: { name: string; opts: string; size: number; ops: Op[] }[] = [];
  for (const ext of ["on", "off"]) {
    const opts = `extended_l2=${ext}`;
    const c = (k: Op["k"], off: number, len: number, extra: object = {}): Op =>
      ({ k, off, len, seed: off + len, unmap: false, ...extra }) as Op;
    for (const unmap of [false, true]) {
      const z = (off: number, len: number): Op => ({ k: "zero", off, len, unmap });
      const wc = c("compressed", 0, 128 * KiB);
      cases.push(
        {
          name: `${opts} one subcluster u=${unmap}`,
          opts,
          size: 1 << 20,
          ops: [wc, z(0, 4 * KiB)],
        },
        {
          name: `${opts} subclusters mid u=${unmap}`,
          opts,
          size: 1 << 20,
          ops: [wc, z(8 * KiB, 12 * KiB)],
        },
        {
          name: `${opts} unaligned inside u=${unmap}`,
          opts,
          size: 1 << 20,
          ops: [wc, z(5000, 7001)],
        },
        {
          name: `${opts} across two clusters u=${unmap}`,
          opts,
          size: 1 << 20,
          ops: [wc, z(60 * KiB, 12 * KiB)],
        },
        {
          name: `${opts} whole cluster then partial u=${unmap}`,
          opts,
          size: 1 << 20,
          ops: [wc, z(0, 70 * KiB)],
        },
        {
          name: `${opts} 2M cluster, disk shorter than a cluster u=${unmap}`,
          opts: `cluster_size=2097152,${opts}`,
          size: 1996425,
          ops: [c("compressed", 0, 1996800), z(0, 1996800)],
        },
        {
          name: `${opts} 2M cluster, partial zero of the short cluster u=${unmap}`,
          opts: `cluster_size=2097152,${opts}`,
          size: 1996425,
          ops: [c("compressed", 0, 1996800), z(65536, 1996800 - 65536)],
        },
        {
          name: `${opts} last short cluster u=${unmap}`,
          opts,
          size: 200_000,
          ops: [c("compressed", 131072, 200192 - 131072), z(131072, 200192 - 131072)],
        },
        {
          name: `${opts} normal data, subclusters zeroed u=${unmap}`,
          opts,
          size: 1 << 20,
          ops: [c("write", 0, 100_000), z(4 * KiB, 40 * KiB), z(70_001, 3000)],
        },
      );
    }
    cases.push(
      {
        name: `${opts} discard part of a compressed cluster`,
        opts,
        size: 1 << 20,
        ops: [c("compressed", 0, 128 * KiB), { k: "discard", off: 4 * KiB, len: 100 * KiB }],
      },
      {
        name: `${opts} discard the short last compressed cluster`,
        opts,
        size: 200_000,
        ops: [
          c("compressed", 131072, 200192 - 131072),
          { k: "discard", off: 131072, len: 200192 - 131072 },
        ],
      },
    );
  }
  for (const t of cases) {
    it(t.name, async () => {
      const dir = freshDir();
      createTwins(dir, t.opts, t.size);
      const problems = await twinProblems(dir, t.ops);
      expect(problems, `${t.opts} size ${t.size}: ${describeOps(t.ops)}`).toEqual([]);
    });
  }
});

describe.skipIf(!haveQemu)(
  "zeroing and discarding free whole clusters as QEMU does (F8, F10)",
  () => {
    it("extended_l2 + preallocation=metadata: discard to the end of a disk shorter than a cluster", async () => {
      const dir = freshDir();
      createTwins(dir, "cluster_size=524288,extended_l2=on,preallocation=metadata", 282486);
      const ops: Op[] = [
        { k: "discard", off: 0, len: 282624 },
        { k: "compressed", off: 0, len: 282624, seed: 83 },
      ];
      expect(await twinProblems(dir, ops)).toEqual([]);
    });

    for (const unmap of [false, true]) {
      it(`compat=0.10 without backing: write-zeroes (u=${unmap}) frees allocated clusters`, async () => {
        const dir = freshDir();
        createTwins(dir, "compat=0.10,cluster_size=512,preallocation=metadata", 141312);
        const ops: Op[] = [
          { k: "zero", off: 88576, len: 23070, unmap },
          { k: "compressed", off: 99328, len: 512, seed: 212 },
        ];
        expect(await twinProblems(dir, ops)).toEqual([]);
      });
    }

    it("compat=0.10 without backing: partial zero writes over unallocated clusters allocate nothing", async () => {
      const dir = freshDir();
      createTwins(dir, "compat=0.10", 1_000_000);
      const ops: Op[] = [
        { k: "write", off: 200_000, len: 70_000, seed: 9 },
        { k: "zero", off: 1000, len: 3001, unmap: false },
        { k: "zero", off: 190_000, len: 100_003, unmap: false },
        { k: "compressed", off: 0, len: 65536, seed: 5 },
        { k: "compressed", off: 196608, len: 65536, seed: 6 },
      ];
      expect(await twinProblems(dir, ops)).toEqual([]);
    });

    it("random zero/discard/compressed sequences on v2, v3 and extended L2 twins (seeded)", async () => {
      const variants = [
        "compat=0.10",
        "compat=0.10,preallocation=metadata",
        "compat=1.1",
        "extended_l2=on",
        "extended_l2=on,cluster_size=131072",
        "cluster_size=4096",
        "compat=0.10+backing",
        "compat=1.1+backing",
        "extended_l2=on+backing",
      ];
      const n = LONG ? 180 : 18;
      for (let s = 0; s < n; s++) {
        const seed = 7100 + s;
        const r = prng(seed);
        const variant = variants[s % variants.length]!;
        const withBacking = variant.endsWith("+backing");
        const opts = variant.replace("+backing", "");
        const cs = /cluster_size=(\d+)/.exec(opts)
          ? Number(/cluster_size=(\d+)/.exec(opts)![1])
          : 65536;
        const size = (3 + Math.floor(r() * 6)) * cs + 512 * (1 + Math.floor(r() * (cs / 512 - 1)));
        const disk = Math.ceil(size / 512) * 512;
        const ops: Op[] = [];
        const nClusters = Math.ceil(disk / cs);
        for (let k = 0; k < 6; k++) {
          const kind = r();
          const off = Math.floor(r() * disk);
          const len = Math.max(1, Math.min(disk - off, Math.floor(r() * 2.5 * cs)));
          // (A version 2 discard over a backing file does nothing: no compressed writes.)
          if (kind < 0.3 && !(withBacking && opts.includes("0.10"))) {
            const g = Math.floor(r() * nClusters);
            // QEMU refuses compressed data over an allocated cluster: zero/discard first.
            const clen = Math.min(cs, disk - g * cs);
            ops.push({ k: "discard", off: g * cs, len: clen });
            ops.push({ k: "compressed", off: g * cs, len: clen, seed: seed * 10 + k });
          } else if (kind < 0.45) ops.push({ k: "write", off, len, seed: seed * 10 + k });
          else if (kind < 0.85) ops.push({ k: "zero", off, len, unmap: r() < 0.5 });
          else ops.push({ k: "discard", off, len });
        }
        const dir = freshDir();
        if (withBacking) {
          // Random data, then a hole (reads as zeros), ending before or after the disk's end.
          const baseLen = Math.floor(disk * (0.5 + r()));
          const data = new Uint8Array(Math.floor(baseLen / 2));
          for (let i = 0; i < data.length; i++) data[i] = 1 + Math.floor(r() * 255);
          fs.writeFileSync(path.join(dir, "base.raw"), data);
          fs.truncateSync(path.join(dir, "base.raw"), baseLen);
        }
        createTwins(dir, opts, size, withBacking ? "base.raw" : undefined);
        const problems = await twinProblems(dir, ops);
        if (problems.some((p) => p.startsWith("qemu-img check of qemu-io's image"))) {
          // QEMU 7.2 packs compressed data into a host cluster that became a data cluster
          // and corrupts its own twin (a known QEMU bug): no oracle for this sequence.
          console.log(`seed ${seed}: QEMU's own twin is corrupt, not compared`);
          continue;
        }
        expect(problems, `seed ${seed} ${variant} size ${size}: ${describeOps(ops)}`).toEqual([]);
      }
    }, 120_000);
  },
);

describe.skipIf(!haveQemu)("growing over a longer backing file (F3b)", () => {
  // A grid of old sizes, new sizes and backing sizes (none multiples of the cluster size):
  // qemu-img resize decides whether the grow is refused (version 2 can only write zero bytes
  // inside the old last cluster) and what the grown twin reads and stores.
  const grid: { opts: string; base: number; old: number; grow: number }[] = [];
  const r = prng(3303);
  for (const opts of [
    "compat=0.10,cluster_size=1048576",
    "compat=0.10,cluster_size=65536",
    "compat=0.10,cluster_size=4096",
    "compat=1.1,cluster_size=65536",
    "extended_l2=on,cluster_size=65536",
  ]) {
    const cs = Number(/cluster_size=(\d+)/.exec(opts)![1]);
    for (let k = 0; k < (LONG ? 12 : 4); k++) {
      const old = 512 * (1 + Math.floor(r() * ((3 * cs) / 512)));
      const base = [old - 512 * Math.floor(r() * 4), old + 1 + Math.floor(r() * 3 * cs)][k % 2]!;
      const grow = 512 * (1 + Math.floor(r() * ((k % 3 === 0 ? cs / 2 : 3 * cs) / 512)));
      grid.push({ opts, base: Math.max(1, base), old, grow });
    }
  }
  grid.push({ opts: "compat=0.10,cluster_size=1048576", base: 3073536, old: 346942, grow: 117248 });
  grid.push({ opts: "compat=0.10,cluster_size=65536", base: 3073536, old: 346942, grow: 10240 });
  grid.push({ opts: "compat=0.10,cluster_size=65536", base: 3073536, old: 327680, grow: 512 });

  for (const t of grid) {
    it(`${t.opts}: ${t.old} + ${t.grow} over a ${t.base}-byte backing file`, async () => {
      const dir = freshDir();
      const base = path.join(dir, "base.raw");
      const bytes = new Uint8Array(t.base);
      const rr = prng(t.base);
      for (let i = 0; i < bytes.length; i++) bytes[i] = 1 + Math.floor(rr() * 255);
      fs.writeFileSync(base, bytes);
      createTwins(dir, t.opts, t.old, "base.raw");
      // Some data in the old last cluster, so copy-on-write of it is exercised.
      const wOff = Math.max(0, t.old - 1000);
      const ops: Op[] = [{ k: "write", off: wOff, len: Math.min(777, t.old - wOff), seed: 1 }];
      const a = path.join(dir, "a.qcow2");
      const b = path.join(dir, "b.qcow2");
      expect(qemuIoOps(a, ops, dir).code).toBe(0);
      expect(await driverOps(b, ops)).toBeUndefined();
      const oldSize = Number(
        (
          JSON.parse(qemuImg(["info", "--output=json", a], dir).stdout) as {
            "virtual-size": number;
          }
        )["virtual-size"],
      );
      const newSize = oldSize + t.grow;
      const q = qemuImg(["resize", "-q", a, String(newSize)], dir);
      let failure: unknown;
      const image = await openRw(b);
      try {
        await image.resize(newSize);
      } catch (e) {
        failure = e;
      } finally {
        await image.close();
      }
      const what = `${t.opts} base ${t.base} old ${oldSize} new ${newSize}`;
      expect(failure === undefined ? 0 : 1, `${what}: qemu-img resize said ${q.stderr}`).toBe(
        q.code,
      );
      expect(compareImages(a, b), what).toBe("");
      for (const f of [a, b]) expect(qemuCheck(f).code, `${what}: check ${f}`).toBe(0);
      const cs = clusterSizeOf(a);
      expect(shape(b, cs), what).toBe(shape(a, cs));
    });
  }
});

describe.skipIf(!haveQemu)("zero writes over clusters shared with a snapshot", () => {
  for (const opts of ["compat=1.1", "extended_l2=on", "compat=1.1,lazy_refcounts=on"]) {
    it(`${opts}: zero-alloc keeps the shared cluster as QEMU does`, async () => {
      const dir = freshDir();
      createTwins(dir, opts, 1_000_000);
      const setup: Op[] = [{ k: "write", off: 0, len: 300_001, seed: 5 }];
      for (const f of ["a.qcow2", "b.qcow2"]) {
        expect(qemuIoOps(path.join(dir, f), setup, dir).code).toBe(0);
        expect(qemuImg(["snapshot", "-c", "snap", f], dir).code).toBe(0);
      }
      const ops: Op[] = [
        { k: "zero", off: 0, len: 65536, unmap: false },
        { k: "zero", off: 70_000, len: 10_000, unmap: false },
        { k: "zero", off: 131072, len: 65536, unmap: true },
        { k: "zero", off: 196608, len: 70_000, unmap: false },
        { k: "zero", off: 262144, len: 65536, unmap: false },
        { k: "write", off: 263144, len: 1000, seed: 7 },
        { k: "write", off: 200_000, len: 3000, seed: 8 },
      ];
      expect(await twinProblems(dir, ops)).toEqual([]);
      // The snapshot still reads its old data, and deleting it leaves both images clean.
      for (const f of ["a.qcow2", "b.qcow2"]) {
        expect(qemuImg(["snapshot", "-d", "snap", f], dir).code).toBe(0);
        expect(qemuCheck(path.join(dir, f)).code, f).toBe(0);
      }
      const cs = clusterSizeOf(path.join(dir, "a.qcow2"));
      expect(shape(path.join(dir, "b.qcow2"), cs)).toBe(shape(path.join(dir, "a.qcow2"), cs));
    });
  }
});

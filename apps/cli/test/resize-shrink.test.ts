/**
 * `qimg resize --shrink` (and regrow, and `--preallocation`) against `qemu-img resize` on twin
 * qcow2 images: random create options, random prior writes through qemu-io (data, zeros,
 * discards, compressed clusters), sometimes a backing file or an internal snapshot, random
 * sizes that are not multiples of the cluster. Both must leave the same guest bytes
 * (`qemu-img compare`, also of the snapshot after `snapshot -a`), the same virtual size, a clean
 * `qemu-img check`, and qimg's file may be at most two clusters longer than qemu-img's (in
 * whole clusters; with a persistent bitmap, than the longer of qemu-img's and its own before
 * the resize: qimg keeps the bitmap directory in place; QEMU
 * truncates after the last cluster in use, as qimg does; qimg never allocates the empty L2
 * tables QEMU's discard leaves behind, so it is usually shorter). Refusals print qemu-img's
 * words with the same exit code and leave the file byte-identical.
 */
import { copyFileSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { scratchDirs } from "../../../packages/qcow2/test/twins.js";
import { qimg } from "./helpers.js";
import { hasQemu, ok, prng, qemuImg, qemuInfo, qemuIo, withQimgName } from "./qemu.js";

const LONG = process.env.QIMG_LONG === "1";
const newDir = scratchDirs("qimg-shrink-");
if (!hasQemu) console.log("skipping resize --shrink interop: qemu-img is not on PATH");

const asQimg = withQimgName;

interface Case {
  seed: number;
  dir: string;
  a: string;
  b: string;
  cs: number;
  size: number;
  snapshot: boolean;
  bitmap: boolean;
  log: string[];
}

function setUp(seed: number): Case {
  const r = prng(seed);
  const dir = newDir();
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
  const v2 = r() < 0.25;
  const cs = pick(v2 ? [512, 4096, 65536] : [512, 1024, 4096, 16384, 65536]);
  const ext = !v2 && cs >= 16384 && r() < 0.5;
  const rb = v2 ? 16 : pick([1, 2, 4, 8, 16, 32, 64]);
  const size = Math.max(cs, 512 * (1 + Math.floor(r() * 12000)) + (r() < 0.5 ? 0 : cs * 3));
  const opts = [
    `cluster_size=${cs}`,
    `compat=${v2 ? "0.10" : "1.1"}`,
    `refcount_bits=${rb}`,
    ...(ext ? ["extended_l2=on"] : []),
    ...(!v2 && r() < 0.3 ? ["lazy_refcounts=on"] : []),
  ];
  const log = [`seed ${seed}: -o ${opts.join(",")} size ${size}`];
  const a = join(dir, "a.qcow2");
  const args = ["create", "-q", "-f", "qcow2", "-o", opts.join(",")];
  if (r() < 0.3) {
    const back = join(dir, "back.raw");
    ok(qemuImg(["create", "-q", "-f", "raw", back, String(size + 3 * cs)]), "create backing");
    ok(qemuIo(["-f", "raw", "-c", `write -P 0x5a 0 ${size + 3 * cs}`, back]), "fill backing");
    args.push("-b", back, "-F", "raw");
    log.push("backing file");
  }
  ok(qemuImg([...args, a, String(size)]), "create");
  const ops: string[] = [];
  // Compressed clusters first, each into an unallocated cluster (qemu-io refuses to write a
  // compressed cluster over an allocated one; not on 512-byte clusters, where qemu-io 7.2
  // itself sometimes fails).
  const compressed = new Set<number>();
  for (let i = cs === 512 ? 3 : 0; i < 3; i++) {
    const c = Math.floor((r() * size) / cs);
    if ((c + 1) * cs > size || compressed.has(c)) continue;
    compressed.add(c);
    ops.push(`write -c -P ${1 + Math.floor(r() * 250)} ${c * cs} ${cs}`);
  }
  const n = 2 + Math.floor(r() * 10);
  for (let i = 0; i < n; i++) {
    const x = r();
    const off = Math.floor((r() * size) / 512) * 512;
    const len = Math.min(size - off, 512 * (1 + Math.floor(r() * 4 * (cs / 512 + 8))));
    if (len <= 0) continue;
    if (x < 0.65) ops.push(`write -P ${1 + Math.floor(r() * 250)} ${off} ${len}`);
    else if (x < 0.85) ops.push(`write -z ${off} ${len}`);
    else ops.push(`discard ${off} ${len}`);
  }
  const io = (cmds: string[]): void => {
    if (cmds.length === 0) return;
    ok(qemuIo(["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), a]), `qemu-io ${cmds.join("; ")}`);
  };
  io(ops);
  log.push(...ops);
  const bitmap = !v2 && r() < 0.25;
  if (bitmap) {
    ok(qemuImg(["bitmap", "--add", "-g", String(512 << Math.floor(r() * 8)), a, "b0"]), "bitmap");
    io([`write -P 0x31 0 ${Math.min(size, 3 * cs)}`]);
    log.push("bitmap b0");
  }
  const snapshot = !v2 && rb >= 4 && r() < 0.3;
  if (snapshot) {
    ok(qemuImg(["snapshot", "-c", "s1", a]), "snapshot");
    const more = [`write -P 0x77 ${Math.floor((r() * size) / 1024) * 512} ${cs}`];
    io(more.filter(() => true));
    log.push("snapshot s1", ...more);
  }
  const b = join(dir, "b.qcow2");
  copyFileSync(a, b);
  return { seed, dir, a, b, cs, size, snapshot, bitmap, log };
}

async function resizeBoth(c: Case, size: string, extra: string[] = []): Promise<void> {
  c.log.push(`resize ${extra.join(" ")} ${size}`);
  const q = qemuImg(["resize", ...extra, c.a, size]);
  const m = await qimg(["resize", ...extra, c.b, size]);
  expect({ code: m.code, out: m.stdout, err: m.stderr }, c.log.join("\n")).toEqual({
    code: q.code,
    out: q.stdout,
    err: asQimg(q.stderr),
  });
}

function sameImages(c: Case, before = 0): void {
  const why = c.log.join("\n");
  const cmp = qemuImg(["compare", c.a, c.b]);
  expect(cmp.stdout + cmp.stderr, why).toBe("Images are identical.\n");
  const ia = qemuInfo(c.a);
  const ib = qemuInfo(c.b);
  expect(ib["virtual-size"], why).toBe(ia["virtual-size"]);
  const chk = qemuImg(["check", "--output=json", c.b]);
  expect(chk.code, `${why}\n${chk.stdout}${chk.stderr}`).toBe(0);
  const verdict = JSON.parse(chk.stdout) as Record<string, unknown>;
  expect(verdict["leaks"] ?? 0, why).toBe(0);
  // (Rounded up to whole clusters: a bitmap directory stored at close may end the file
  // mid-cluster.) With a persistent bitmap qimg rewrites the bitmap directory in place at
  // close while QEMU moves it into fresh clusters, so a directory near the end of the file
  // keeps qimg's file longer: then the bound is the file's length before this resize.
  const clusters = (n: number): number => Math.ceil(n / c.cs);
  const limit = Math.max(clusters(statSync(c.a).size), c.bitmap ? clusters(before) : 0);
  expect(clusters(statSync(c.b).size), why).toBeLessThanOrEqual(limit + 2);
}

async function shrinkCase(seed: number): Promise<void> {
  const c = setUp(seed);
  const r = prng(seed ^ 0x5eed);
  const smaller = (from: number): number =>
    Math.max(512, Math.floor((r() * from) / 512) * 512 + (r() < 0.3 ? 0 : 0));
  let cur = c.size;
  for (let round = 0; round < 3; round++) {
    const down = smaller(cur);
    if (down < cur) {
      const before = statSync(c.b).size;
      await resizeBoth(c, String(down), ["--shrink"]);
      cur = down;
      sameImages(c, before);
    }
    const up = cur + 512 * (1 + Math.floor(r() * 4 * (c.cs / 512 + 64)));
    const before = statSync(c.b).size;
    await resizeBoth(c, String(up));
    cur = up;
    sameImages(c, before);
  }
  // (qemu-img will not apply a snapshot while the image has persistent bitmaps.)
  if (c.snapshot && !c.bitmap) {
    ok(qemuImg(["snapshot", "-a", "s1", c.a]), "snapshot -a");
    ok(qemuImg(["snapshot", "-a", "s1", c.b]), "snapshot -a (qimg's image)");
    sameImages(c);
  }
}

const SEEDS = LONG
  ? Array.from({ length: 200 }, (_, i) => 1000 + i)
  : [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

describe.skipIf(!hasQemu)("qimg resize --shrink against qemu-img", () => {
  it.each(SEEDS)("seed %i: same guest bytes, size, clean check, file no longer", async (seed) => {
    await shrinkCase(seed);
  });

  it("refuses as qemu-img, leaving the file byte-identical", async () => {
    const dir = newDir();
    const a = join(dir, "a.qcow2");
    ok(qemuImg(["create", "-q", "-f", "qcow2", a, "3M"]), "create");
    ok(qemuIo(["-c", "write -P 1 0 3M", a]), "write");
    const v2 = join(dir, "v2.qcow2");
    ok(qemuImg(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "3M"]), "create v2");
    ok(qemuImg(["snapshot", "-c", "s", v2]), "snapshot v2");
    const qed = join(dir, "a.qed");
    ok(qemuImg(["create", "-q", "-f", "qed", qed, "3M"]), "create qed");
    const cases: [string, string[]][] = [
      [a, ["1M"]],
      [a, ["-1M"]],
      [a, ["--shrink", "1000001"]],
      [a, ["--shrink", "0"]],
      [a, ["--shrink", "--preallocation=full", "1M"]],
      [a, ["--preallocation=metadata", "3M"]],
      [a, ["--preallocation=bogus", "4M"]],
      [a, ["4000001"]],
      [v2, ["--shrink", "1M"]],
      [v2, ["4M"]],
      [qed, ["--shrink", "1M"]],
      [qed, ["--preallocation=full", "4M"]],
    ];
    for (const [file, args] of cases) {
      const before = readFileSync(file);
      const q = qemuImg(["resize", ...args.slice(0, -1), file, args[args.length - 1]!]);
      const copy = join(dir, "copy");
      copyFileSync(file, copy);
      const m = await qimg(["resize", ...args.slice(0, -1), copy, args[args.length - 1]!]);
      expect(q.code, `qemu-img resize ${args.join(" ")}: ${q.stderr}`).not.toBe(0);
      expect({ code: m.code, out: m.stdout, err: m.stderr }, args.join(" ")).toEqual({
        code: q.code,
        out: q.stdout,
        err: asQimg(q.stderr),
      });
      expect(readFileSync(copy).equals(before), args.join(" ")).toBe(true);
    }
  });

  it.each(["off", "on"])(
    "external data file (data_file_raw=%s): cut and regrown with the image, as qemu-img does",
    async (raw) => {
      const dir = newDir();
      const mk = (name: string): string => {
        const f = join(dir, `${name}.qcow2`);
        const o = `data_file=${join(dir, `${name}.data`)},data_file_raw=${raw},cluster_size=4096`;
        ok(qemuImg(["create", "-q", "-f", "qcow2", "-o", o, f, "3000064"]), "create");
        ok(qemuIo(["-f", "qcow2", "-c", "write -P 3 0 3000064", f]), "write");
        return f;
      };
      const c: Case = {
        seed: 0,
        dir,
        a: mk("a"),
        b: mk("b"),
        cs: 4096,
        size: 3000064,
        snapshot: false,
        bitmap: false,
        log: [`data_file_raw=${raw}`],
      };
      await resizeBoth(c, "1000448", ["--shrink"]);
      sameImages(c);
      expect(statSync(join(dir, "b.data")).size).toBe(statSync(join(dir, "a.data")).size);
      await resizeBoth(c, "2500096");
      sameImages(c);
      expect(statSync(join(dir, "b.data")).size).toBe(statSync(join(dir, "a.data")).size);
    },
  );

  it.each(["metadata", "falloc", "full"])(
    "--preallocation=%s on grow: same guest bytes and size, clean check",
    async (mode) => {
      for (const seed of [21, 22, 23]) {
        const c = setUp(seed);
        await resizeBoth(c, String(c.size + 3 * c.cs + 512 * seed), [`--preallocation=${mode}`]);
        sameImages(c);
        const map = JSON.parse(qemuImg(["map", "--output=json", c.b]).stdout) as {
          start: number;
          length: number;
          present: boolean;
        }[];
        const tail = map.filter((e) => e.start >= Math.ceil(c.size / c.cs) * c.cs);
        expect(
          tail.every((e) => e.present),
          c.log.join("\n"),
        ).toBe(true);
      }
    },
  );
});

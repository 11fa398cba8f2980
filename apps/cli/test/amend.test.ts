/**
 * `qimg amend` against real qemu-img 7.2: the same command lines on twin images give the same
 * exit code, output and first error line, the same guest bytes (`qemu-img compare`) and
 * `qemu-img info` facts, and a clean `qemu-img check`; refusals leave our file byte-identical.
 * Twins come from seeded random create options (cluster sizes, refcount widths, lazy refcounts,
 * backing files, sizes that are not multiples of the cluster) and random prior writes (data,
 * zero clusters, compressed clusters, discards, snapshots).
 */
import { copyFileSync, mkdtempSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { hasQemu, prng, qemuImg, qemuIo, qemuInfo } from "./qemu.js";
import { qimg } from "./helpers.js";

if (!hasQemu) console.log("skipping amend interop: qemu-img is not on PATH");
const LONG = process.env.QIMG_LONG === "1";
const tmp = mkdtempSync(join(tmpdir(), "qimg-amend-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
let dirs = 0;
function freshDir(): string {
  const d = join(tmp, `t${dirs++}`);
  mkdirSync(d);
  return d;
}

/** The first line of stderr without the program's prefix. */
function firstError(stderr: string): string {
  const line = stderr.split("\n").find((l) => !l.startsWith("WARNING") && !l.startsWith(" ")) ?? "";
  return line.replace(/^(qemu-img|qimg): /, "");
}

/** The facts amend changes, as qemu-img info shows them. */
function facts(file: string, cwd: string): Record<string, unknown> {
  const j = qemuInfo(file, "qcow2", cwd);
  const spec = (j["format-specific"] as { data: Record<string, unknown> } | undefined)?.data ?? {};
  return {
    "virtual-size": j["virtual-size"],
    "backing-filename": j["backing-filename"],
    "backing-filename-format": j["backing-filename-format"],
    compat: spec["compat"],
    "refcount-bits": spec["refcount-bits"],
    "lazy-refcounts": spec["lazy-refcounts"],
    "compression-type": spec["compression-type"],
    "data-file": spec["data-file"],
    "data-file-raw": spec["data-file-raw"],
    snapshots: ((j["snapshots"] as { name: string }[] | undefined) ?? []).map((s) => s.name),
  };
}

function expectClean(file: string, cwd: string, what: string): void {
  const r = qemuImg(["check", "--output=json", file], cwd);
  expect(r.code, `${what}: ${r.stdout}${r.stderr}`).toBe(0);
  const j = JSON.parse(r.stdout) as Record<string, unknown>;
  expect(j["leaks"] ?? 0, what).toBe(0);
}

/** Run `amend ARGS` with qemu-img on q.qcow2 and with qimg on d.qcow2 (twins); compare. */
async function twin(dir: string, args: readonly string[], what: string): Promise<number> {
  const before = readFileSync(join(dir, "d.qcow2"));
  const q = qemuImg(["amend", ...args, "q.qcow2"], dir);
  const d = await qimg(["amend", ...args, "d.qcow2"], dir);
  expect(d.code, `${what}\nqemu: ${q.stderr}\nqimg: ${d.stderr}`).toBe(q.code);
  expect(d.stdout, what).toBe(q.stdout);
  expect(firstError(d.stderr), what).toBe(firstError(q.stderr));
  if (q.code !== 0) {
    expect(readFileSync(join(dir, "d.qcow2")).equals(before), `${what}: refused but changed`).toBe(
      true,
    );
    return q.code;
  }
  const cmp = qemuImg(["compare", "q.qcow2", "d.qcow2"], dir);
  expect(cmp.code, `${what}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
  expect(facts("d.qcow2", dir), what).toEqual(facts("q.qcow2", dir));
  expectClean("d.qcow2", dir, what);
  return 0;
}

describe.skipIf(!hasQemu)("qimg amend: syntax, help and refusals as qemu-img", () => {
  const cases: string[][] = [
    ["-f", "qcow2", "-o", "help"],
    ["-o", "help", "x.qcow2"],
    ["-o", "?", "x.qcow2"],
    ["-f", "qcow2", "-o", "compat=1.1,help", "x.qcow2"],
    ["-o", "help"],
    ["-f", "qcow2"],
    ["x.qcow2"],
    ["-o", "compat=1.1"],
    ["-o", "compat=1.1", "x.qcow2", "y"],
    ["-f", "raw", "-o", "help", "x.qcow2"],
    ["-f", "qed", "-o", "help"],
    ["-f", "vmdk", "-o", "help"],
    ["-f", "foo", "-o", "help"],
    ["-o", "help", "z.raw"],
    ["-o", "compat=0.10", "z.raw"],
    ["-f", "raw", "-o", "size=2M", "z.raw"],
    ["-o", "help,compat=0.10", "y.qed"],
    ["-f", "qed", "-o", "size=2M", "y.qed"],
    ["-o", ",,", "x.qcow2"],
    ["-o", ",compat=1.1", "x.qcow2"],
    ["-o", "lazy_refcounts=maybe", "x.qcow2"],
    ["-o", "size=1x", "x.qcow2"],
    ["-o", "size=100000", "x.qcow2"],
    ["-o", "compat", "x.qcow2"],
    ["-o", "compat=0.42", "x.qcow2"],
    ["-o", "foo=bar", "x.qcow2"],
    ["-o", "cluster_size=4k", "x.qcow2"],
    ["-o", "extended_l2=on", "x.qcow2"],
    ["-o", "preallocation=full", "x.qcow2"],
    ["-o", "compression_type=zstd", "x.qcow2"],
    ["-o", "encryption=on", "x.qcow2"],
    ["-o", "encrypt.format=luks", "x.qcow2"],
    ["-o", "encrypt.keyslot=1", "x.qcow2"],
    ["-o", "refcount_bits=3", "x.qcow2"],
    ["-o", "refcount_bits=128", "x.qcow2"],
    ["-o", "refcount_bits=abc", "x.qcow2"],
    ["-o", "refcount_bits=8,compat=0.10", "x.qcow2"],
    ["-o", "compat=0.10,lazy_refcounts=on", "x.qcow2"],
    ["-o", "data_file=foo.raw", "x.qcow2"],
    ["-o", "data_file_raw=on", "x.qcow2"],
    ["-o", "backing_file=b.qcow2", "x.qcow2"],
    ["-o", "backing_fmt=raw", "x.qcow2"],
    ["-o", "data_file_raw=off", "x.qcow2"],
    ["-q", "-o", "help", "x.qcow2"],
    ["-q", "-p", "-o", "compat=1.1", "x.qcow2"],
    ["-o", "compat=1.1", "-o", "lazy_refcounts=on", "x.qcow2"],
    ["--force", "-o", "lazy_refcounts=off", "x.qcow2"],
  ];
  it.each(cases.map((c) => [c.join(" "), c] as const))("amend %s", async (_name, args) => {
    const q = freshDir();
    const d = freshDir();
    for (const dir of [q, d]) {
      expect(qemuImg(["create", "-q", "-f", "qcow2", "x.qcow2", "1M"], dir).code).toBe(0);
      expect(qemuImg(["create", "-q", "-f", "qed", "y.qed", "1M"], dir).code).toBe(0);
      expect(qemuImg(["create", "-q", "-f", "raw", "z.raw", "1M"], dir).code).toBe(0);
    }
    const files = ["x.qcow2", "y.qed", "z.raw"];
    const before = files.map((f) => readFileSync(join(d, f)));
    const a = qemuImg(["amend", ...args], q);
    const b = await qimg(["amend", ...args], d);
    expect(b.code, b.stderr).toBe(a.code);
    expect(b.stdout).toBe(a.stdout);
    expect(firstError(b.stderr)).toBe(firstError(a.stderr));
    if (a.stderr.startsWith("WARNING"))
      expect(b.stderr.split("\n").slice(0, 3)).toEqual(a.stderr.split("\n").slice(0, 3));
    if (b.code !== 0) {
      files.forEach((f, i) => expect(readFileSync(join(d, f)).equals(before[i]!), f).toBe(true));
    } else {
      for (const f of ["x.qcow2"]) expect(facts(f, d)).toEqual(facts(f, q));
    }
  });

  it("-p shows qemu-img's progress lines on stdout, from 0 to 100%", async () => {
    const d = freshDir();
    qemuImg(["create", "-q", "-f", "qcow2", "x.qcow2", "1M"], d);
    qemuIo(["-c", "write -z 0 256k", "x.qcow2"], d);
    const r = await qimg(["amend", "-p", "-o", "compat=0.10", "x.qcow2"], d);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^ {4}\(0\.00\/100%\)\r/);
    expect(r.stdout).toMatch(/ {4}\(100\.00\/100%\)\r\n$/);
  });
});

/**
 * Twins in two directories under the same names (for images whose data file name is part of
 * what amend changes): `setup` runs in each, then the amend; both must agree.
 */
async function twinDirs(
  setup: (dir: string) => void,
  args: readonly string[],
  what: string,
): Promise<{ q: string; d: string; code: number; stderr: string }> {
  const q = freshDir();
  const d = freshDir();
  setup(q);
  setup(d);
  const before = readFileSync(join(d, "img.qcow2"));
  const a = qemuImg(["amend", ...args, "img.qcow2"], q);
  const b = await qimg(["amend", ...args, "img.qcow2"], d);
  expect(b.code, `${what}\nqemu: ${a.stderr}\nqimg: ${b.stderr}`).toBe(a.code);
  expect(b.stdout, what).toBe(a.stdout);
  expect(firstError(b.stderr), what).toBe(firstError(a.stderr));
  if (a.code !== 0) {
    expect(readFileSync(join(d, "img.qcow2")).equals(before), what).toBe(true);
  } else {
    expect(facts("img.qcow2", d), what).toEqual(facts("img.qcow2", q));
    expectClean("img.qcow2", d, what);
    // Data file names resolve against the working directory: each twin reads in its own.
    for (const dir of [q, d]) run(dir, "img", ["convert", "-O", "raw", "img.qcow2", "guest.raw"]);
    expect(
      readFileSync(join(d, "guest.raw")).equals(readFileSync(join(q, "guest.raw"))),
      what,
    ).toBe(true);
  }
  return { q, d, code: a.code, stderr: b.stderr };
}

function run(dir: string, cmd: "img" | "io", args: readonly string[]): void {
  const r = cmd === "img" ? qemuImg(args, dir) : qemuIo(args, dir);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${r.stderr}`);
}

describe.skipIf(!hasQemu)("qimg amend: special images as qemu-img", () => {
  const dataFile = (raw: boolean) => (dir: string) => {
    run(dir, "img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      `data_file=data.raw,data_file_raw=${raw ? "on" : "off"}`,
      "img.qcow2",
      "1M",
    ]);
    run(dir, "io", ["-c", "write -P 7 0 100k", "-c", "write -z 200k 64k", "img.qcow2"]);
    run(dir, "img", ["create", "-q", "-f", "raw", "data2.raw", "1M"]);
    copyFileSync(join(dir, "data.raw"), join(dir, "data2.raw"));
  };
  it.each([
    ["data_file_raw=off", true],
    ["data_file_raw=off", false],
    ["data_file_raw=on", false],
    ["data_file=data2.raw", true],
    ["data_file=data2.raw,data_file_raw=off", true],
    ["compat=0.10", true],
    ["refcount_bits=64", false],
    ["lazy_refcounts=on", true],
    ["size=3000k", false],
  ] as const)("external data file: %s (data_file_raw=%s)", async (o, raw) => {
    await twinDirs(dataFile(raw), ["-o", o], `data file ${o} raw=${raw}`);
  });

  it.each([
    ["extended_l2=on", "compat=0.10"],
    ["extended_l2=on", "refcount_bits=8"],
    ["compression_type=zstd", "compat=0.10"],
    ["compression_type=zstd", "compat=0.10,refcount_bits=16"],
    ["refcount_bits=8", "compat=0.10"],
    ["refcount_bits=8", "compat=0.10,refcount_bits=16"],
  ] as const)("created with %s: amend %s", async (create, o) => {
    for (const compressed of [false, true]) {
      await twinDirs(
        (dir) => {
          run(dir, "img", ["create", "-q", "-f", "qcow2", "-o", create, "img.qcow2", "1M"]);
          run(dir, "io", [
            "-c",
            "write -P 9 0 100k",
            "-c",
            "write -z 128k 64k",
            ...(compressed ? ["-c", "write -c -P 8 512k 64k"] : []),
            "img.qcow2",
          ]);
        },
        ["-o", o],
        `${create}, compressed ${compressed}: ${o}`,
      );
    }
  });

  it("a dirty image (lazy refcounts, qemu-io abort) is repaired by the open, then amended", async () => {
    for (const o of ["compat=0.10", "lazy_refcounts=off", "refcount_bits=4"]) {
      await twinDirs(
        (dir) => {
          run(dir, "img", [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4096",
            "img.qcow2",
            "1M",
          ]);
          qemuIo(
            [
              "-c",
              "write -P 0x2a 0 300k",
              "-c",
              "write -z 400k 40k",
              "-c",
              "flush",
              "-c",
              "abort",
              "img.qcow2",
            ],
            dir,
          );
        },
        ["-o", o],
        `dirty: ${o}`,
      );
    }
  });

  it("a version 2 image with snapshots: upgrade then resize in one amend; size alone refused", async () => {
    for (const o of [
      "compat=1.1,size=2M",
      "size=2M",
      "compat=1.1,lazy_refcounts=on,refcount_bits=64",
    ]) {
      await twinDirs(
        (dir) => {
          run(dir, "img", [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=4096",
            "img.qcow2",
            "1M",
          ]);
          run(dir, "io", ["-c", "write -P 1 0 100k", "img.qcow2"]);
          run(dir, "img", ["snapshot", "-c", "s", "img.qcow2"]);
          run(dir, "io", ["-c", "write -P 2 50k 100k", "img.qcow2"]);
        },
        ["-o", o],
        `v2 with a snapshot: ${o}`,
      );
    }
  });

  it("persistent bitmaps: a downgrade drops them (qemu-img leaks their clusters; qimg frees them)", async () => {
    const r = await twinDirs(
      (dir) => {
        run(dir, "img", ["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
        run(dir, "img", ["bitmap", "--add", "img.qcow2", "b1"]);
        run(dir, "img", ["bitmap", "--add", "-g", "4096", "img.qcow2", "b2"]);
        run(dir, "io", ["-c", "write -P 1 0 300k", "-c", "write -z 512k 64k", "img.qcow2"]);
      },
      ["-o", "compat=0.10"],
      "bitmaps: compat=0.10",
    );
    expect(qemuImg(["check", "img.qcow2"], r.q).code).toBe(3); // qemu-img's own result leaks
    const info = qemuInfo("img.qcow2", "qcow2", r.d);
    expect(JSON.stringify(info)).not.toMatch(/bitmaps/);
  });

  it("size: grow, and shrink as qemu-img amend does (or its refusal without the shrink driver)", async () => {
    for (const o of ["size=3333k", "size=1M", "size=700k", "size=513k"]) {
      const r = await twinDirs(
        (dir) => {
          run(dir, "img", [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "img.qcow2",
            "2M",
          ]);
          run(dir, "io", ["-c", "write -P 3 0 2M", "img.qcow2"]);
        },
        ["-o", o],
        `size: ${o}`,
      ).catch((e: unknown) => e);
      if (r instanceof Error) {
        // Without a shrinking resize in the driver, qimg refuses a smaller size (exit 1).
        expect(r.message, o).toMatch(/cannot be shrunk/);
      }
    }
  });
});

/** One random twin pair and a random amend, from `seed`. */
async function randomCase(seed: number): Promise<void> {
  const r = prng(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
  const dir = freshDir();
  const cs = pick([512, 4096, 65536]);
  const v2 = r() < 0.3;
  const bits = v2 ? 16 : pick([4, 8, 16, 16, 32, 64]);
  const lazy = !v2 && r() < 0.4;
  const size = (1 << 20) + Math.floor(r() * 4096) * 512 + (r() < 0.5 ? 0 : 512);
  const backing = r() < 0.4;
  const what = `seed ${seed}: cluster ${cs}, ${v2 ? "v2" : "v3"}, refcount_bits ${bits}, lazy ${lazy}, size ${size}, backing ${backing}`;
  const opts = [`cluster_size=${cs}`, `compat=${v2 ? "0.10" : "1.1"}`, `refcount_bits=${bits}`];
  if (lazy) opts.push("lazy_refcounts=on");
  if (backing) {
    expect(qemuImg(["create", "-q", "-f", "raw", "base.raw", String(size + 8192)], dir).code).toBe(
      0,
    );
    qemuIo(["-f", "raw", "-c", `write -P 0x5a 0 ${size}`, "base.raw"], dir);
  }
  const create = qemuImg(
    [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      opts.join(","),
      ...(backing ? ["-b", "base.raw", "-F", "raw"] : []),
      "q.qcow2",
      String(size),
    ],
    dir,
  );
  expect(create.code, `${what}: ${create.stderr}`).toBe(0);
  const ops: string[] = [];
  const n = 3 + Math.floor(r() * 10);
  const disk = Math.floor(size / 512) * 512;
  for (let i = 0; i < n; i++) {
    const kind = r();
    const clusters = Math.floor(disk / cs);
    if (kind < 0.35) {
      const off = Math.floor(r() * (disk / 512)) * 512;
      const len = Math.min(disk - off, 512 * (1 + Math.floor(r() * 64)));
      if (len > 0) ops.push(`write -P ${1 + Math.floor(r() * 250)} ${off} ${len}`);
    } else if (kind < 0.6 && !v2) {
      const c = Math.floor(r() * clusters);
      const k = Math.min(clusters - c, 1 + Math.floor(r() * 8));
      if (k > 0) ops.push(`write -z ${r() < 0.5 ? "-u " : ""}${c * cs} ${k * cs}`);
    } else if (kind < 0.8 && bits >= 8) {
      const c = Math.floor(r() * clusters);
      if (c < clusters) ops.push(`write -c -P ${1 + Math.floor(r() * 250)} ${c * cs} ${cs}`);
    } else {
      const c = Math.floor(r() * clusters);
      const k = Math.min(clusters - c, 1 + Math.floor(r() * 4));
      if (k > 0) ops.push(`discard ${c * cs} ${k * cs}`);
    }
  }
  if (ops.length > 0) {
    // A compressed write onto an allocated cluster fails in qemu-io; the twins start from
    // whatever the file holds afterwards.
    qemuIo([...ops.flatMap((o) => ["-c", o]), "q.qcow2"], dir);
  }
  if (r() < 0.3) expect(qemuImg(["snapshot", "-c", "snap", "q.qcow2"], dir).code).toBe(0);
  if (qemuImg(["check", "q.qcow2"], dir).code !== 0) {
    // qemu-io 7.2 itself sometimes leaves an inconsistent image (a compressed write into a
    // cluster that a lazy-refcount discard freed): nothing to compare amends on.
    console.log(`${what}: qemu-io left an image qemu-img check rejects; case skipped`);
    return;
  }
  copyFileSync(join(dir, "q.qcow2"), join(dir, "d.qcow2"));
  // Two amends in a row on the same twins.
  for (let step = 0; step < 2; step++) {
    const info = facts("q.qcow2", dir);
    const isV2 = info["compat"] === "0.10";
    const menu: string[][] = [
      [isV2 ? "compat=1.1" : "compat=0.10"],
      [isV2 ? "compat=v3" : "compat=v2", "refcount_bits=16"],
      [`refcount_bits=${pick([1, 2, 4, 8, 16, 32, 64])}`],
      [`lazy_refcounts=${r() < 0.5 ? "on" : "off"}`],
      ["compat=1.1", "lazy_refcounts=on", `refcount_bits=${pick([8, 32, 64])}`],
      [`size=${Number(info["virtual-size"]) + 512 * Math.floor(r() * 5000)}`],
      ["compat=0.10", `size=${Number(info["virtual-size"]) + cs * 3}`],
      ["compat=0.10", "refcount_bits=16", "lazy_refcounts=off"],
      [
        `refcount_bits=${pick([1, 2, 4, 8, 16, 32, 64])}`,
        `lazy_refcounts=${r() < 0.5 ? "on" : "off"}`,
      ],
    ];
    // qemu-img's refcount width change takes many seconds on 64 KiB clusters (it walks every
    // refcount block entry of the new width): there, only the other options.
    const chosen = pick(
      cs > 4096
        ? menu.filter(
            (m) => !m.some((o) => o.startsWith("refcount_bits=") && o !== "refcount_bits=16"),
          )
        : menu,
    );
    const args = ["-f", "qcow2", "-o", chosen.join(",")];
    await twin(dir, args, `${what}; ops ${ops.join("; ")}; step ${step}: amend ${args.join(" ")}`);
    // Keep the twins identical for the next step (qemu-img may have changed its file on a refusal).
    copyFileSync(join(dir, "d.qcow2"), join(dir, "q.qcow2"));
  }
}

describe.skipIf(!hasQemu)("qimg amend: random twins against qemu-img", () => {
  const only = process.env.QIMG_AMEND_SEED; // reproduce one printed seed
  const seeds =
    only !== undefined
      ? [Number(only)]
      : LONG
        ? Array.from({ length: 200 }, (_, i) => 1000 + i + Math.floor(Date.now() % 100000) * 1000)
        : Array.from({ length: 24 }, (_, i) => 1 + i);
  it.each(seeds)(
    "seed %i",
    async (seed) => {
      try {
        await randomCase(seed);
      } catch (e) {
        console.log(`amend interop failed for seed ${seed}`);
        throw e;
      }
    },
    120_000,
  );
});

/**
 * `qimg amend` against real qemu-img 7.2: the same command lines on twin images give the same
 * exit code, output and first error line, the same guest bytes (`qemu-img compare`) and
 * `qemu-img info` facts, and a clean `qemu-img check`; refusals leave our file byte-identical.
 * This file: syntax, `-o help`, refusals, and special images (external data files, extended
 * L2, zstd, refcount widths, dirty images, snapshots, bitmaps, size changes).
 */
import { copyFileSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { hasQemu, qemuImg, qemuIo, qemuInfo } from "./qemu.js";
import { qimg } from "./helpers.js";
import { amendBoth, createQcow2, facts, firstError, freshDir } from "./amend-twins.js";

if (!hasQemu) console.log("skipping amend interop: qemu-img is not on PATH");

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
      createQcow2(dir, "x.qcow2", "1M");
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
    createQcow2(d, "x.qcow2", "1M");
    qemuIo(["-c", "write -z 0 256k", "x.qcow2"], d);
    const r = await qimg(["amend", "-p", "-o", "compat=0.10", "x.qcow2"], d);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^ {4}\(0\.00\/100%\)\r/);
    expect(r.stdout).toMatch(/ {4}\(100\.00\/100%\)\r\n$/);
  });
});

/**
 * Twins in two directories under the same names (for images whose data file name is part of
 * what amend changes): `setup` runs in each, then the amend; both must agree (see amendBoth),
 * and after a success each twin's guest bytes, read in its own directory, must be the same.
 */
async function twinDirs(
  setup: (dir: string) => void,
  args: readonly string[],
  what: string,
): Promise<{ q: string; d: string }> {
  const q = freshDir();
  const d = freshDir();
  setup(q);
  setup(d);
  const file = "img.qcow2";
  if ((await amendBoth({ dir: q, file }, { dir: d, file }, args, what)) === 0) {
    // Data file names resolve against the working directory: each twin reads in its own.
    for (const dir of [q, d]) run(dir, "img", ["convert", "-O", "raw", file, "guest.raw"]);
    expect(
      readFileSync(join(d, "guest.raw")).equals(readFileSync(join(q, "guest.raw"))),
      what,
    ).toBe(true);
  }
  return { q, d };
}

/** {@link twinDirs} once for each `-o` value in `options`, on images made by `setup`. */
async function amendEach(
  setup: (dir: string) => void,
  options: readonly string[],
  what: string,
): Promise<void> {
  for (const o of options) await twinDirs(setup, ["-o", o], `${what}: ${o}`);
}

function run(dir: string, cmd: "img" | "io", args: readonly string[]): void {
  const r = cmd === "img" ? qemuImg(args, dir) : qemuIo(args, dir);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${r.stderr}`);
}

describe.skipIf(!hasQemu)("qimg amend: special images as qemu-img", () => {
  const dataFile = (raw: boolean) => (dir: string) => {
    const o = `cluster_size=4096,data_file=data.raw,data_file_raw=${raw ? "on" : "off"}`;
    createQcow2(dir, "img.qcow2", "1M", o);
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
    ["extended_l2=on,cluster_size=16384", "compat=0.10"],
    ["extended_l2=on,cluster_size=16384", "refcount_bits=8"],
    ["compression_type=zstd", "compat=0.10"],
    ["compression_type=zstd", "compat=0.10,refcount_bits=16"],
    ["refcount_bits=8,cluster_size=4096", "compat=0.10"],
    ["refcount_bits=8,cluster_size=4096", "compat=0.10,refcount_bits=16"],
  ] as const)("created with %s: amend %s", async (create, o) => {
    for (const compressed of [false, true]) {
      await twinDirs(
        (dir) => {
          createQcow2(dir, "img.qcow2", "1M", create);
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
    await amendEach(
      (dir) => {
        createQcow2(dir, "img.qcow2", "1M", "lazy_refcounts=on,cluster_size=4096");
        const writes = ["write -P 0x2a 0 300k", "write -z 400k 40k", "flush", "abort"];
        qemuIo([...writes.flatMap((c) => ["-c", c]), "img.qcow2"], dir);
      },
      ["compat=0.10", "lazy_refcounts=off", "refcount_bits=4"],
      "dirty",
    );
  });

  it("a version 2 image with snapshots: upgrade then resize in one amend; size alone refused", async () => {
    await amendEach(
      (dir) => {
        createQcow2(dir, "img.qcow2", "1M", "compat=0.10,cluster_size=4096");
        run(dir, "io", ["-c", "write -P 1 0 100k", "img.qcow2"]);
        run(dir, "img", ["snapshot", "-c", "s", "img.qcow2"]);
        run(dir, "io", ["-c", "write -P 2 50k 100k", "img.qcow2"]);
      },
      ["compat=1.1,size=2M", "size=2M", "compat=1.1,lazy_refcounts=on,refcount_bits=64"],
      "v2 with a snapshot",
    );
  });

  it("persistent bitmaps: a downgrade drops them (qemu-img leaks their clusters; qimg frees them)", async () => {
    const r = await twinDirs(
      (dir) => {
        createQcow2(dir, "img.qcow2", "1M");
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

  it("size: grow, and shrink as qemu-img amend does (no --shrink needed)", async () => {
    await amendEach(
      (dir) => {
        createQcow2(dir, "img.qcow2", "2M", "cluster_size=4096");
        run(dir, "io", ["-c", "write -P 3 0 2M", "-c", "write -z 1M 64k", "img.qcow2"]);
        run(dir, "img", ["snapshot", "-c", "s", "img.qcow2"]);
      },
      ["size=3333k", "size=1M", "size=700k", "size=513k", "size=2M,compat=0.10"],
      "size",
    );
  });
});

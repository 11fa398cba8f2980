/**
 * `qimg measure` against `qemu-img measure`: the same stdout, stderr (program name aside) and
 * exit code, human and JSON, for `--size N` with random target options, for sources with data,
 * zero, compressed and unallocated clusters, sparse raw files, backing chains, internal
 * snapshots (`-l`) and persistent bitmaps, to qcow2 and raw targets; and qemu-img's refusals.
 */
import { closeSync, openSync, writeSync } from "node:fs";
import { truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { scratchDirs } from "../../../packages/qcow2/test/twins.js";
import { qimg } from "./helpers.js";
import { hasQemu, ok, prng, qemuImg, qemuIo, withQimgName } from "./qemu.js";

const LONG = process.env.QIMG_LONG === "1";
const newDir = scratchDirs("qimg-measure-");
if (!hasQemu) console.log("skipping measure interop: qemu-img is not on PATH");

const asQimg = withQimgName;

/** Both tools with the same arguments (run in `cwd`): same output and exit code. */
async function same(args: string[], cwd: string, why = ""): Promise<void> {
  const q = qemuImg(["measure", ...args], cwd);
  const m = await qimg(["measure", ...args], cwd);
  expect(
    { code: m.code, out: m.stdout, err: m.stderr },
    `${why}\nmeasure ${args.join(" ")}`,
  ).toEqual({ code: q.code, out: q.stdout, err: asQimg(q.stderr) });
}

/** Random valid qcow2 target options. */
function targetOptions(r: () => number): string {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
  const v2 = r() < 0.25;
  const cs = pick([512, 1024, 4096, 16384, 65536, 262144, 2097152]);
  const o = [`cluster_size=${cs}`, `compat=${v2 ? "0.10" : "1.1"}`];
  if (!v2) o.push(`refcount_bits=${pick([1, 2, 4, 8, 16, 32, 64])}`);
  if (cs >= 16384 && r() < 0.4) o.push("extended_l2=on");
  if (r() < 0.4) o.push(`preallocation=${pick(["off", "metadata", "falloc", "full"])}`);
  if (r() < 0.2) o.push("lazy_refcounts=on".replace("on", v2 ? "off" : "on"));
  return o.join(",");
}

describe.skipIf(!hasQemu)("qimg measure against qemu-img measure", () => {
  it("--size N with random options, qcow2 and raw targets, human and JSON", async () => {
    const dir = newDir();
    const seeds = LONG ? 400 : 40;
    for (let seed = 1; seed <= seeds; seed++) {
      const r = prng(seed);
      const size = Math.floor(r() * (r() < 0.5 ? 1e7 : 3e12));
      const json = r() < 0.5 ? ["--output=json"] : [];
      await same(
        ["-O", "qcow2", "-o", targetOptions(r), "--size", String(size), ...json],
        dir,
        `seed ${seed}`,
      );
      await same(["-O", "raw", "--size", String(size), ...json], dir, `seed ${seed}`);
    }
  }, 900_000);

  it("FILE sources: qcow2 with data/zero/compressed clusters, backing chains, snapshots, bitmaps; sparse raw", async () => {
    const seeds = LONG ? 60 : 6;
    for (let seed = 1; seed <= seeds; seed++) {
      const r = prng(1000 + seed);
      const dir = newDir();
      const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
      const size = 512 * (1 + Math.floor(r() * 30000)) + (r() < 0.5 ? 0 : 7);
      // A sparse raw file (not a multiple of 512 every other time).
      const raw = join(dir, "s.raw");
      writeFileSync(raw, "");
      truncateSync(raw, size);
      const fd = openSync(raw, "r+");
      for (let i = 0; i < 6; i++) {
        const off = Math.floor(r() * size);
        writeSync(
          fd,
          Buffer.alloc(Math.min(size - off, 1 + Math.floor(r() * 20000)), 0x41 + i),
          0,
          undefined,
          off,
        );
      }
      closeSync(fd);
      // A qcow2 base with data, zero, compressed and discarded clusters, an overlay over it.
      const cs = pick([512, 4096, 65536]);
      const vsize = Math.floor(size / 512) * 512 || 512;
      const base = join(dir, "base.qcow2");
      ok(
        qemuImg(["create", "-q", "-f", "qcow2", "-o", `cluster_size=${cs}`, base, String(vsize)]),
        "create base",
      );
      const ops: string[] = [];
      if (cs > 512 && vsize >= cs) ops.push(`write -c -P 7 0 ${cs}`);
      for (let i = 0; i < 8; i++) {
        const off = Math.floor((r() * vsize) / 512) * 512;
        const len = Math.min(vsize - off, 512 * (1 + Math.floor(r() * 100)));
        if (len <= 0) continue;
        ops.push(
          pick([
            `write -P ${i + 1} ${off} ${len}`,
            `write -z ${off} ${len}`,
            `discard ${off} ${len}`,
          ]),
        );
      }
      // Written by qimg io: QEMU's own partial writes leave holes in the file inside data
      // clusters, which QEMU's measure counts as zeros and qimg cannot see (see
      // measureDataBytes); qimg writes its copy-on-write zeros, so both count the same.
      const w = await qimg(["io", "-f", "qcow2", ...ops.flatMap((c) => ["-c", c]), base]);
      ok(w, `qimg io ${ops.join("; ")}`);
      // And a QEMU-written image with whole-cluster writes only (no holes either).
      const whole = join(dir, "whole.qcow2");
      ok(
        qemuImg(["create", "-q", "-f", "qcow2", "-o", `cluster_size=${cs}`, whole, String(vsize)]),
        "create",
      );
      const wops = [0, 1, 2].map(
        (i) => `write -P ${i + 9} ${Math.floor((r() * vsize) / cs) * cs} ${cs}`,
      );
      wops.push(`write -z ${Math.floor((r() * vsize) / cs) * cs} ${cs}`);
      ok(
        qemuIo([
          "-f",
          "qcow2",
          ...wops.filter((c) => Number(c.split(" ")[3]) + cs <= vsize).flatMap((c) => ["-c", c]),
          whole,
        ]),
        "qemu-io whole",
      );
      if (r() < 0.6)
        ok(
          qemuImg([
            "bitmap",
            "--add",
            "-g",
            String(pick([512, 65536, 1 << 20])),
            base,
            pick(["b", "bitmap-name-that-is-longer"]),
          ]),
          "bitmap",
        );
      ok(qemuImg(["snapshot", "-c", "s1", base]), "snapshot");
      ok(
        await qimg(["io", "-f", "qcow2", "-c", `write -P 0x66 0 ${Math.min(vsize, 8192)}`, base]),
        "write after snapshot",
      );
      const over = join(dir, "over.qcow2");
      ok(
        qemuImg([
          "create",
          "-q",
          "-f",
          "qcow2",
          "-b",
          "base.qcow2",
          "-F",
          "qcow2",
          over,
          String(vsize + 3 * cs),
        ]),
        "create overlay",
      );
      // Whole clusters: QEMU writes the copy-on-write zeros of a partial write over a backing
      // file as data, which qimg cannot tell from holes (see measureDataBytes).
      const at = Math.ceil(vsize / cs) * cs;
      ok(qemuIo(["-f", "qcow2", "-c", `write -P 0x55 ${at} ${cs}`, over]), "write overlay");
      const why = `seed ${seed}: size ${size}, cluster ${cs}, ${ops.join("; ")}`;
      for (const src of [
        ["s.raw"],
        ["-f", "raw", "s.raw"],
        ["base.qcow2"],
        ["over.qcow2"],
        ["-l", "s1", "base.qcow2"],
        ["-l", "snapshot.id=1", "base.qcow2"],
        ["whole.qcow2"],
      ]) {
        const json = r() < 0.5 ? ["--output=json"] : [];
        await same(["-O", "qcow2", "-o", targetOptions(r), ...json, ...src], dir, why);
        await same(["-O", "raw", ...json, ...src], dir, why);
        await same(["-O", "qcow2", "-o", "backing_file=base.qcow2", ...json, ...src], dir, why);
      }
    }
  }, 900_000);

  it("LUKS and AES targets (the LUKS header and key material before the payload)", async () => {
    const dir = newDir();
    ok(qemuImg(["create", "-q", "-f", "qcow2", join(dir, "a.qcow2"), "3M"]), "create");
    ok(qemuIo(["-c", "write -P 1 0 1M", join(dir, "a.qcow2")]), "write");
    const S = ["--object", "secret,id=s,data=x"];
    const luks = "encrypt.format=luks,encrypt.key-secret=s";
    const cases: string[][] = [
      [...S, "-O", "qcow2", "-o", luks, "--size", "1G"],
      [...S, "-O", "qcow2", "-o", `${luks},encrypt.cipher-alg=aes-128`, "--size", "1G"],
      [
        ...S,
        "-O",
        "qcow2",
        "-o",
        `${luks},encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc`,
        "--size",
        "5G",
      ],
      [...S, "-O", "qcow2", "-o", `${luks},cluster_size=2M`, "--size", "1G"],
      [...S, "-O", "qcow2", "-o", `${luks},cluster_size=512`, "--output=json", "--size", "1G"],
      [...S, "-O", "qcow2", "-o", `${luks},encrypt.cipher-alg=twofish-192`, "--size", "1G"],
      [
        ...S,
        "-O",
        "qcow2",
        "-o",
        `${luks},encrypt.cipher-alg=serpent-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256`,
        "a.qcow2",
      ],
      [...S, "-O", "qcow2", "-o", `${luks},encrypt.cipher-mode=ctr`, "--output=json", "a.qcow2"],
      [...S, "-O", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=s", "--size", "1G"],
      [...S, "-O", "qcow2", "-o", "encryption=on,encrypt.key-secret=s", "--size", "1G"],
      ["-O", "qcow2", "-o", luks, "--size", "1G"],
      [...S, "-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"],
    ];
    for (const args of cases) await same(args, dir);
    // qemu-img spends about 2 s per LUKS target in its key-derivation benchmark (46 s in all
    // on a quiet CI machine): well past the default 60 s once the machine is loaded.
  }, 300_000);

  it("refuses as qemu-img", async () => {
    const dir = newDir();
    ok(qemuImg(["create", "-q", "-f", "qcow2", join(dir, "a.qcow2"), "1M"]), "create");
    ok(qemuImg(["create", "-q", "-f", "qed", join(dir, "a.qed"), "1M"]), "create qed");
    const cases: string[][] = [
      [],
      ["--size", "1G", "-O", "qed"],
      ["-O", "qed", "a.qcow2"],
      ["--size", "1G", "a.qcow2"],
      ["a.qcow2", "a.qed"],
      ["-l", "s", "--size", "1M"],
      ["-f", "qcow2", "--size", "1M"],
      ["--size", "-5"],
      ["--size", "1Q"],
      ["--size", "1G", "-O", "foo"],
      ["--size", "1G", "--output=xml"],
      ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=1000"],
      ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=abc"],
      ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=4096"],
      ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=maybe"],
      ["--size", "1G", "-O", "qcow2", "-o", "compat=0.9"],
      ["--size", "1G", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=8"],
      ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3"],
      ["--size", "1G", "-O", "qcow2", "-o", "preallocation=foo"],
      ["--size", "1G", "-O", "qcow2", "-o", "foo=bar"],
      ["--size", "1G", "-O", "raw", "-o", "cluster_size=4k"],
      ["--size", "100T", "-O", "qcow2", "-o", "cluster_size=512"],
      ["-O", "qcow2", "missing.qcow2"],
      ["-O", "qcow2", "-l", "nosnap", "a.qcow2"],
      // -l is parsed with the options: refused before the file is looked at
      ["-O", "qcow2", "-l", "snapshot.foo=1", "a.qcow2"],
      ["-O", "qcow2", "-l", "snapshot.foo=1", "missing.qcow2"],
      ["-l", "snapshot.id=1,bar=2"],
    ];
    for (const args of cases) await same(args, dir);
  });
});

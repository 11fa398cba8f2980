/**
 * qimg convert never loses or invents guest data, checked with real qemu-img:
 *
 * - the tail of an image whose size is not a multiple of the target's cluster size (or of 512)
 *   is copied, from raw, qcow2 and QED sources into raw, qcow2 and QED targets, with and
 *   without -c (a compressed last partial cluster is padded with zeros and compressed, as
 *   qemu-img does);
 * - `-o backing_file=B`: where the source reads zeros but B has data, the result reads zeros;
 * - the target is never a file the source reads (itself, a backing file, a data file), named
 *   directly, through a symlink or a hard link: refused before anything is written;
 * - a convert that fails leaves no half-made target.
 *
 * Seeds are printed on failure (QIMG_SEED replays one); QIMG_LONG=1 runs many more cases.
 */
import { createHash } from "node:crypto";
import {
  existsSync,
  linkSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping convert integrity tests: qemu-img is not on PATH");

const LONG = process.env.QIMG_LONG === "1";
/** The long run's cases take minutes on a loaded machine. */
const LONG_TIMEOUT = LONG ? 3_600_000 : 120_000;
const tmp = mkdtempSync(join(tmpdir(), "qimg-convint-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** Random guest content: holes, random bytes and compressible text in 4 KiB..256 KiB runs; the last bytes are never zero. */
function content(size: number, rnd: () => number): Uint8Array {
  const buf = new Uint8Array(size);
  let off = 0;
  while (off < size) {
    const len = Math.min(size - off, 4096 * (1 + Math.floor(rnd() * 64)));
    const kind = rnd();
    if (kind < 0.45) {
      for (let i = off; i < off + len; i++) buf[i] = Math.floor(rnd() * 256);
    } else if (kind < 0.75) {
      for (let i = off; i < off + len; i++) buf[i] = 0x41 + ((i >> 5) % 26);
    }
    off += len;
  }
  // A compressible, non-zero tail: a dropped or unpadded last cluster cannot hide.
  for (let i = Math.max(0, size - 700); i < size; i++) buf[i] = 0x61 + (i % 7);
  return buf;
}

function sha(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

function identical(src: string, srcFmt: string, dst: string, dstFmt: string): string {
  const r = qemuImg(["compare", "-f", srcFmt, "-F", dstFmt, src, dst]);
  return r.stdout + r.stderr;
}

function checkJson(file: string): Record<string, number> {
  const r = qemuImg(["check", "--output=json", file]);
  return { ...(JSON.parse(r.stdout) as Record<string, number>), exit: r.code };
}

const SEED = Number(process.env.QIMG_SEED ?? 20261202);

describe.skipIf(!hasQemu)("convert copies the whole image, tail included", () => {
  it(
    "random sizes (not multiples of 512), every source/target pair, -c, cluster sizes",
    async () => {
      const cases = LONG ? 60 : 6;
      for (let n = 0; n < cases; n++) {
        const seed = SEED + n;
        const rnd = prng(seed);
        // Below and above one 2 MiB copy chunk; never a multiple of 512.
        let size = 1 + Math.floor(rnd() * (n % 2 === 0 ? 2 * 1024 * 1024 : 7 * 1024 * 1024));
        if (size % 512 === 0) size += 77;
        const tag = `seed ${seed} size ${size}`;
        const raw = join(tmp, `s${seed}.raw`);
        writeFileSync(raw, content(size, rnd));
        const srcCluster = [4096, 65536, 1 << 21][Math.floor(rnd() * 3)]!;
        const sources: [string, string][] = [[raw, "raw"]];
        for (const fmt of ["qcow2", "qed"]) {
          const p = join(tmp, `s${seed}.${fmt}`);
          const cs = fmt === "qed" ? Math.max(4096, srcCluster) : srcCluster;
          const r = qemuImg([
            "convert",
            "-f",
            "raw",
            "-O",
            fmt,
            "-o",
            `cluster_size=${cs}`,
            raw,
            p,
          ]);
          expect(r.code, `${tag}: ${r.stderr}`).toBe(0);
          sources.push([p, fmt]);
        }
        const cluster = [512, 4096, 16384, 65536, 1 << 20][Math.floor(rnd() * 5)]!;
        const targets: [string, string[]][] = [
          ["raw", []],
          ["qcow2", ["-o", `cluster_size=${cluster}`]],
          ["qcow2", ["-c", "-o", `cluster_size=${Math.max(cluster, 4096)}`]],
          ["qed", ["-o", `cluster_size=${Math.max(cluster, 4096)}`]],
        ];
        for (const [src, srcFmt] of sources) {
          for (const [fmt, extra] of targets) {
            const what = `${tag}: ${srcFmt} -> ${fmt} ${extra.join(" ")}`;
            const dst = join(tmp, `d${seed}-${srcFmt}-${fmt}${extra.length}.${fmt}`);
            const r = await qimg(["convert", "-f", srcFmt, "-O", fmt, ...extra, src, dst]);
            expect(r, what).toEqual({ code: 0, stdout: "", stderr: "" });
            expect(identical(src, srcFmt, dst, fmt), what).toBe("Images are identical.\n");
            if (fmt !== "raw") expect(checkJson(dst).exit, what).toBe(0);
            rmSync(dst);
          }
        }
      }
    },
    LONG_TIMEOUT,
  );

  it("-c: the last partial cluster is padded and compressed, as qemu-img does", async () => {
    for (const [size, cs] of [
      [1000, 65536],
      [65536 + 4096 + 100, 65536],
      [3 * 1024 * 1024 + 1234, 1 << 20],
      [10_000, 4096],
    ] as const) {
      const rnd = prng(size);
      const raw = join(tmp, `c${size}.raw`);
      const text = new Uint8Array(size);
      for (let i = 0; i < size; i++) text[i] = 0x41 + ((i >> 4) % 26) + (rnd() < 0.01 ? 1 : 0);
      writeFileSync(raw, text);
      const ours = join(tmp, `c${size}-qimg.qcow2`);
      const theirs = join(tmp, `c${size}-qemu.qcow2`);
      const opts = ["-o", `cluster_size=${cs}`];
      const r = await qimg(["convert", "-c", "-f", "raw", "-O", "qcow2", ...opts, raw, ours]);
      expect(r, `size ${size}`).toEqual({ code: 0, stdout: "", stderr: "" });
      expect(
        qemuImg(["convert", "-c", "-f", "raw", "-O", "qcow2", ...opts, raw, theirs]).code,
      ).toBe(0);
      expect(identical(raw, "raw", ours, "qcow2"), `size ${size}`).toBe("Images are identical.\n");
      const a = checkJson(ours);
      const b = checkJson(theirs);
      expect(a.exit, `size ${size}`).toBe(0);
      expect(a["compressed-clusters"], `size ${size}`).toBe(b["compressed-clusters"]);
      expect(a["compressed-clusters"], `size ${size}`).toBe(Math.ceil(size / cs));
    }
  });
});

describe.skipIf(!hasQemu)("convert -o backing_file: the result reads as the source", () => {
  it("zeros of the source hide the backing file's data (qcow2 v3/v2, QED, -c)", async () => {
    const rnd = prng(SEED);
    const size = 3 * 1024 * 1024 + 4321;
    const data = content(size, rnd);
    // Zero ranges: a whole 2 MiB chunk's worth, a cluster run, a few sectors, the start.
    data.fill(0, 0, 5000);
    data.fill(0, 300_000, 2_500_000);
    data.fill(0, 2_600_000, 2_600_000 + 1536);
    const src = join(tmp, "bk-src.raw");
    writeFileSync(src, data);
    const base = join(tmp, "bk-base.raw");
    const b = new Uint8Array(size + 100_000);
    for (let i = 0; i < b.length; i++) b[i] = 1 + Math.floor(rnd() * 255);
    writeFileSync(base, b);
    const baseQcow2 = join(tmp, "bk-base.qcow2");
    expect(qemuImg(["convert", "-f", "raw", "-O", "qcow2", base, baseQcow2]).code).toBe(0);
    for (const [fmt, extra, backing, backingFmt] of [
      ["qcow2", [], baseQcow2, "qcow2"],
      ["qcow2", ["-o", "compat=0.10"], baseQcow2, "qcow2"],
      ["qcow2", ["-o", "cluster_size=4096"], base, "raw"],
      ["qcow2", ["-c"], baseQcow2, "qcow2"],
      ["qed", [], baseQcow2, "qcow2"],
    ] as const) {
      const what = `${fmt} ${extra.join(" ")} over ${basename(backing)}`;
      const dst = join(tmp, `bk-dst.${fmt}`);
      const r = await qimg([
        "convert",
        "-f",
        "raw",
        "-O",
        fmt,
        ...extra,
        "-o",
        `backing_file=${backing},backing_fmt=${backingFmt}`,
        src,
        dst,
      ]);
      expect(r, what).toEqual({ code: 0, stdout: "", stderr: "" });
      expect(identical(src, "raw", dst, fmt), what).toBe("Images are identical.\n");
      expect(checkJson(dst).exit, what).toBe(0);
      rmSync(dst);
    }
  });
});

describe.skipIf(!hasQemu)("convert refuses to write a file the source reads", () => {
  it("the backing file, by name, symlink or hard link; the data file; the base stays intact", async () => {
    const base = join(tmp, "ch-base.raw");
    const rnd = prng(SEED + 7);
    const bytes = new Uint8Array(1024 * 1024 + 512);
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(rnd() * 256);
    writeFileSync(base, bytes);
    const baseQ = join(tmp, "ch-base.qcow2");
    expect(qemuImg(["convert", "-f", "raw", "-O", "qcow2", base, baseQ]).code).toBe(0);
    const mid = join(tmp, "ch-mid.qcow2");
    expect(qemuImg(["create", "-q", "-f", "qcow2", "-b", baseQ, "-F", "qcow2", mid]).code).toBe(0);
    const top = join(tmp, "ch-top.qcow2");
    expect(qemuImg(["create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top]).code).toBe(0);
    expect(qemuIo(["-c", "write -P 7 0 64k", top]).code).toBe(0);
    const overRaw = join(tmp, "ch-over-raw.qcow2");
    expect(qemuImg(["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overRaw]).code).toBe(0);
    const sym = join(tmp, "ch-sym");
    symlinkSync(baseQ, sym);
    const hard = join(tmp, "ch-hard");
    linkSync(baseQ, hard);
    const symRaw = join(tmp, "ch-sym-raw");
    symlinkSync(base, symRaw);
    const before = { base: sha(base), baseQ: sha(baseQ), mid: sha(mid), top: sha(top) };
    // qemu-img refuses too (its image locks).
    expect(qemuImg(["convert", "-O", "raw", overRaw, base]).code).toBe(1);
    for (const [src, target] of [
      [overRaw, base],
      [overRaw, symRaw],
      [top, baseQ],
      [top, sym],
      [top, hard],
      [top, mid],
      [top, top],
    ] as const) {
      for (const fmt of ["raw", "qcow2", "qed"]) {
        const what = `${basename(src)} -> ${basename(target)} (${fmt})`;
        const r = await qimg(["convert", "-O", fmt, src, target]);
        expect(r.code, what).toBe(1);
        expect(r.stdout, what).toBe("");
        expect(r.stderr.split("\n"), what).toHaveLength(2);
        expect(r.stderr, what).toMatch(/^qimg: /);
      }
    }
    // The source's external data file is a file it reads too.
    const ext = join(tmp, "ch-ext.qcow2");
    const extData = join(tmp, "ch-ext.data");
    expect(
      qemuImg(["create", "-q", "-f", "qcow2", "-o", `data_file=${extData}`, ext, "1M"]).code,
    ).toBe(0);
    expect(qemuIo(["-c", "write -P 3 0 64k", ext]).code).toBe(0);
    const extSum = sha(extData);
    for (const fmt of ["raw", "qcow2"]) {
      expect((await qimg(["convert", "-O", fmt, ext, extData])).code, fmt).toBe(1);
    }
    expect(sha(extData)).toBe(extSum);
    // The new image's external data file may not be a file of the source's chain either.
    const out = join(tmp, "ch-out.qcow2");
    const d = await qimg(["convert", "-O", "qcow2", "-o", `data_file=${hard}`, top, out]);
    expect(d.code).toBe(1);
    expect(existsSync(out)).toBe(false);
    expect({ base: sha(base), baseQ: sha(baseQ), mid: sha(mid), top: sha(top) }).toEqual(before);
    expect(checkJson(baseQ).exit).toBe(0);
  });
});

describe.skipIf(!hasQemu)("a failed convert leaves no half-made target", () => {
  // A qcow2 source whose second data cluster's L2 entry is not cluster-aligned: qemu-img
  // calls it corrupt, and so does qimg once the copy reaches it.
  const corruptSource = (): string => {
    const f = join(tmp, "bad-src.qcow2");
    expect(qemuImg(["create", "-q", "-f", "qcow2", f, "8M"]).code).toBe(0);
    expect(qemuIo(["-c", "write -P 1 0 64k", "-c", "write -P 2 6M 64k", f]).code).toBe(0);
    const map = JSON.parse(qemuImg(["map", "--output=json", f]).stdout) as {
      start: number;
      offset?: number;
    }[];
    const host = map.find((e) => e.start === 6 * 1024 * 1024)!.offset!;
    // Find the L2 entry holding `host` (with the COPIED flag) and shift it by 512 bytes.
    const bytes = readFileSync(f);
    const want = Buffer.alloc(8);
    want.writeBigUInt64BE(BigInt(host) | (1n << 63n));
    const at = bytes.indexOf(want);
    expect(at).toBeGreaterThan(0);
    bytes.writeBigUInt64BE(BigInt(host + 512) | (1n << 63n), at);
    writeFileSync(f, bytes);
    expect(qemuImg(["convert", "-O", "raw", f, join(tmp, "bad-qemu.raw")]).code).not.toBe(0);
    return f;
  };

  it("a target it created is removed; one it overwrote is removed; one it never touched stays", async () => {
    const src = corruptSource();
    for (const fmt of ["raw", "qcow2", "qed"]) {
      const dst = join(tmp, `bad-dst.${fmt}`);
      const r = await qimg(["convert", "-O", fmt, src, dst]);
      expect(r.code, fmt).toBe(1);
      expect(existsSync(dst), fmt).toBe(false);
      // An existing file that the convert truncated is not left half-written either.
      writeFileSync(dst, "old contents");
      expect((await qimg(["convert", "-O", fmt, src, dst])).code, fmt).toBe(1);
      expect(existsSync(dst), fmt).toBe(false);
      // Through a symlink: the file written through it goes, not only the link.
      const real = join(tmp, `bad-real.${fmt}`);
      writeFileSync(real, "old contents");
      const link = join(tmp, `bad-link.${fmt}`);
      symlinkSync(real, link);
      expect((await qimg(["convert", "-O", fmt, src, link])).code, fmt).toBe(1);
      expect(existsSync(real), fmt).toBe(false);
    }
    // Refused before the target is touched (bad options): the old file stays as it was.
    const keep = join(tmp, "keep.qcow2");
    writeFileSync(keep, "old contents");
    const good = join(tmp, "good.raw");
    writeFileSync(good, new Uint8Array(70_000).fill(3));
    for (const opts of ["cluster_size=1234", "compat=0.10,lazy_refcounts=on", "frobnicate=1"]) {
      const r = await qimg(["convert", "-f", "raw", "-O", "qcow2", "-o", opts, good, keep]);
      expect(r.code, opts).toBe(1);
      expect(readFileSync(keep, "utf8"), opts).toBe("old contents");
    }
  });
});

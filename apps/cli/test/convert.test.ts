/**
 * qimg convert -O qcow2 / -O qed (with and without -c) from raw, qcow2 and QED sources:
 * qemu-img compare says identical, qemu-img check says clean; zero ranges stay unallocated.
 * Also qimg bench's output lines.
 */
import { mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fixturePath, listFixtures } from "@qimg/fixtures";
import { afterAll, describe, expect, it } from "vitest";
import { qimg, qimgProcess } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuInfo, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping qimg convert interop tests: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-convert-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/** A raw file with compressible text, random bytes, and zero holes. */
function rawSource(name: string, size: number, seed: number): string {
  const rnd = prng(seed);
  const buf = new Uint8Array(size);
  for (let off = 0; off < size; off += 256 * 1024) {
    const kind = rnd();
    const end = Math.min(size, off + 256 * 1024);
    if (kind < 0.3) continue; // hole
    if (kind < 0.6) for (let i = off; i < end; i++) buf[i] = 0x41 + ((i >> 6) % 26);
    else for (let i = off; i < end; i++) buf[i] = Math.floor(rnd() * 256);
  }
  const p = join(tmp, name);
  writeFileSync(p, buf);
  return p;
}

function verify(src: string, dst: string, fmt: string, srcFmt?: string): void {
  const check = qemuImg(["check", "-f", fmt, dst]);
  expect(check.code, check.stdout + check.stderr).toBe(0);
  // (qemu opens a data_file named by a relative path relative to its working directory.)
  const cmp = qemuImg(
    ["compare", ...(srcFmt ? ["-f", srcFmt] : []), "-F", fmt, src, dst],
    dirname(src),
  );
  expect(cmp.stdout, cmp.stderr).toBe("Images are identical.\n");
  expect(qemuInfo(dst, fmt)["dirty-flag"]).toBe(false);
}

describe.skipIf(!hasQemu)("qimg convert to qcow2 and QED", () => {
  it("from raw: -O qcow2, -c -O qcow2, -O qed; holes stay unallocated", async () => {
    const src = rawSource("src.raw", 12 * 1024 * 1024 + 4096, 1234);
    for (const [fmt, extra] of [
      ["qcow2", []],
      ["qcow2", ["-c"]],
      ["qcow2", ["-o", "cluster_size=4k,compat=0.10"]],
      ["qcow2", ["-c", "-o", "cluster_size=16k,extended_l2=on"]],
      ["qcow2", ["-W", "-o", "lazy_refcounts=on"]],
      ["qed", []],
      ["qed", ["-o", "cluster_size=4k"]],
    ] as const) {
      const dst = join(tmp, `from-raw-${fmt}-${extra.join("")}.${fmt}`);
      const r = await qimg(["convert", "-f", "raw", "-O", fmt, ...extra, src, dst]);
      expect(r, extra.join(" ")).toEqual({ code: 0, stdout: "", stderr: "" });
      verify(src, dst, fmt, "raw");
      const check = JSON.parse(qemuImg(["check", "--output=json", dst]).stdout) as Record<
        string,
        number
      >;
      // Holes (about 30%) are not allocated.
      expect(check["allocated-clusters"]! * (qemuInfo(dst)["cluster-size"] as number)).toBeLessThan(
        12 * 1024 * 1024,
      );
      if ((extra as readonly string[]).includes("-c"))
        expect(check["compressed-clusters"]).toBeGreaterThan(0);
    }
  });

  it("from every readable qcow2/QED fixture, with and without -c", async () => {
    const fixtures = listFixtures({ broken: false }).filter(
      (f) => f.format !== "raw" && f.sha256 !== null,
    );
    expect(fixtures.length).toBeGreaterThan(5);
    for (const f of fixtures) {
      const src = fixturePath(f.name);
      for (const [fmt, extra] of [
        ["qcow2", []],
        ["qcow2", ["-c"]],
        ["qed", []],
      ] as const) {
        const dst = join(tmp, `${f.name}-${fmt}${extra.join("")}.${fmt}`);
        const r = await qimg(["convert", "-O", fmt, ...extra, src, dst]);
        expect(r.code, `${f.name} ${fmt} ${extra.join(" ")}: ${r.stderr}`).toBe(0);
        verify(src, dst, fmt);
      }
    }
    // ~130 converts, a third of them starting compression workers from source through tsx:
    // about 50 s on a quiet 2-core machine, more when the suite runs in parallel.
  }, 240_000);

  it("convert -c -p as a process (workers started from source through tsx)", () => {
    const src = rawSource("proc.raw", 3 * 1024 * 1024, 99);
    const dst = join(tmp, "proc.qcow2");
    const r = qimgProcess(["convert", "-c", "-p", "-O", "qcow2", src, dst]);
    expect({ ...r, stdout: "" }).toEqual({ code: 0, stdout: "", stderr: "" });
    // -p to a pipe: qemu-img's progress lines on stdout.
    expect(r.stdout).toMatch(/^ {4}\(0\.00\/100%\)\r.* {4}\(100\.00\/100%\)\r\n$/s);
    verify(src, dst, "qcow2", "raw");
  });

  it("errors in qemu-img's words; -O raw still works", async () => {
    const src = rawSource("e.raw", 1 << 20, 5);
    expect((await qimg(["convert", "-c", "-O", "qed", src, join(tmp, "e.qed")])).stderr).toBe(
      "qimg: Compression not supported for this file format\n",
    );
    expect((await qimg(["convert", "-O", "vmdk", src, join(tmp, "e.vmdk")])).stderr).toBe(
      "qimg: Unknown file format 'vmdk'\n",
    );
    const v2 = await qimg([
      "convert",
      "-O",
      "qcow2",
      "-o",
      "compat=0.10,lazy_refcounts=on",
      src,
      join(tmp, "e.qcow2"),
    ]);
    expect(v2.stderr).toBe(
      `qimg: ${join(tmp, "e.qcow2")}: error while converting qcow2: Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)\n`,
    );
    const zstd = await qimg([
      "convert",
      "-c",
      "-O",
      "qcow2",
      "-o",
      "compression_type=zstd",
      src,
      join(tmp, "z.qcow2"),
    ]);
    expect(zstd.code, zstd.stderr).toBe(0);
    expect(qemuImg(["compare", "-f", "raw", "-F", "qcow2", src, join(tmp, "z.qcow2")]).stdout).toBe(
      "Images are identical.\n",
    );
    expect(qemuImg(["check", join(tmp, "z.qcow2")]).stdout).toMatch(/No errors were found/);
    const raw = join(tmp, "back.raw");
    expect(
      (await qimg(["convert", "-O", "raw", join(tmp, "from-raw-qcow2-.qcow2"), raw])).code,
    ).toBe(0);
    expect(qemuImg(["compare", "-f", "raw", "-F", "raw", join(tmp, "src.raw"), raw]).stdout).toBe(
      "Images are identical.\n",
    );
  });
});

describe.skipIf(!hasQemu)("qimg bench", () => {
  it("prints qemu-img bench's lines", async () => {
    const f = join(tmp, "bench.qcow2");
    await qimg(["create", "-q", "-f", "qcow2", f, "16M"]);
    for (const extra of [
      [],
      ["-w"],
      ["-w", "-s", "64k", "-d", "4", "-o", "1M", "-S", "128k", "--pattern=5"],
      ["-t", "writethrough", "-w", "--flush-interval=100"],
    ]) {
      const args = ["-c", "1000", ...extra, f];
      const r = await qimg(["bench", ...args]);
      const q = qemuImg(["bench", ...args]);
      expect(r.code).toBe(q.code);
      const lines = (s: string): string[] =>
        s.split("\n").filter((l) => l !== "" && !l.startsWith("Run completed"));
      expect(lines(r.stdout)).toEqual(lines(q.stdout));
      expect(r.stdout).toMatch(/\nRun completed in \d+\.\d{3} seconds\.\n$/);
    }
    expect(qemuImg(["check", f]).code).toBe(0);
    const bad = await qimg(["bench", "--flush-interval=10", f]);
    expect(bad.stderr).toBe("qimg: --flush-interval is only available in write tests\n");
  });
});

describe.skipIf(!hasQemu)("convert preallocates large data extents and keeps holes", () => {
  // 40 MiB of data (above the 32 MiB preallocation threshold), then a 24 MiB hole, then 8 MiB
  // of data (below it), then a 1 MiB all-zero block written as data inside the first extent.
  const MiB = 1024 * 1024;
  const size = 72 * MiB;
  const src = join(tmp, "prealloc-src.qcow2");
  const ref = join(tmp, "prealloc-ref.raw");
  const made = (): void => {
    if (qemuImg(["create", "-f", "qcow2", src, String(size)]).code !== 0) throw new Error("create");
    const w = (args: string): void => {
      const r = qemuIo(["-f", "qcow2", "-c", args, src]);
      if (r.code !== 0) throw new Error(r.stderr);
    };
    w(`write -P 0x5a 0 ${40 * MiB}`);
    w(`write -P 0 ${10 * MiB} ${MiB}`);
    w(`write -P 0x33 ${64 * MiB} ${8 * MiB}`);
    qemuImg(["convert", "-f", "qcow2", "-O", "raw", src, ref]);
  };

  it("-O raw: same bytes as qemu-img's output, and the hole stays a hole", async () => {
    made();
    const dst = join(tmp, "prealloc.raw");
    const r = await qimg(["convert", "-f", "qcow2", "-O", "raw", src, dst]);
    expect(r).toEqual({ code: 0, stdout: "", stderr: "" });
    expect(qemuImg(["compare", "-f", "raw", "-F", "raw", ref, dst]).code).toBe(0);
    // At most the two data extents are allocated (48 MiB); the 24 MiB hole is not.
    expect(statSync(dst).blocks * 512).toBeLessThanOrEqual(48 * MiB + MiB);
    const map = JSON.parse(qemuImg(["map", "--output=json", "-f", "raw", dst]).stdout) as {
      start: number;
      length: number;
      data: boolean;
    }[];
    const holeCovered = map.filter(
      (e) => !e.data && e.start <= 40 * MiB && e.start + e.length >= 64 * MiB,
    );
    expect(holeCovered.length, JSON.stringify(map)).toBe(1);
  });

  it("-O qcow2: nothing preallocated is left past the end of the image", async () => {
    const dst = join(tmp, "prealloc.qcow2");
    const r = await qimg(["convert", "-f", "qcow2", "-O", "qcow2", src, dst]);
    expect(r).toEqual({ code: 0, stdout: "", stderr: "" });
    verify(src, dst, "qcow2", "qcow2");
    const st = statSync(dst);
    expect(st.blocks * 512).toBeLessThanOrEqual(st.size + 64 * 1024);
  });
});

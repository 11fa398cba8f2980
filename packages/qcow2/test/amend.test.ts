/**
 * Qcow2Image.amend against real qemu-img 7.2: the scenarios of QEMU's iotest 061 (version
 * downgrade with zero expansion, dirty images, lazy refcounts, snapshots and shared L2 tables,
 * backing files), refcount width changes, and refusals. Each scenario runs `qemu-img amend` on
 * one twin and the driver on the other; both must read the same, pass `qemu-img check`, and
 * show the same header facts.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { requireQemu } from "@qimg/fixtures";
import type { Qcow2AmendOptions } from "../src/index.js";
import { openRw, qemuImg, scratchDirs, tool } from "./twins.js";
import { openFile } from "./open.js";
import { createQcow2In, sh } from "./qemu-sh.js";

const haveQemu = requireQemu();
const freshDir = scratchDirs("qimg-amend-");

/** The header facts amend changes, read straight from the file. */
function facts(file: string): Record<string, unknown> {
  const b = fs.readFileSync(file);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const version = dv.getUint32(4);
  return {
    version,
    size: Number(dv.getBigUint64(24)),
    ...(version === 3
      ? {
          incompatible: dv.getBigUint64(72).toString(16),
          compatible: dv.getBigUint64(80).toString(16),
          autoclear: dv.getBigUint64(88).toString(16),
          refcountOrder: dv.getUint32(96),
        }
      : {}),
  };
}

/** `qemu-img check` passes with no leaks and no corruptions. */
function expectClean(file: string, cwd: string): void {
  const r = qemuImg(["check", "--output=json", file], cwd);
  expect(r.code, `${file}: ${r.stdout}${r.stderr}`).toBe(0);
  const j = JSON.parse(r.stdout) as Record<string, unknown>;
  expect(j["leaks"] ?? 0, file).toBe(0);
  expect(j["corruptions"] ?? 0, file).toBe(0);
}

/** qemu-io read -P checks: each [pattern, offset, length]. */
type Reads = [pattern: number, offset: string, length: string][];

/** qemu-io reads `file` as `reads` says. */
function expectReads(file: string, cwd: string, reads: Reads): void {
  const args: string[] = [];
  for (const [p, off, len] of reads) args.push("-c", `read -P ${p} ${off} ${len}`);
  const out = sh("qemu-io", [...args, file], cwd);
  expect(out, file).not.toMatch(/Pattern verification failed|error/i);
}

/** The twins: `q.qcow2` amended by qemu-img, `d.qcow2` by the driver. */
const TWINS = ["q.qcow2", "d.qcow2"] as const;

/** Each twin reads as `reads` says and passes `qemu-img check` clean. */
function expectTwinsRead(cwd: string, reads: Reads): void {
  for (const f of TWINS) {
    expectReads(f, cwd, reads);
    expectClean(f, cwd);
  }
}

/** Amend `q.qcow2` with qemu-img and `d.qcow2` (a copy) with the driver. */
async function twinAmend(
  dir: string,
  qemuOpts: string,
  ours: Qcow2AmendOptions,
): Promise<{ qemu: { code: number; stderr: string }; ours: unknown }> {
  fs.copyFileSync(path.join(dir, "q.qcow2"), path.join(dir, "d.qcow2"));
  const q = qemuImg(["amend", "-f", "qcow2", "-o", qemuOpts, "q.qcow2"], dir);
  const image = await openRw(path.join(dir, "d.qcow2"));
  let err: unknown;
  try {
    await image.amend(ours);
  } catch (e) {
    err = e;
  } finally {
    await image.close();
  }
  return { qemu: { code: q.code, stderr: q.stderr }, ours: err };
}

/** `twinAmend`, and both amends succeed (`label` names the case in a failure). */
async function amendBoth(
  dir: string,
  qemuOpts: string,
  ours: Qcow2AmendOptions,
  label?: string,
): Promise<void> {
  const r = await twinAmend(dir, qemuOpts, ours);
  expect(r.qemu.code, `${label ?? qemuOpts}: ${r.qemu.stderr}`).toBe(0);
  expect(r.ours, label ?? qemuOpts).toBeUndefined();
}

describe.skipIf(!haveQemu)("amend: iotest 061 scenarios against qemu-img", () => {
  it("version downgrade with zero expansion (lazy refcounts on)", async () => {
    const d = freshDir();
    createQcow2In(d, "q.qcow2", "64M", "compat=1.1,lazy_refcounts=on");
    sh("qemu-io", ["-c", "write -z 0 128k", "q.qcow2"], d);
    await amendBoth(d, "compat=0.10", { compat: "0.10" });
    expect(facts(path.join(d, "d.qcow2"))).toEqual(facts(path.join(d, "q.qcow2")));
    expect(facts(path.join(d, "d.qcow2"))["version"]).toBe(2);
    expectTwinsRead(d, [[0, "0", "128k"]]);
    sh("qemu-img", ["compare", "q.qcow2", "d.qcow2"], d);
  });

  it("dirty version downgrade: the image is repaired and made clean first", async () => {
    const d = freshDir();
    createQcow2In(d, "q.qcow2", "64M", "compat=1.1,lazy_refcounts=on");
    tool("qemu-io", ["-c", "write -P 0x2a 0 128k", "-c", "flush", "-c", "abort", "q.qcow2"], d);
    expect(BigInt(facts(path.join(d, "q.qcow2"))["incompatible"] as string) & 1n).toBe(1n);
    await amendBoth(d, "compat=0.10", { compat: "0.10" });
    expect(facts(path.join(d, "d.qcow2"))).toEqual({ version: 2, size: 64 << 20 });
    expect(facts(path.join(d, "q.qcow2"))).toEqual({ version: 2, size: 64 << 20 });
    expectTwinsRead(d, [[0x2a, "0", "128k"]]);
  });

  it("version downgrade drops unknown compatible and autoclear bits", async () => {
    const d = freshDir();
    createQcow2In(d, "q.qcow2", "64M", "compat=1.1");
    const fd = fs.openSync(path.join(d, "q.qcow2"), "r+");
    const bit = Buffer.alloc(8);
    bit.writeBigUInt64BE(1n << 42n);
    fs.writeSync(fd, bit, 0, 8, 80);
    fs.writeSync(fd, bit, 0, 8, 88);
    fs.closeSync(fd);
    await amendBoth(d, "compat=0.10", { compat: "0.10" });
    expect(facts(path.join(d, "d.qcow2"))).toEqual(facts(path.join(d, "q.qcow2")));
    expectClean("d.qcow2", d);
  });

  it("version upgrade with lazy refcounts and a resize", async () => {
    const d = freshDir();
    createQcow2In(d, "q.qcow2", "64M", "compat=0.10");
    sh("qemu-io", ["-c", "write -P 0x2a 42M 64k", "q.qcow2"], d);
    await amendBoth(d, "compat=1.1,lazy_refcounts=on,size=128M", {
      compat: "1.1",
      lazyRefcounts: true,
      size: 128 << 20,
    });
    expect(facts(path.join(d, "d.qcow2"))).toEqual(facts(path.join(d, "q.qcow2")));
    expectTwinsRead(d, [[0x2a, "42M", "64k"]]);
    sh("qemu-img", ["compare", "q.qcow2", "d.qcow2"], d);
  });

  it("dirty lazy_refcounts=off", async () => {
    const d = freshDir();
    createQcow2In(d, "q.qcow2", "64M", "compat=1.1,lazy_refcounts=on");
    tool("qemu-io", ["-c", "write -P 0x2a 0 128k", "-c", "flush", "-c", "abort", "q.qcow2"], d);
    await amendBoth(d, "lazy_refcounts=off", { lazyRefcounts: false });
    expect(facts(path.join(d, "d.qcow2"))).toEqual(facts(path.join(d, "q.qcow2")));
    expect(facts(path.join(d, "d.qcow2"))["compatible"]).toBe("0");
    expect(facts(path.join(d, "d.qcow2"))["incompatible"]).toBe("0");
    expectTwinsRead(d, [[0x2a, "0", "128k"]]);
  });

  it("invalid configurations are refused as qemu-img refuses them, changing nothing", async () => {
    const d = freshDir();
    createQcow2In(d, "q.qcow2", "64M", "compat=0.10");
    const cases: [string, Qcow2AmendOptions][] = [
      ["lazy_refcounts=on", { lazyRefcounts: true }],
      ["compat=0.10,lazy_refcounts=on", { compat: "0.10", lazyRefcounts: true }],
      ["compat=0.42", { compat: "0.42" }],
      ["refcount_bits=8", { refcountBits: 8 }],
      ["refcount_bits=5", { refcountBits: 5 }],
      ["backing_file=foo", { backingFile: "foo" }],
    ];
    for (const [q, o] of cases) {
      const before = fs.readFileSync(path.join(d, "q.qcow2"));
      const r = await twinAmend(d, q, o);
      expect(r.qemu.code, q).toBe(1);
      const want = r.qemu.stderr.split("\n")[0]!.replace(/^qemu-img: /, "");
      expect(String((r.ours as Error | undefined)?.message), q).toBe(want);
      expect(fs.readFileSync(path.join(d, "d.qcow2")).equals(before), q).toBe(true);
    }
  });

  it("zero expansion on inactive clusters and on a shared L2 table", async () => {
    for (const overwrite of [true, false]) {
      const d = freshDir();
      createQcow2In(d, "q.qcow2", "64M", "compat=1.1");
      sh("qemu-io", ["-c", "write -z 0 128k", "q.qcow2"], d);
      sh("qemu-img", ["snapshot", "-c", "foo", "q.qcow2"], d);
      if (overwrite) sh("qemu-io", ["-c", "write -P 0x2a 0 128k", "q.qcow2"], d);
      await amendBoth(d, "compat=0.10", { compat: "0.10" });
      expectTwinsRead(d, [[overwrite ? 0x2a : 0, "0", "128k"]]);
      for (const f of TWINS) sh("qemu-img", ["snapshot", "-a", "foo", f], d);
      expectTwinsRead(d, [[0, "0", "128k"]]);
    }
  });

  it("zero expansion on a backed image (active, inactive, shared L2)", async () => {
    for (const variant of ["active", "inactive", "shared"] as const) {
      const d = freshDir();
      createQcow2In(d, "base.qcow2", "64M", "compat=1.1");
      sh("qemu-io", ["-c", "write -P 0x2a 0 128k", "base.qcow2"], d);
      createQcow2In(d, "q.qcow2", "64M", "compat=1.1", { file: "base.qcow2", format: "qcow2" });
      sh("qemu-io", ["-c", `write -z 0 ${variant === "shared" ? "128k" : "64k"}`, "q.qcow2"], d);
      if (variant !== "active") sh("qemu-img", ["snapshot", "-c", "foo", "q.qcow2"], d);
      if (variant === "inactive") sh("qemu-io", ["-c", "write -P 0x42 0 128k", "q.qcow2"], d);
      await amendBoth(d, "compat=0.10", { compat: "0.10" }, variant);
      sh("qemu-img", ["compare", "q.qcow2", "d.qcow2"], d);
      // The top zeroes 0..64k (0..128k when the L2 is shared) over the base's 0x2a.
      const zeroHead: Reads = [
        [0, "0", "64k"],
        [0x2a, "64k", "64k"],
      ];
      const zeros: Reads = [[0, "0", "128k"]];
      const inactive: Reads = [[0x42, "0", "128k"]];
      expectTwinsRead(d, { active: zeroHead, inactive, shared: zeros }[variant]);
      if (variant !== "active") {
        for (const f of TWINS) sh("qemu-img", ["snapshot", "-a", "foo", f], d);
        expectTwinsRead(d, variant === "shared" ? zeros : zeroHead);
      }
    }
  });

  it("preallocated zero expansion on a full image", async () => {
    const d = freshDir();
    createQcow2In(d, "q.qcow2", "16M", "compat=1.1");
    sh("qemu-io", ["-c", "write -P 0x2a 0 16M", "-c", "write -z 0 16M", "q.qcow2"], d);
    await amendBoth(d, "compat=0.10", { compat: "0.10" });
    expectTwinsRead(d, [[0, "0", "16M"]]);
    // Preallocated zero clusters are zeroed in place: the file does not grow.
    expect(fs.statSync(path.join(d, "d.qcow2")).size).toBe(
      fs.statSync(path.join(d, "q.qcow2")).size,
    );
  });
});

describe.skipIf(!haveQemu)("amend: refcount width", () => {
  it("every width from 16 and back, with snapshots and compressed clusters", async () => {
    const d = freshDir();
    createQcow2In(d, "q.qcow2", "3000k", "cluster_size=4096");
    sh(
      "qemu-io",
      ["-c", "write -P 1 0 200k", "-c", "write -c -P 3 1M 64k", "-c", "write -z 2M 64k", "q.qcow2"],
      d,
    );
    sh("qemu-img", ["snapshot", "-c", "a", "q.qcow2"], d);
    sh("qemu-img", ["snapshot", "-c", "b", "q.qcow2"], d);
    fs.copyFileSync(path.join(d, "q.qcow2"), path.join(d, "orig.qcow2"));
    let refused = 0;
    for (const bits of [64, 32, 8, 4, 2, 16]) {
      const before = fs.readFileSync(path.join(d, "q.qcow2"));
      const r = await twinAmend(d, `refcount_bits=${bits}`, { refcountBits: bits });
      if (r.qemu.code !== 0) {
        // Too narrow (16 compressed clusters share a host cluster, times 3 references).
        expect(r.qemu.stderr).toMatch(/Cannot decrease refcount entry width/);
        expect((r.ours as Error).message).toBe(r.qemu.stderr.trim().replace(/^qemu-img: /, ""));
        expect(fs.readFileSync(path.join(d, "d.qcow2")).equals(before)).toBe(true);
        refused++;
        continue;
      }
      expect(r.ours, String(bits)).toBeUndefined();
      expect(facts(path.join(d, "d.qcow2"))["refcountOrder"]).toBe(Math.log2(bits));
      expect(facts(path.join(d, "d.qcow2"))).toEqual(facts(path.join(d, "q.qcow2")));
      expectClean("d.qcow2", d);
      sh("qemu-img", ["compare", "orig.qcow2", "d.qcow2"], d);
      fs.copyFileSync(path.join(d, "d.qcow2"), path.join(d, "q.qcow2"));
    }
    expect(refused).toBe(2); // 4 and 2 bits
  });

  it("a width too narrow for an existing refcount is refused with qemu-img's numbers", async () => {
    const d = freshDir();
    createQcow2In(d, "q.qcow2", "1M");
    sh("qemu-io", ["-c", "write 0 64k", "q.qcow2"], d);
    for (const s of ["s1", "s2", "s3"]) sh("qemu-img", ["snapshot", "-c", s, "q.qcow2"], d);
    for (const bits of [1, 2]) {
      const before = fs.readFileSync(path.join(d, "q.qcow2"));
      const r = await twinAmend(d, `refcount_bits=${bits}`, { refcountBits: bits });
      expect(r.qemu.code).toBe(1);
      expect(r.qemu.stderr).toMatch(
        /Cannot decrease refcount entry width to \d bits: Cluster at offset 0x[0-9a-f]+ has a refcount of \d+/,
      );
      expect(String((r.ours as Error).message)).toBe(
        r.qemu.stderr.trim().replace(/^qemu-img: /, ""),
      );
      expect(fs.readFileSync(path.join(d, "d.qcow2")).equals(before)).toBe(true);
    }
  });

  it("a version 2 image with snapshots upgrades (snapshot table rewritten with v3 extra data)", async () => {
    const d = freshDir();
    createQcow2In(d, "q.qcow2", "300k", "compat=0.10,cluster_size=512");
    sh("qemu-io", ["-c", "write -P 5 0 100k", "q.qcow2"], d);
    sh("qemu-img", ["snapshot", "-c", "one", "q.qcow2"], d);
    sh("qemu-io", ["-c", "write -P 6 50k 100k", "q.qcow2"], d);
    await amendBoth(d, "compat=1.1,refcount_bits=8", { compat: "1.1", refcountBits: 8 });
    expect(facts(path.join(d, "d.qcow2"))).toEqual(facts(path.join(d, "q.qcow2")));
    const snaps = (f: string): unknown =>
      (
        JSON.parse(sh("qemu-img", ["info", "--output=json", f], d)) as {
          snapshots: { name: string; "vm-state-size": number }[];
        }
      ).snapshots.map((s) => [s.name, s["vm-state-size"]]);
    expect(snaps("d.qcow2")).toEqual(snaps("q.qcow2"));
    for (const f of TWINS) {
      expectClean(f, d);
      sh("qemu-img", ["snapshot", "-a", "one", f], d);
      expectReads(f, d, [[5, "0", "100k"]]);
    }
    const img = await openFile(path.join(d, "d.qcow2"));
    expect(img.snapshots[0]?.diskSize).toBe(300 << 10);
    await img.close();
  });
});

describe.skipIf(!haveQemu)("amend: the open image stays usable", () => {
  it("several amends on one open, then guest writes, zeroes and discards; qemu-img agrees", async () => {
    const d = freshDir();
    createQcow2In(d, "d.qcow2", "2M", "cluster_size=4096,lazy_refcounts=on");
    sh(
      "qemu-io",
      [
        "-c",
        "write -P 1 0 300k",
        "-c",
        "write -z 400k 64k",
        "-c",
        "write -c -P 2 1M 64k",
        "d.qcow2",
      ],
      d,
    );
    const image = await openRw(path.join(d, "d.qcow2"));
    const expected = new Uint8Array(3 << 20);
    try {
      await image.read(0, expected.subarray(0, 2 << 20));
      await image.amend({ refcountBits: 64 });
      await image.write(100 << 10, new Uint8Array(50 << 10).fill(7));
      expected.fill(7, 100 << 10, 150 << 10);
      await image.amend({ lazyRefcounts: false, refcountBits: 8, size: 3 << 20 });
      await image.write((2 << 20) + 4096, new Uint8Array(8192).fill(9));
      expected.fill(9, (2 << 20) + 4096, (2 << 20) + 12288);
      await image.amend({ compat: "0.10", refcountBits: 16 });
      await image.writeZeroes(0, 64 << 10);
      expected.fill(0, 0, 64 << 10);
      await image.discard(1 << 20, 64 << 10);
      expected.fill(0, 1 << 20, (1 << 20) + (64 << 10));
      await image.write(500 << 10, new Uint8Array(3000).fill(5));
      expected.fill(5, 500 << 10, (500 << 10) + 3000);
    } finally {
      await image.close();
    }
    expect(facts(path.join(d, "d.qcow2"))).toEqual({ version: 2, size: 3 << 20 });
    expectClean("d.qcow2", d);
    fs.writeFileSync(path.join(d, "want.raw"), expected);
    sh("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", "want.raw", "d.qcow2"], d);
  });
});

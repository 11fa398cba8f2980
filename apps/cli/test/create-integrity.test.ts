/**
 * qimg create (and resize) against qemu-img where images used to come out wrong or half-made:
 * preallocation with extended L2 entries over a backing file, small clusters with a backing
 * file, and every refused or failed create or resize, which must leave no new file and no
 * changed file behind.
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuInfo, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping qimg create integrity tests: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-create-integrity-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const SEED = Number(process.env.QIMG_SEED ?? 0x5eed10);

function randomBytes(n: number, seed: number): Uint8Array {
  const r = prng(seed);
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.floor(r() * 256);
  return out;
}

/** `qemu-img info --output=json` without the fields that differ between two files. */
function comparableInfo(file: string): Record<string, unknown> {
  const info = { ...qemuInfo(file, "qcow2", tmp) };
  delete info.filename;
  delete info["actual-size"];
  delete info["full-backing-filename"];
  return info;
}

function map(file: string): unknown {
  const r = qemuImg(["map", "--output=json", "-f", "qcow2", file], tmp);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

function expectClean(file: string): void {
  const r = qemuImg(["check", "--output=json", "-f", "qcow2", file], tmp);
  expect(r.code, r.stderr + r.stdout).toBe(0);
}

let n = 0;
/** Create twins with both tools; returns [qimg's, qemu-img's] paths. */
async function twins(args: readonly string[], size: string): Promise<[string, string]> {
  const id = n++;
  const ours = `q${id}.qcow2`;
  const theirs = `e${id}.qcow2`;
  const r = await qimg(["create", "-q", "-f", "qcow2", ...args, ours, size], tmp);
  const e = qemuImg(["create", "-q", "-f", "qcow2", ...args, theirs, size], tmp);
  expect(e.code, e.stderr).toBe(0);
  expect(r.code, r.stderr).toBe(0);
  return [ours, theirs];
}

/** The first `length` bytes of both files are the same (qemu-img's file may be shorter). */
function expectSamePrefix(ours: string, theirs: string): void {
  const a = readFileSync(join(tmp, ours));
  const b = readFileSync(join(tmp, theirs));
  expect(a.length).toBeGreaterThanOrEqual(b.length);
  expect(Buffer.compare(a.subarray(0, b.length), b), `${ours} vs ${theirs}`).toBe(0);
}

describe.skipIf(!hasQemu)("create with extended L2 entries and preallocation", () => {
  // Regression: qimg marked every subcluster allocated, so the backing file was hidden and
  // the new image read as zeros.
  it.each(["metadata", "falloc", "full"])(
    "preallocation=%s over a backing file leaves the subclusters unallocated, as QEMU",
    async (prealloc) => {
      const size = 3 * 65536 + 12345; // not a multiple of 512 or of the cluster
      const base = `base-${prealloc}.raw`;
      writeFileSync(join(tmp, base), randomBytes(size, SEED));
      const [ours, theirs] = await twins(
        ["-b", base, "-F", "raw", "-o", `extended_l2=on,preallocation=${prealloc}`],
        String(size),
      );
      // The backing file shows through: the new image reads the same as its backing file.
      const cmp = qemuImg(["compare", "-f", "raw", "-F", "qcow2", base, ours], tmp);
      expect(cmp.code, `seed ${SEED}: ${cmp.stdout}${cmp.stderr}`).toBe(0);
      expect(map(ours)).toEqual(map(theirs));
      expectClean(ours);
      expect(comparableInfo(ours)).toEqual(comparableInfo(theirs));
      // (falloc and full lay the refcount structures out differently from QEMU.)
      if (prealloc === "metadata") expectSamePrefix(ours, theirs);
      // A write sets the bits of the subclusters it covers and nothing else.
      const io = ["-f", "qcow2", "-c", "write -P 0x5a 3000 70001"];
      expect((await qimg(["io", ...io, ours], tmp)).code).toBe(0);
      expect(qemuIo([...io, theirs], tmp).code).toBe(0);
      expect(qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", ours, theirs], tmp).code).toBe(0);
      expect(map(ours)).toEqual(map(theirs));
      expectClean(ours);
    },
  );

  it("without a backing file, data_file_raw, and data files match qemu-img's bytes", async () => {
    for (const opts of [
      "extended_l2=on,preallocation=metadata",
      "data_file=DATA,data_file_raw=on",
      "data_file=DATA,extended_l2=on,preallocation=metadata",
      "data_file=DATA,preallocation=full",
    ]) {
      // Both images name the same data file (each tool creates it in turn).
      const [ours, theirs] = await twins(["-o", opts.replace("DATA", `d${n}.raw`)], "1000001");
      expectSamePrefix(ours, theirs);
      expectClean(ours);
      expect(map(ours)).toEqual(map(theirs));
    }
  });
});

describe.skipIf(!hasQemu)("create with small clusters and a backing file", () => {
  // Regression: qimg always wrote the feature-name table, which does not fit a 512-byte
  // cluster together with a backing file name ("need 538 bytes"), and left a partial file.
  it.each([512, 1024, 2048, 4096, 8192])(
    "cluster_size=%i: same header bytes and info as qemu-img, check clean",
    async (cs) => {
      const size = 5 * cs + 777;
      const base = `base-${cs}.raw`;
      writeFileSync(join(tmp, base), randomBytes(size, SEED + cs));
      for (const compat of ["0.10", "1.1"]) {
        const [ours, theirs] = await twins(
          ["-b", base, "-F", "raw", "-o", `cluster_size=${cs},compat=${compat}`],
          String(size),
        );
        expectSamePrefix(ours, theirs);
        expect(comparableInfo(ours)).toEqual(comparableInfo(theirs));
        expectClean(ours);
        const cmp = qemuImg(["compare", "-f", "raw", "-F", "qcow2", base, ours], tmp);
        expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
      }
    },
  );

  it("the longest backing file name that fits a 512-byte cluster works, one more fails", async () => {
    // v3 without the feature table: 112 header + 16 backing format + 8 end = 136 bytes.
    // v2: 72 + 16 + 8 = 96 bytes.
    for (const [compat, room] of [
      ["1.1", 512 - 136],
      ["0.10", 512 - 96],
    ] as const) {
      for (const len of [room, room + 1]) {
        const name = "b".repeat(len);
        const args = ["-u", "-b", name, "-F", "raw", "-o", `cluster_size=512,compat=${compat}`];
        const id = n++;
        const r = await qimg(["create", "-q", "-f", "qcow2", ...args, `q${id}.qcow2`, "1M"], tmp);
        const e = qemuImg(["create", "-q", "-f", "qcow2", ...args, `e${id}.qcow2`, "1M"], tmp);
        expect(r.code, `${compat} ${len}: ${r.stderr}`).toBe(e.code);
        expect(existsSync(join(tmp, `q${id}.qcow2`))).toBe(e.code === 0);
        if (e.code === 0) {
          expectSamePrefix(`q${id}.qcow2`, `e${id}.qcow2`);
        } else {
          expect(r.stderr).toBe(
            `qimg: q${id}.qcow2: Could not assign backing file '${name}' with format 'raw': No space left on device\n`,
          );
        }
      }
    }
  });
});

/** Option sets that both tools refuse (or fail on). `{}` names a missing file. */
const FAILING: readonly (readonly string[])[] = [
  ["-f", "qcow2", "-o", "cluster_size=1000", "1M"],
  ["-f", "qcow2", "-o", "cluster_size=256", "1M"],
  ["-f", "qcow2", "-b", "missing.raw", "-F", "raw"],
  ["-f", "qcow2", "-b", "missing.raw", "-F", "raw", "1M"],
  ["-f", "qcow2", "-o", "cluster_size=512", "64T"],
  ["-f", "qcow2", "-o", "compat=0.10,extended_l2=on", "1M"],
  ["-f", "qcow2", "-o", "extended_l2=on,cluster_size=8192", "1M"],
  ["-f", "qcow2", "-o", "refcount_bits=128", "1M"],
  ["-f", "qcow2", "-o", "refcount_bits=3", "1M"],
  ["-f", "qcow2", "-o", "preallocation=metadata", "-b", "base.raw", "-F", "raw", "1M"],
  ["-f", "qcow2", "-o", "preallocation=bogus", "1M"],
  ["-f", "qcow2", "-o", "data_file_raw=on", "1M"],
  ["-f", "qcow2", "-o", "compat=0.10,data_file=x.raw", "1M"],
  ["-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "1M"],
  ["-f", "qcow2", "-o", "data_file=nodir/x.raw", "1M"],
  ["-f", "qcow2", "-o", "cluster_size=512", "-u", "-b", "a".repeat(600), "-F", "raw", "1M"],
  ["-f", "qcow2", "-o", "cluster_size=512", "-u", "-b", "a".repeat(377), "-F", "raw", "1M"],
  ["-f", "qcow2", "-u", "-b", "a".repeat(1100), "-F", "raw", "1M"],
  ["-f", "qed", "-o", "cluster_size=1000", "1M"],
  ["-f", "qed", "-o", "table_size=3", "1M"],
  ["-f", "qed", "-b", "missing.raw", "-F", "raw", "1M"],
  ["-f", "raw", "-o", "preallocation=bogus", "1M"],
];

describe.skipIf(!hasQemu)("a refused create leaves nothing behind", () => {
  writeFileSync(join(tmp, "base.raw"), randomBytes(1 << 20, SEED));

  it.each(FAILING.map((a, i) => [i, a.join(" ").slice(0, 80), a] as const))(
    "#%i %s: no new file; an existing file stays as it was",
    async (i, _label, args) => {
      const old = randomBytes(3000 + i, SEED + i);
      for (const existing of [false, true]) {
        const ours = join(tmp, `fail-q${i}-${existing}.img`);
        const theirs = join(tmp, `fail-e${i}-${existing}.img`);
        if (existing) {
          writeFileSync(ours, old);
          writeFileSync(theirs, old);
        }
        const size = args.at(-1)!.match(/^\d+[MT]$/) ? [args.at(-1)!] : [];
        const opts = size.length ? args.slice(0, -1) : args;
        const e = qemuImg(["create", "-q", ...opts, theirs, ...size], tmp);
        const r = await qimg(["create", "-q", ...opts, ours, ...size], tmp);
        expect(e.code, `qemu-img accepted ${args.join(" ")}`).not.toBe(0);
        expect(r.code, r.stderr).toBe(1);
        expect(r.stderr.split("\n").filter(Boolean)).toHaveLength(1);
        if (!existing) {
          expect(existsSync(ours), `qimg left ${ours}: ${r.stderr}`).toBe(false);
        } else if (existsSync(theirs) && Buffer.compare(readFileSync(theirs), old) === 0) {
          // qemu-img left the file as it was: so must qimg.
          expect(Buffer.compare(readFileSync(ours), old), r.stderr).toBe(0);
        } else if (existsSync(ours)) {
          // qemu-img removed or changed it; qimg may keep it, but only unchanged.
          expect(Buffer.compare(readFileSync(ours), old), r.stderr).toBe(0);
        }
        expect(existsSync(join(tmp, "nodir"))).toBe(false);
      }
    },
  );
});

describe.skipIf(!hasQemu)("a data file that cannot be created", () => {
  it("fails with qemu-img's message, and the image file is not left behind", async () => {
    const args = ["create", "-q", "-f", "qcow2", "-o", "data_file=nodir/d.raw"];
    const e = qemuImg([...args, "df-e.qcow2", "1M"], tmp);
    const r = await qimg([...args, "df-q.qcow2", "1M"], tmp);
    expect(r.code).toBe(e.code);
    expect(r.stderr).toBe(e.stderr.replace("qemu-img: df-e.qcow2", "qimg: df-q.qcow2"));
    expect(existsSync(join(tmp, "df-q.qcow2"))).toBe(false);
    expect(existsSync(join(tmp, "df-e.qcow2"))).toBe(false);
  });
});

describe.skipIf(!hasQemu)("a refused resize changes nothing", () => {
  const cases: readonly {
    fmt: string;
    create?: string[];
    prepare?: (file: string) => void;
    args: string[];
  }[] = [
    { fmt: "qcow2", args: ["--", "-1M"] },
    { fmt: "qcow2", args: ["500000"] },
    { fmt: "qcow2", args: ["--shrink", "500000"] },
    { fmt: "qcow2", args: ["2000001"] },
    { fmt: "qcow2", args: ["--", "8E"] },
    { fmt: "qcow2", args: ["-f", "qed", "2M"] },
    { fmt: "qed", args: ["500000"] },
    { fmt: "qed", args: ["--shrink", "500000"] },
    { fmt: "qed", args: ["1P"] },
    { fmt: "qed", args: ["2000001"] },
    { fmt: "raw", args: ["-f", "raw", "--", "-2M"] },
    // A dirty image (lazy refcounts, QEMU aborted): a read-write open would repair it, so a
    // refused resize must decide before opening it for writing. (Regression: qimg changed it.)
    ...["abc", "500000"].map((size) => ({
      fmt: "qcow2",
      create: ["-o", "lazy_refcounts=on"],
      prepare: (file: string) => {
        qemuIo(["-f", "qcow2", "-c", "write 512k 64k", "-c", "abort", file]);
        expect(readFileSync(file).readUInt32BE(76) & 1, "dirty bit").toBe(1);
      },
      args: [size],
    })),
    {
      // Regression: qimg resized a v2 image with snapshots, which qemu-img refuses.
      fmt: "qcow2",
      create: ["-o", "compat=0.10"],
      prepare: (file) => expect(qemuImg(["snapshot", "-c", "s1", file]).code).toBe(0),
      args: ["2M"],
    },
  ];
  it.each(
    cases.map((c, i) => [i, `${c.fmt} ${(c.create ?? []).join(" ")} ${c.args.join(" ")}`, c]),
  )("#%i %s", async (i, _label, c) => {
    const files = [`rs-q${i}.${c.fmt}`, `rs-e${i}.${c.fmt}`].map((f) => join(tmp, f));
    for (const f of files) {
      const made = qemuImg(["create", "-q", "-f", c.fmt, ...(c.create ?? []), f, "1000000"]);
      expect(made.code, made.stderr).toBe(0);
      expect(qemuIo(["-f", c.fmt, "-c", "write -P 7 1000 100000", f]).code).toBe(0);
      c.prepare?.(f);
    }
    const before = readFileSync(files[0]!);
    const sizeArg = c.args.at(-1)!;
    const flags = c.args.slice(0, -1).filter((a) => a !== "--");
    const theirs = qemuImg(["resize", ...flags, files[1]!, "--", sizeArg], tmp);
    const ours = await qimg(["resize", ...flags, files[0]!, "--", sizeArg], tmp);
    expect(theirs.code, "qemu-img resized").not.toBe(0);
    expect(ours.code, ours.stdout).toBe(1);
    expect(Buffer.compare(readFileSync(files[0]!), before)).toBe(0);
  });
});

/** A 64 KiB tmpfs, where writes fail with ENOSPC part-way (needs root; skipped otherwise). */
function smallFileSystem(): string | undefined {
  const dir = mkdtempSync(join(tmp, "full-"));
  const r = spawnSync("mount", ["-t", "tmpfs", "-o", "size=64k", "tmpfs", dir], {
    encoding: "utf8",
  });
  return r.status === 0 ? dir : undefined;
}
const full = hasQemu && process.platform === "linux" ? smallFileSystem() : undefined;
if (full === undefined) console.log("skipping the disk-full create test: cannot mount a tmpfs");
afterAll(() => {
  if (full !== undefined) spawnSync("umount", [full]);
});

describe.skipIf(full === undefined)("a create that fails part-way (disk full)", () => {
  it.each([
    ["qcow2", ["-o", "preallocation=full"], "1M"],
    ["qcow2", ["-o", "cluster_size=512,preallocation=metadata"], "64M"],
    ["raw", ["-o", "preallocation=full"], "1M"],
    ["qed", ["-o", "table_size=16,cluster_size=1M"], "1M"],
  ] as const)(
    "%s %s %s: the half-made file is removed, as qemu-img removes it",
    async (fmt, o, size) => {
      for (const existing of [false, true]) {
        const ours = join(full!, `q.${fmt}`);
        const theirs = join(full!, `e.${fmt}`);
        if (existing) writeFileSync(ours, randomBytes(3000, SEED));
        const r = await qimg(["create", "-q", "-f", fmt, ...o, ours, size]);
        expect(r.code, r.stdout).toBe(1);
        expect(r.stderr).toMatch(/No space left on device|ENOSPC/);
        expect(existsSync(ours), `${fmt} ${o.join(" ")} existing=${existing}`).toBe(false);
        const e = qemuImg(["create", "-q", "-f", fmt, ...o, theirs, size]);
        expect(e.code).not.toBe(0);
        rmSync(theirs, { force: true });
      }
    },
  );
});

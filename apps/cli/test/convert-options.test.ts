/**
 * qimg convert's options against qemu-img 7.2: every refusal (bad -S / -m / -r values, -n
 * without a target, --target-is-zero without -n, -C with what qemu-img refuses it with, -o
 * with -n, -B without -F, --image-opts misuse, -l of a missing snapshot, --bitmaps to raw)
 * prints qemu-img's line with its exit code, and leaves no target behind (nor changes an
 * existing one). Then each option that works gives the same guest bytes and `qemu-img info`
 * facts as qemu-img's own convert, and a clean `qemu-img check`.
 */
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, qemuImg, qemuInfo, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping convert option tests: qemu-img is not on PATH");

const tmp = mkdtempSync(join(tmpdir(), "qimg-convopt-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

/**
 * qemu-img's stderr as qimg prints it: "qimg: ", its two-line messages on one line (a
 * sentence wrapped over two lines joined with a space, two messages with ". "), and the
 * target named as ours.
 */
function asQimg(stderr: string): string {
  return stderr
    .replace(/^qemu-img: /, "qimg: ")
    .replace(/ for\nqemu-img: kilobytes/g, " for kilobytes")
    .replace(/\nqemu-img: (?=.)/g, ". ")
    .replaceAll("t-theirs", "t-ours");
}

function sha(path: string): string | undefined {
  return existsSync(path)
    ? createHash("sha256").update(readFileSync(path)).digest("hex")
    : undefined;
}

function ok(args: string[]): void {
  const r = qemuImg(args, tmp);
  if (r.code !== 0) throw new Error(`qemu-img ${args.join(" ")}: ${r.stderr}`);
}

function io(file: string, ...cmds: string[]): void {
  const r = qemuIo(["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), file], tmp);
  if (r.code !== 0 || r.stdout.includes("error"))
    throw new Error(`qemu-io: ${r.stdout}${r.stderr}`);
}

describe.skipIf(!hasQemu)("convert options against qemu-img", () => {
  beforeAll(() => {
    // 1000000 bytes: not a multiple of 512 nor of the cluster.
    ok(["create", "-q", "-f", "qcow2", "base.qcow2", "1000000"]);
    io("base.qcow2", "write -P 7 0 1000000");
    ok(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "src.qcow2"]);
    io("src.qcow2", "write -P 1 64k 64k", "write -z 256k 64k", "write -c -P 2 512k 64k");
    ok(["snapshot", "-c", "s1", "src.qcow2"]);
    io("src.qcow2", "write -P 3 0 4k");
    ok(["create", "-q", "-f", "qcow2", "small.qcow2", "512k"]);
    ok(["create", "-q", "-f", "qcow2", "existing.qcow2", "2M"]);
    io("existing.qcow2", "write -P 9 0 2M");
    ok(["create", "-q", "-f", "qcow2", "nines.qcow2", "1000000"]);
    io("nines.qcow2", "write -P 9 0 1000000");
  });

  const refusals: string[][] = [
    ["-S", "foo"],
    ["-S", "100"],
    ["-S", "-1"],
    ["-S", "16777217"],
    ["-S", "1G"],
    ["-m", "0"],
    ["-m", "17"],
    ["-m", "abc"],
    ["-m", "08"],
    ["-m", "1.5"],
    ["-r", "abc"],
    ["-r", "-5"],
    ["-n"],
    ["--target-is-zero"],
    ["-C", "-c"],
    ["-C", "-S", "4k"],
    ["-C", "--salvage"],
    ["-C", "-S", "0", "-c"],
    ["-n", "-o", "cluster_size=4k"],
    ["-B", "base.qcow2"],
    ["-o", "backing_file=base.qcow2"],
    ["-F", "qcow2"],
    ["--target-image-opts"],
    ["--image-opts"],
    ["--image-opts", "-f", "qcow2"],
    ["-l", "nope"],
    ["-l", "snapshot.foo=1"],
    ["-l", "snapshot.id=1,snapshot.name=x"],
    ["--skip-broken-bitmaps"],
  ];
  for (const extra of refusals) {
    for (const out of ["qcow2", "raw"]) {
      it(`refuses ${extra.join(" ")} -O ${out} as qemu-img does`, async () => {
        const args = ["convert", ...extra, "-O", out, "src.qcow2"];
        const theirs = qemuImg([...args, "t-theirs"], tmp);
        const ours = await qimg([...args, "t-ours"], tmp);
        expect(theirs.code, theirs.stderr).toBe(1);
        expect(ours.code).toBe(1);
        expect(ours.stderr).toBe(asQimg(theirs.stderr));
        expect(existsSync(join(tmp, "t-ours")), "a refused convert leaves no target").toBe(false);
        rmSync(join(tmp, "t-theirs"), { force: true });
      });
    }
  }

  it("refuses -B with a raw target, --bitmaps to raw, and -n into a smaller or missing image", async () => {
    const cases: string[][] = [
      ["-B", "base.qcow2", "-F", "qcow2", "-O", "raw", "src.qcow2", "T"],
      ["-F", "qcow2", "-O", "raw", "src.qcow2", "T"],
      ["-n", "-O", "qcow2", "src.qcow2", "small.qcow2"],
      ["-n", "-O", "qcow2", "src.qcow2", "missing.qcow2"],
      [
        "-n",
        "--target-image-opts",
        "-O",
        "qcow2",
        "src.qcow2",
        "driver=qcow2,file.filename=existing.qcow2",
      ],
      ["--image-opts", "-O", "qcow2", "driver=qcow2", "T"],
      ["-l", "x", "-O", "qcow2", "base.qcow2", "T"],
      // -l is parsed with the options: refused before the source is looked at
      ["-l", "snapshot.foo=1", "-O", "qcow2", "missing.qcow2", "T"],
      ["-l", "snapshot.foo=1"],
    ];
    for (const args of cases) {
      const what = args.join(" ");
      const before = ["small.qcow2", "existing.qcow2"].map((f) => sha(join(tmp, f)));
      const theirs = qemuImg(["convert", ...args.map((a) => (a === "T" ? "t-theirs" : a))], tmp);
      const ours = await qimg(["convert", ...args.map((a) => (a === "T" ? "t-ours" : a))], tmp);
      expect(theirs.code, what).toBe(1);
      expect(ours.code, what).toBe(1);
      expect(ours.stderr, what).toBe(asQimg(theirs.stderr));
      expect(existsSync(join(tmp, "t-ours")), what).toBe(false);
      expect(
        ["small.qcow2", "existing.qcow2"].map((f) => sha(join(tmp, f))),
        what,
      ).toEqual(before);
      rmSync(join(tmp, "t-theirs"), { force: true });
    }
    // qemu-img finds that a raw target cannot hold bitmaps only once it made the file; qimg
    // says so first, with the same words, and makes nothing.
    const theirs = qemuImg(["convert", "--bitmaps", "-O", "raw", "src.qcow2", "b-theirs"], tmp);
    const ours = await qimg(["convert", "--bitmaps", "-O", "raw", "src.qcow2", "b-ours"], tmp);
    expect([ours.code, ours.stderr]).toEqual([theirs.code, asQimg(theirs.stderr)]);
    expect(existsSync(join(tmp, "b-ours"))).toBe(false);
  });

  it("-n -B --target-is-zero: qemu-img's message; qemu-img 7.2 then exits 0 (a bug), qimg 1", async () => {
    const args = [
      "convert",
      "-n",
      "-B",
      "base.qcow2",
      "--target-is-zero",
      "-O",
      "qcow2",
      "src.qcow2",
    ];
    const before = sha(join(tmp, "existing.qcow2"));
    const theirs = qemuImg([...args, "existing.qcow2"], tmp);
    const ours = await qimg([...args, "existing.qcow2"], tmp);
    expect(theirs.stderr).toBe(
      "qemu-img: Cannot use --target-is-zero when the destination image has a backing file\n",
    );
    expect(theirs.code).toBe(0);
    expect([ours.code, ours.stderr]).toEqual([1, asQimg(theirs.stderr)]);
    expect(sha(join(tmp, "existing.qcow2"))).toBe(before);
  });

  it("-C: qimg has no copy-offload path and says so, making nothing", async () => {
    const ours = await qimg(["convert", "-C", "-O", "qcow2", "src.qcow2", "c-ours"], tmp);
    expect(ours.code).toBe(1);
    expect(ours.stderr).toMatch(/^qimg: Copy offloading is not available: .*\n$/);
    expect(existsSync(join(tmp, "c-ours"))).toBe(false);
  });

  /** Both converts of `args` (T = target) succeed, read alike, and qemu-img finds them the same. */
  async function same(args: string[], format: string, prepare?: (target: string) => void) {
    const what = args.join(" ");
    const theirs = join(tmp, "same-theirs");
    const ours = join(tmp, "same-ours");
    for (const f of [theirs, ours]) rmSync(f, { force: true });
    prepare?.(theirs);
    prepare?.(ours);
    const name = (a: string, f: string) => (a === "T" ? f : a.replace(/=T$/, `=${f}`));
    const t = qemuImg(["convert", ...args.map((a) => name(a, theirs))], tmp);
    const o = await qimg(["convert", ...args.map((a) => name(a, ours))], tmp);
    expect(t.code, `${what}: ${t.stderr}`).toBe(0);
    expect([o.code, o.stderr, o.stdout], what).toEqual([0, "", t.stdout]);
    const cmp = qemuImg(["compare", "-f", format, "-F", format, theirs, ours]);
    expect(cmp.stdout, what).toBe("Images are identical.\n");
    const facts = (f: string) => {
      const i = qemuInfo(f, format);
      return [i["virtual-size"], i.format, i["backing-filename"], i["backing-filename-format"]];
    };
    expect(facts(ours), what).toEqual(facts(theirs));
    if (format !== "raw") expect(qemuImg(["check", "-f", format, ours]).code, what).toBe(0);
  }

  it("the options that work give qemu-img's bytes and facts", async () => {
    for (const out of ["qcow2", "qed", "raw"]) {
      await same(["-O", out, "-S", "0", "src.qcow2", "T"], out);
      await same(["-O", out, "-S", "64k", "src.qcow2", "T"], out);
      await same(["-O", out, "-S", "512", "-m", "16", "-W", "src.qcow2", "T"], out);
      await same(["-O", out, "-m", "1", "-r", "100M", "-q", "-p", "src.qcow2", "T"], out);
      await same(["-O", out, "-l", "s1", "src.qcow2", "T"], out);
      await same(["-O", out, "-l", "snapshot.id=1", "--salvage", "src.qcow2", "T"], out);
      await same(["--image-opts", "-O", out, "driver=qcow2,file.filename=src.qcow2", "T"], out);
    }
    for (const out of ["qcow2", "qed"]) {
      await same(["-O", out, "-B", "base.qcow2", "-F", "qcow2", "src.qcow2", "T"], out);
    }
    const existing = (t: string) => ok(["convert", "-O", "qcow2", "existing.qcow2", t]);
    await same(["-n", "-O", "qcow2", "src.qcow2", "T"], "qcow2", existing);
    await same(
      ["-n", "--target-image-opts", "src.qcow2", "driver=qcow2,file.filename=T"],
      "qcow2",
      existing,
    );
  });

  it("-n -B: qemu-img leaves the target's old bytes where the source has nothing of its own; qimg's target reads as the source", async () => {
    const run = async (target: string, prepare: string[][]) => {
      for (const f of ["n-theirs", "n-ours"]) {
        rmSync(join(tmp, f), { force: true });
        for (const args of prepare) ok(args.map((a) => (a === "T" ? f : a)));
      }
      const args = ["convert", "-n", "-B", "base.qcow2", "-O", "qcow2", "src.qcow2"];
      expect(qemuImg([...args, "n-theirs"], tmp).code).toBe(0);
      const ours = await qimg([...args, "n-ours"], tmp);
      expect([ours.code, ours.stderr], target).toEqual([0, ""]);
      expect(qemuImg(["compare", "src.qcow2", "n-ours"], tmp).stdout, target).toBe(
        "Images are identical.\n",
      );
      expect(qemuImg(["check", "n-ours"], tmp).code, target).toBe(0);
      return qemuImg(["compare", "src.qcow2", "n-theirs"], tmp).stdout;
    };
    // An image of its own (no backing file, the source's size), full of 9s.
    expect(await run("plain", [["convert", "-O", "qcow2", "nines.qcow2", "T"]])).toMatch(
      /Content mismatch/,
    );
    // An overlay of base with data of its own where the source takes base's bytes.
    const overlay = [
      ["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "T"],
      ["convert", "-n", "-O", "qcow2", "nines.qcow2", "T"],
    ];
    expect(await run("overlay", overlay)).toMatch(/Content mismatch/);
  });

  it("-p stays a climbing percentage ending at 100 with -m and -W; -q silences it", async () => {
    ok(["create", "-q", "-f", "qcow2", "prog.qcow2", "9000000"]);
    io("prog.qcow2", "write -P 1 0 3M", "write -P 2 5M 3M");
    for (const extra of [[], ["-m", "16", "-W"], ["-m", "1"]]) {
      const ours = await qimg(
        ["convert", "-p", ...extra, "-O", "qcow2", "prog.qcow2", "p.qcow2"],
        tmp,
      );
      expect(ours.code).toBe(0);
      const values = [...ours.stdout.matchAll(/\((\d+\.\d\d)\/100%\)\r/g)].map((m) => Number(m[1]));
      expect(values.length, extra.join(" ")).toBeGreaterThan(2);
      expect(values, extra.join(" ")).toEqual([...values].sort((a, b) => a - b));
      expect(values.at(-1)).toBe(100);
      expect(ours.stdout.endsWith("\r\n")).toBe(true);
      expect(qemuImg(["compare", "prog.qcow2", "p.qcow2"], tmp).code).toBe(0);
    }
    const quiet = await qimg(["convert", "-p", "-q", "-O", "qcow2", "prog.qcow2", "p.qcow2"], tmp);
    const theirs = qemuImg(["convert", "-p", "-q", "-O", "qcow2", "prog.qcow2", "p2.qcow2"], tmp);
    expect([quiet.code, quiet.stdout, quiet.stderr]).toEqual([0, theirs.stdout, ""]);
  });

  it("-r slows the copy to the rate (same bytes as qemu-img)", async () => {
    ok(["create", "-q", "-f", "qcow2", "rate.qcow2", "4M"]);
    io("rate.qcow2", "write -P 3 0 4M");
    const t0 = performance.now();
    const ours = await qimg(["convert", "-r", "4M", "-O", "raw", "rate.qcow2", "r-ours"], tmp);
    const took = performance.now() - t0;
    expect(ours.code).toBe(0);
    // 2 MiB go at once (the first request of a slice), the other 2 MiB owe 0.5 s at 4 MiB/s.
    expect(took).toBeGreaterThanOrEqual(400);
    expect(qemuImg(["convert", "-r", "4M", "-O", "raw", "rate.qcow2", "r-theirs"], tmp).code).toBe(
      0,
    );
    expect(qemuImg(["compare", "-f", "raw", "-F", "raw", "r-theirs", "r-ours"], tmp).code).toBe(0);
  });

  it("-B with another file than the source's backing: inherited ranges are compared, never trusted", async () => {
    // A copy of base (same bytes, another file) and a changed copy.
    ok(["convert", "-O", "qcow2", "base.qcow2", "base-copy.qcow2"]);
    ok(["convert", "-O", "qcow2", "base.qcow2", "base-changed.qcow2"]);
    io("base-changed.qcow2", "write -P 8 700k 100k");
    const own = (file: string) =>
      (
        JSON.parse(qemuImg(["map", "--output=json", file], tmp).stdout) as {
          start: number;
          length: number;
          depth: number;
          data: boolean;
        }[]
      )
        .filter((e) => e.depth === 0 && e.data)
        .map((e): [number, number] => [e.start, e.start + e.length]);
    for (const [backing, name] of [
      ["base-copy.qcow2", "b-copy"],
      ["base-changed.qcow2", "b-changed"],
    ] as const) {
      const args = ["convert", "-B", backing, "-F", "qcow2", "-O", "qcow2", "src.qcow2"];
      const ours = await qimg([...args, `${name}-ours`], tmp);
      expect([ours.code, ours.stderr], backing).toEqual([0, ""]);
      expect(qemuImg(["compare", "src.qcow2", `${name}-ours`], tmp).stdout, backing).toBe(
        "Images are identical.\n",
      );
      expect(qemuImg(["check", `${name}-ours`], tmp).code, backing).toBe(0);
      ok([...args, `${name}-theirs`]);
      const theirsCmp = qemuImg(["compare", "src.qcow2", `${name}-theirs`], tmp).stdout;
      if (name === "b-copy") {
        // Same bytes: the overlay stores what qemu-img's stores.
        expect(theirsCmp).toBe("Images are identical.\n");
        expect(own(`${name}-ours`)).toEqual(own(`${name}-theirs`));
      } else {
        // qemu-img trusts the new backing file and its result shows the change; qimg writes
        // the range and stores no more than the source's own data and that range.
        expect(theirsCmp).toMatch(/Content mismatch/);
        const mine = own(`${name}-ours`);
        expect(mine.some(([a, b]) => a < 819200 && b > 716800)).toBe(true);
        for (const [a, b] of own(`${name}-theirs`)) {
          expect(mine.some(([x, y]) => x <= a && y >= b)).toBe(true);
        }
      }
    }
  });

  it("-n -c compresses into an empty existing image, as qemu-img", async () => {
    const prepare = (t: string) => ok(["create", "-q", "-f", "qcow2", t, "1000000"]);
    await same(["-n", "-c", "-O", "qcow2", "src.qcow2", "T"], "qcow2", prepare);
  });
});

/**
 * `qimg bitmap` against `qemu-img bitmap` 7.2 on twin images: the same commands (and the
 * same guest writes, through `qimg io` and `qemu-io`) on both; afterwards qemu-img info
 * lists the same bitmaps with the same flags and granularities, qemu-img check is clean on
 * both, and qemu-nbd -B NAME + nbdinfo --map=qemu:dirty-bitmap:NAME read the same dirty
 * ranges. Every command's exit code and message are compared as it runs; a refused qimg
 * command leaves its file byte-identical.
 */
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { seededRandom } from "@qimg/io";
import { qimg } from "./helpers.js";
import { hasQemu } from "./qemu.js";

interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

function run(tool: string, args: readonly string[]): Run {
  const r = spawnSync(tool, args, { encoding: "utf8", env: { ...process.env, LC_ALL: "C" } });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

function must(tool: string, args: readonly string[]): string {
  const r = run(tool, args);
  if (r.code !== 0) throw new Error(`${tool} ${args.join(" ")}: exit ${r.code}: ${r.stderr}`);
  return r.stdout;
}

const haveQemu = hasQemu;
const haveNbd =
  haveQemu && run("nbdinfo", ["--version"]).code === 0 && run("qemu-nbd", ["--version"]).code === 0;
if (!haveQemu) console.log("bitmap-twins.test: qemu-img not found, skipping");
else if (!haveNbd)
  console.log("bitmap-twins.test: nbdinfo/qemu-nbd not found, skipping the NBD comparisons");
if (process.env.QIMG_REQUIRE_NBD === "1" && !haveNbd) throw new Error("nbdinfo/qemu-nbd required");
const LONG = process.env.QIMG_LONG === "1";
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-bitmap-twins-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** qemu-img's messages in qimg's words: the tool name, and the random block node name. */
function normalize(text: string, file: string, twin: string): string {
  return text
    .replaceAll(/^qemu-img: /gm, "qimg: ")
    .replaceAll(/#block\d+/g, "#blockN")
    .replaceAll(twin, file);
}

interface BitmapFacts {
  name: string;
  granularity: number;
  flags: string[];
}

function infoBitmaps(file: string): BitmapFacts[] {
  const info = JSON.parse(must("qemu-img", ["info", "-U", "--output=json", file])) as {
    "format-specific"?: { data?: { bitmaps?: BitmapFacts[] } };
  };
  return info["format-specific"]?.data?.bitmaps ?? [];
}

/** Dirty ranges of each consistent bitmap through qemu-nbd -B and nbdinfo --map. */
function nbdRanges(file: string, names: readonly string[]): Record<string, [number, number][]> {
  const out: Record<string, [number, number][]> = {};
  if (names.length === 0) return out;
  const sock = path.join(tmp, `nbd-${Math.random().toString(36).slice(2)}.sock`);
  const pidFile = `${sock}.pid`;
  must("qemu-nbd", [
    ...["-t", "-r", "-f", "qcow2", "-k", sock],
    ...names.flatMap((n) => ["-B", n]),
    ...["--fork", `--pid-file=${pidFile}`, file],
  ]);
  try {
    for (const name of names) {
      const map = JSON.parse(
        must("nbdinfo", [
          "--json",
          `--map=qemu:dirty-bitmap:${name}`,
          `nbd+unix:///?socket=${sock}`,
        ]),
      ) as { offset: number; length: number; type: number }[];
      out[name] = map.filter((e) => (e.type & 1) !== 0).map((e) => [e.offset, e.length]);
    }
  } finally {
    const pid = Number(fs.readFileSync(pidFile, "utf8").trim());
    if (pid > 0) process.kill(pid, "SIGTERM");
    fs.rmSync(sock, { force: true });
    fs.rmSync(pidFile, { force: true });
  }
  return out;
}

interface Pair {
  readonly ours: string;
  readonly theirs: string;
}

/** Twins `PREFIX-ours.EXT` and `PREFIX-theirs.EXT` in the scratch directory: copies of `from`. */
function twinsOf(from: string, prefix: string): Pair {
  const ext = path.extname(from);
  const pair = {
    ours: path.join(tmp, `${prefix}-ours${ext}`),
    theirs: path.join(tmp, `${prefix}-theirs${ext}`),
  };
  fs.copyFileSync(from, pair.ours);
  fs.copyFileSync(from, pair.theirs);
  return pair;
}

/** Run `qimg bitmap ARGS ours` and `qemu-img bitmap ARGS theirs`; compare what they say. */
async function bitmapBoth(
  pair: Pair,
  args: readonly string[],
  bitmap: string,
  where: string,
): Promise<number> {
  const before = fs.readFileSync(pair.ours);
  const mine = await qimg(["bitmap", ...args, pair.ours, bitmap]);
  const theirs = run("qemu-img", ["bitmap", ...args, pair.theirs, bitmap]);
  const what = `${where}: bitmap ${args.join(" ")} ${bitmap}`;
  expect(mine.code, `${what}: ${mine.stderr} / ${theirs.stderr}`).toBe(theirs.code);
  expect(normalize(mine.stderr, pair.ours, pair.theirs), what).toBe(
    normalize(theirs.stderr, pair.ours, pair.theirs),
  );
  expect(mine.stdout, what).toBe(theirs.stdout);
  if (mine.code !== 0) {
    expect(
      fs.readFileSync(pair.ours).equals(before),
      `${what}: refused, yet the file changed`,
    ).toBe(true);
  }
  return mine.code;
}

async function compareTwins(pair: Pair, where: string): Promise<void> {
  const ours = infoBitmaps(pair.ours);
  expect(ours, `${where}: qemu-img info bitmaps`).toEqual(infoBitmaps(pair.theirs));
  for (const f of [pair.ours, pair.theirs]) {
    const c = run("qemu-img", ["check", "-U", f]);
    expect(c.code, `${where}: qemu-img check ${f}: ${c.stdout}${c.stderr}`).toBe(0);
    expect(c.stdout, `${where}: ${f}`).toContain("No errors were found on the image.");
    expect(c.stdout, `${where}: ${f}`).not.toContain("leaked");
  }
  if (haveNbd) {
    const names = ours.filter((b) => !b.flags.includes("in-use")).map((b) => b.name);
    expect(nbdRanges(pair.ours, names), `${where}: nbdinfo dirty ranges`).toEqual(
      nbdRanges(pair.theirs, names),
    );
  }
}

describe.skipIf(!haveQemu)("qimg bitmap on twins of qemu-img bitmap", () => {
  const cases = LONG ? 80 : 6;
  it(
    `random writes and bitmap commands look to qemu-img as its own (${cases} seeds)`,
    async () => {
      for (let i = 0; i < cases; i++) {
        const seed = 4242 + i * 101;
        await twinSequence(seed);
      }
    },
    LONG ? 1_800_000 : 240_000,
  );

  it("errors and exit codes are qemu-img's, and a refused command changes nothing", async () => {
    const base = path.join(tmp, "err-base.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", base, "3M"]);
    must("qemu-img", ["bitmap", "--add", base, "a"]);
    must("qemu-img", ["bitmap", "--add", "-g", "4k", base, "b"]);
    must("qemu-io", ["-f", "qcow2", "-c", "write 1000 5000", base]);
    const broken = path.join(tmp, "err-broken.qcow2");
    fs.copyFileSync(base, broken);
    run("qemu-io", ["-f", "qcow2", "-c", "write 0 512", "-c", "abort", broken]);
    const other = path.join(tmp, "err-other.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", other, "3M"]);
    must("qemu-img", ["bitmap", "--add", other, "ext"]);
    const bigger = path.join(tmp, "err-bigger.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", bigger, "4M"]);
    must("qemu-img", ["bitmap", "--add", bigger, "ext"]);
    const v2 = path.join(tmp, "err-v2.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M"]);
    const qed = path.join(tmp, "err.qed");
    must("qemu-img", ["create", "-q", "-f", "qed", qed, "1M"]);
    const raw = path.join(tmp, "err.raw");
    must("qemu-img", ["create", "-q", "-f", "raw", raw, "1M"]);
    const cases: [from: string, args: string[], bitmap: string][] = [
      [base, ["--add"], "a"],
      [base, ["--add"], ""],
      [base, ["--add", "-g", "256"], "c"],
      [base, ["--add", "-g", "3000"], "c"],
      [base, ["--add", "-g", "8G"], "c"],
      [base, ["--add", "-g", "-1"], "c"],
      [base, ["--add", "-g", "abc"], "c"],
      [base, ["--add"], "n".repeat(1024)],
      [base, ["--remove"], "nope"],
      [base, ["--clear"], "nope"],
      [base, ["--enable"], "nope"],
      [base, ["--disable"], "nope"],
      [base, ["--merge", "nope"], "a"],
      [base, ["--merge", "a"], "nope"],
      [base, ["--merge", "zz", "-b", other], "a"],
      [base, ["--merge", "ext", "-b", bigger], "a"],
      [base, ["--merge", "ext", "-b", other, "-F", "raw"], "a"],
      [base, ["--clear", "-g", "1M"], "a"],
      [base, ["--add", "-F", "qcow2"], "c"],
      [base, ["--add", "-b", other], "c"],
      [base, [], "a"],
      [base, ["--add", "extra-argument"], "c"],
      [base, ["--disable", "--add"], "c"],
      [broken, ["--merge", "a"], "b"],
      [broken, ["--merge", "a"], "a"],
      [broken, ["--clear"], "a"],
      [broken, ["--enable"], "b"],
      [broken, ["--disable"], "b"],
      [broken, ["--add"], "a"],
      [v2, ["--add"], "b"],
      [qed, ["--add"], "b"],
      [qed, ["--remove"], "b"],
      [qed, ["-f", "qed", "--merge", "x"], "b"],
      [raw, ["-f", "raw", "--add"], "b"],
      [raw, ["--enable"], "b"],
    ];
    let n = 0;
    for (const [from, args, bitmap] of cases) {
      const pair = twinsOf(from, `err-${n}`);
      n++;
      expect(await bitmapBoth(pair, args, bitmap, `case ${n}`), `case ${n} must fail`).toBe(1);
    }
    // Two lines of usage text each, as qemu-img words them.
    const usage = await qimg(["bitmap", "--add", base]);
    expect(usage.stderr).toBe("qimg: Expecting filename and bitmap name\n");
  });

  it("an image another process holds is refused at the open, before any action, as qemu-img refuses it", async () => {
    const file = path.join(tmp, "locked.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", file, "1M"]);
    must("qemu-img", ["bitmap", "--add", file, "b"]);
    const sock = path.join(tmp, "locked.sock");
    const pidFile = `${sock}.pid`;
    must("qemu-nbd", ["-f", "qcow2", "-k", sock, "--fork", `--pid-file=${pidFile}`, file]);
    try {
      const before = fs.readFileSync(file);
      for (const args of [["--add"], ["--remove"], ["--merge", "nope"]]) {
        const theirs = run("qemu-img", ["bitmap", ...args, file, "x"]);
        const mine = await qimg(["bitmap", ...args, file, "x"]);
        expect(mine.code).toBe(theirs.code);
        expect(theirs.stderr).toContain('Failed to get "write" lock');
        expect(mine.stderr).toContain('Failed to get "write" lock');
        expect(fs.readFileSync(file).equals(before)).toBe(true);
      }
    } finally {
      const pid = Number(fs.readFileSync(pidFile, "utf8").trim());
      if (pid > 0) process.kill(pid, "SIGTERM");
    }
  });

  it("works without the backing chain, as qemu-img bitmap does (a missing backing file is no obstacle)", async () => {
    const base = path.join(tmp, "nb-base.qcow2");
    const top = path.join(tmp, "nb-top.qcow2");
    const src = path.join(tmp, "nb-src.qcow2");
    const srcBase = path.join(tmp, "nb-src-base.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", base, "2M"]);
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "2M"]);
    must("qemu-img", ["create", "-q", "-f", "qcow2", srcBase, "2M"]);
    must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", srcBase, "-F", "qcow2", src, "2M"]);
    must("qemu-img", ["bitmap", "--add", "-g", "4k", src, "s"]);
    must("qemu-io", ["-f", "qcow2", "-c", "write 70000 1", src]);
    fs.renameSync(base, `${base}.away`);
    fs.renameSync(srcBase, `${srcBase}.away`);
    const pair = twinsOf(top, "nb");
    expect(await bitmapBoth(pair, ["--add"], "b", "no backing")).toBe(0);
    expect(await bitmapBoth(pair, ["--merge", "s", "-b", src], "b", "no backing")).toBe(0);
    expect(infoBitmaps(pair.ours)).toEqual(infoBitmaps(pair.theirs));
    // qemu-nbd needs the backing file back.
    fs.renameSync(`${base}.away`, base);
    if (haveNbd) expect(nbdRanges(pair.ours, ["b"])).toEqual(nbdRanges(pair.theirs, ["b"]));
  });

  it("--object secret is accepted (and unused), other objects are refused as qemu-img refuses unknown ones", async () => {
    const file = path.join(tmp, "obj.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", file, "1M"]);
    const pair = twinsOf(file, "obj");
    expect(
      await bitmapBoth(pair, ["--add", "--object", "secret,id=s0,data=x"], "b", "secret"),
    ).toBe(0);
    expect(await bitmapBoth(pair, ["--add", "--object", "foo,id=x"], "c", "unknown object")).toBe(
      1,
    );
    await compareTwins(pair, "objects");
  });

  it("an inconsistent bitmap is removed as qemu-img removes it", async () => {
    const base = path.join(tmp, "rm-base.qcow2");
    must("qemu-img", ["create", "-q", "-f", "qcow2", base, "2M"]);
    must("qemu-img", ["bitmap", "--add", base, "iu"]);
    must("qemu-img", ["bitmap", "--add", "-g", "1M", base, "other"]);
    run("qemu-io", ["-f", "qcow2", "-c", "write 0 70000", "-c", "abort", base]);
    const pair = twinsOf(base, "rm");
    expect(await bitmapBoth(pair, ["--remove"], "iu", "remove in-use")).toBe(0);
    expect(await bitmapBoth(pair, ["--remove"], "other", "remove in-use")).toBe(0);
    await compareTwins(pair, "after removing the inconsistent bitmaps");
    expect(infoBitmaps(pair.ours)).toEqual([]);
  });
});

/** One seeded sequence of writes and bitmap commands on twins. */
async function twinSequence(seed: number): Promise<void> {
  const r = seededRandom(seed);
  const where = `seed ${seed}`;
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;
  const cs = 2 ** (9 + Math.floor(r() * 8));
  const size = 512 * (1 + Math.floor(r() * 12000)) + pick([0, 512, 1536]);
  const first = path.join(tmp, `twin-${seed}.qcow2`);
  must("qemu-img", ["create", "-q", "-f", "qcow2", "-o", `cluster_size=${cs}`, first, `${size}`]);
  const pair = twinsOf(first, `twin-${seed}`);
  // Another image of the same size, with a dirty bitmap, for --merge -b.
  const other = path.join(tmp, `twin-${seed}-other.qcow2`);
  must("qemu-img", ["create", "-q", "-f", "qcow2", other, String(size)]);
  must("qemu-img", [
    "bitmap",
    "--add",
    "-g",
    String(2 ** (9 + Math.floor(r() * 10))),
    other,
    "ext",
  ]);
  must("qemu-io", ["-f", "qcow2", "-c", `write ${Math.floor(r() * (size - 1))} 1`, other]);
  const names = new Set<string>();
  let counter = 0;
  const steps = 6 + Math.floor(r() * 10);
  try {
    for (let s = 0; s < steps; s++) {
      const at = `${where} step ${s}`;
      const choice = r();
      if (choice < 0.35) {
        const off = Math.floor(r() * size);
        const len = Math.max(1, Math.min(size - off, Math.floor(r() * 150_000)));
        const cmd = r() < 0.7 ? `write -P ${1 + s} ${off} ${len}` : `write -z ${off} ${len}`;
        must("qemu-io", ["-f", "qcow2", "-c", cmd, pair.theirs]);
        const mine = await qimg(["io", "-f", "qcow2", "-c", cmd, pair.ours]);
        expect(mine.code, `${at}: qimg io ${cmd}: ${mine.stderr}`).toBe(0);
        continue;
      }
      if (choice < 0.5) {
        // A command that fails at its first action (qemu-img then changes no bitmap).
        const existing = [...names];
        const bad: [string[], string][] = [
          [["--remove"], `missing${s}`],
          [["--merge", `missing${s}`], existing[0] ?? "x"],
          [["--enable"], `missing${s}`],
          [["--add", "-g", pick(["100", "1000", "3k"])], `new${s}`],
        ];
        if (existing.length > 0) bad.push([["--add"], pick(existing)]);
        const [args, bitmap] = pick(bad);
        expect(await bitmapBoth(pair, args, bitmap, at)).toBe(1);
        continue;
      }
      // A valid command of 1..3 actions on one bitmap.
      const target = names.size > 0 && r() < 0.7 ? pick([...names]) : `bm${counter++}`;
      let exists = names.has(target);
      const args: string[] = [];
      let useOther = false;
      let granularity: string | undefined;
      for (let k = 0, n = 1 + Math.floor(r() * 3); k < n; k++) {
        if (!exists) {
          args.push("--add");
          if (r() < 0.6) granularity = String(2 ** (9 + Math.floor(r() * 14)));
          exists = true;
          continue;
        }
        const act = pick(["remove", "clear", "enable", "disable", "merge", "merge-b"] as const);
        if (act === "remove") {
          if (k < n - 1) continue;
          args.push("--remove");
          exists = false;
        } else if (act === "merge") {
          args.push(
            "--merge",
            pick([...names, target].filter((x) => names.has(x) || x === target)),
          );
        } else if (act === "merge-b") {
          if (useOther) continue;
          args.push("--merge", "ext");
          useOther = true;
        } else args.push(`--${act}`);
      }
      if (args.length === 0) continue;
      if (useOther) {
        // With -b every merge source comes from that file.
        for (let k = 0; k < args.length; k++) if (args[k] === "--merge") args[k + 1] = "ext";
        args.push("-b", other);
      }
      if (granularity !== undefined) args.push("-g", granularity);
      expect(await bitmapBoth(pair, args, target, at)).toBe(0);
      if (exists) names.add(target);
      else names.delete(target);
    }
    await compareTwins(pair, where);
  } catch (e) {
    console.log(`bitmap-twins: failing seed ${seed}`);
    throw e;
  }
}

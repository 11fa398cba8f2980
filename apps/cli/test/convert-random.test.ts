/**
 * Randomized differential test of convert's -n, --target-is-zero, -B/-F, -S, -m and -W against
 * qemu-img 7.2: seeded sources (qcow2, QED or raw; sizes that are not multiples of 512 or of
 * the cluster; data, zero, compressed and unallocated clusters; often an overlay of a backing
 * file) are converted by both with the same drawn options; the results must read alike (and
 * as the source), have the same `qemu-img info` facts, pass `qemu-img check`, and with -B hold
 * data in the same places (`qemu-img map`: what the overlay stores itself).
 *
 * A fixed slice of seeds by default; QIMG_LONG=1 runs more; QIMG_SEED=n replays one.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuInfo, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping randomized convert tests: qemu-img is not on PATH");

const LONG = process.env.QIMG_LONG === "1";
const SEEDS =
  process.env.QIMG_SEED !== undefined
    ? [Number(process.env.QIMG_SEED)]
    : Array.from({ length: LONG ? 300 : 30 }, (_, i) => 1000 + i);

const tmp = mkdtempSync(join(tmpdir(), "qimg-convrand-"));
afterAll(() => {
  if (process.env.QIMG_KEEP !== "1") rmSync(tmp, { recursive: true, force: true });
});

function ok(args: string[], cwd: string): string {
  const r = qemuImg(args, cwd);
  if (r.code !== 0) throw new Error(`qemu-img ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
}

function io(file: string, format: string, cmds: string[], cwd: string): void {
  for (let i = 0; i < cmds.length; i += 40) {
    const part = cmds.slice(i, i + 40);
    const r = qemuIo(["-f", format, ...part.flatMap((c) => ["-c", c]), file], cwd);
    if (r.code !== 0 || /error|failed/i.test(r.stdout + r.stderr)) {
      throw new Error(`qemu-io ${part.join("; ")}: ${r.stdout}${r.stderr}`);
    }
  }
}

/**
 * Random qemu-io writes over `size` bytes: compressed clusters first (qcow2; qemu cannot
 * compress over an allocated cluster), then data and zeros.
 */
function writes(rnd: () => number, size: number, cluster: number, format: string): string[] {
  const out: string[] = [];
  if (format === "qcow2" && size >= 2 * cluster) {
    const used = new Set<number>();
    const k = Math.floor(rnd() * 4);
    for (let i = 0; i < k; i++) {
      // A whole cluster (never the last, possibly partial one), each at most once.
      const c = Math.floor(rnd() * (Math.floor(size / cluster) - 1));
      if (used.has(c)) continue;
      used.add(c);
      out.push(`write -c -P ${1 + Math.floor(rnd() * 250)} ${c * cluster} ${cluster}`);
    }
  }
  const n = 3 + Math.floor(rnd() * 10);
  for (let i = 0; i < n; i++) {
    const kind = rnd();
    const off = Math.floor((rnd() * size) / 512) * 512;
    const len = Math.min(size - off, 512 * (1 + Math.floor(rnd() * 400)));
    if (len <= 0) continue;
    if (kind < 0.3) out.push(`write -z ${off} ${len}`);
    else if (kind < 0.4) out.push(`write -P 0 ${off} ${len}`);
    else out.push(`write -P ${1 + Math.floor(rnd() * 250)} ${off} ${len}`);
  }
  return out;
}

interface Case {
  readonly dir: string;
  readonly source: string;
  readonly sourceFormat: string;
  readonly base: string | undefined;
  readonly baseFormat: string | undefined;
  readonly size: number;
  readonly args: string[];
  readonly outFormat: string;
  /** Make the -n target (called with its path). */
  readonly prepare: ((target: string) => void) | undefined;
  readonly describe: string;
}

function draw(seed: number): Case {
  const rnd = prng(seed);
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)]!;
  const dir = join(tmp, `s${seed}`);
  mkdirSync(dir, { recursive: true });
  const cluster = pick([4096, 16384, 65536]);
  // Not a multiple of 512 (qcow2 and QED round up; raw keeps it) nor of the cluster.
  const size = cluster * (8 + Math.floor(rnd() * 40)) + 1 + Math.floor(rnd() * 70000);
  const sourceFormat = pick(["qcow2", "qcow2", "qed", "raw"]);
  const withBase = sourceFormat !== "raw" && rnd() < 0.7;
  let base: string | undefined;
  let baseFormat: string | undefined;
  if (withBase) {
    baseFormat = pick(["qcow2", "qed", "raw"]);
    base = `base.${baseFormat}`;
    const opts = baseFormat === "raw" ? [] : ["-o", `cluster_size=${cluster}`];
    ok(["create", "-q", "-f", baseFormat, ...opts, base, String(size)], dir);
    io(base, baseFormat, writes(rnd, size, cluster, baseFormat), dir);
  }
  const source = `src.${sourceFormat}`;
  if (sourceFormat === "raw") {
    const bytes = new Uint8Array(size);
    for (let i = 0; i < 6; i++) {
      const off = Math.floor(rnd() * size);
      const len = Math.min(size - off, Math.floor(rnd() * 200000));
      const v = Math.floor(rnd() * 256);
      bytes.fill(v, off, off + len);
    }
    writeFileSync(join(dir, source), bytes);
  } else {
    const opts =
      sourceFormat === "qcow2"
        ? `cluster_size=${cluster}`
        : `cluster_size=${Math.max(4096, cluster)}`;
    ok(
      [
        "create",
        "-q",
        "-f",
        sourceFormat,
        "-o",
        opts,
        ...(base !== undefined ? ["-b", base, "-F", baseFormat!] : []),
        source,
        String(size),
      ],
      dir,
    );
    io(source, sourceFormat, writes(rnd, size, cluster, sourceFormat), dir);
  }
  const mode = pick(["plain", "n", "n-zero", "B", "B"] as const);
  const B = mode === "B" && base !== undefined;
  const outFormat = B ? pick(["qcow2", "qed"]) : pick(["qcow2", "qed", "raw"]);
  const args = ["-f", sourceFormat, "-O", outFormat];
  let prepare: ((target: string) => void) | undefined;
  const virtual = Number(qemuInfo(join(dir, source), sourceFormat)["virtual-size"]);
  if (mode === "n" || mode === "n-zero") {
    args.push("-n");
    // A larger target only when it is zeroed: junk past the source's end stays (as with
    // qemu-img), and the result would not compare equal to the source.
    const extra = mode === "n" || rnd() < 0.5 ? 0 : 512 * Math.floor(rnd() * 300);
    // The target is made with the default cluster size (64 KiB).
    const junk = mode === "n" ? writes(rnd, virtual + extra, 65536, outFormat) : [];
    prepare = (target) => {
      ok(["create", "-q", "-f", outFormat, target, String(virtual + extra)], dir);
      if (junk.length > 0) io(target, outFormat, junk, dir);
    };
    if (mode === "n-zero") args.push("--target-is-zero");
  }
  if (B) args.push("-B", base!, "-F", baseFormat!);
  if (rnd() < 0.5) args.push("-S", pick(["0", "512", "4k", "8k", "64k", "1M"]));
  if (rnd() < 0.5) args.push("-m", String(1 + Math.floor(rnd() * 16)));
  // qemu-img 7.2 aborts on -W into QED (an assertion in qed_aio_write_alloc).
  if (rnd() < 0.5 && outFormat !== "qed") args.push("-W");
  return {
    dir,
    source,
    sourceFormat,
    base,
    baseFormat,
    size,
    args,
    outFormat,
    prepare,
    describe: `seed ${seed}: ${sourceFormat} ${size} bytes, cluster ${cluster}, base ${base ?? "none"}; convert ${args.join(" ")}`,
  };
}

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  data: boolean;
}

function mapOf(file: string, format: string, cwd: string): MapEntry[] {
  return JSON.parse(ok(["map", "-f", format, "--output=json", file], cwd)) as MapEntry[];
}

/** Joined `[start, end)` ranges of the entries that `keep` selects. */
function ranges(map: MapEntry[], keep: (e: MapEntry) => boolean): [number, number][] {
  const out: [number, number][] = [];
  for (const e of map) {
    if (!keep(e)) continue;
    const last = out[out.length - 1];
    if (last !== undefined && last[1] === e.start) last[1] += e.length;
    else out.push([e.start, e.start + e.length]);
  }
  return out;
}

/**
 * The clusters of an overlay (cluster size `cluster`) that store data of their own although
 * the source takes all their bytes from its backing chain (nothing allocated in its top).
 */
function dataOverInherited(
  overlay: MapEntry[],
  source: MapEntry[],
  cluster: number,
): [number, number][] {
  const inherited = ranges(source, (e) => e.depth > 0 || !e.present);
  const own = ranges(overlay, (e) => e.depth === 0 && e.data);
  const bad: [number, number][] = [];
  for (const [a, b] of own) {
    for (let c = Math.floor(a / cluster) * cluster; c < b; c += cluster) {
      const end = c + cluster;
      if (inherited.some(([x, y]) => c >= x && end <= y)) bad.push([c, end]);
    }
  }
  return bad;
}

describe.skipIf(!hasQemu)("convert options, randomized against qemu-img", () => {
  for (const seed of SEEDS) {
    it(`seed ${seed}`, { timeout: 120_000 }, async () => {
      const c = draw(seed);
      const what = c.describe;
      const theirs = `theirs.${c.outFormat}`;
      const ours = `ours.${c.outFormat}`;
      c.prepare?.(theirs);
      c.prepare?.(ours);
      const t = qemuImg(["convert", ...c.args, c.source, theirs], c.dir);
      expect(t.code, `${what}: ${t.stderr}`).toBe(0);
      const o = await qimg(["convert", ...c.args, c.source, ours], c.dir);
      expect([o.code, o.stderr], what).toEqual([0, ""]);
      const f = c.outFormat;
      const same = (a: string, af: string, b: string, bf: string) =>
        qemuImg(["compare", "-f", af, "-F", bf, a, b], c.dir).stdout;
      // (A larger -n target makes compare warn of the size first.)
      const IDENTICAL = /(^|\n)Images are identical\.\n$/;
      expect(same(theirs, f, ours, f), what).toMatch(IDENTICAL);
      expect(same(c.source, c.sourceFormat, ours, f), what).toMatch(IDENTICAL);
      const facts = (file: string) => {
        const i = qemuInfo(join(c.dir, file), f);
        return [i["virtual-size"], i.format, i["backing-filename"], i["backing-filename-format"]];
      };
      expect(facts(ours), what).toEqual(facts(theirs));
      if (f !== "raw") {
        const check = qemuImg(["check", "-f", f, ours], c.dir);
        expect(check.code, `${what}: ${check.stdout}${check.stderr}`).toBe(0);
      }
      if (c.args.includes("-B")) {
        // Neither overlay stores data where the source takes every byte from its backing
        // chain (the -B file is that chain's top here).
        const src = mapOf(c.source, c.sourceFormat, c.dir);
        const cluster = Number(qemuInfo(join(c.dir, ours), f)["cluster-size"]);
        const bad = (file: string) => dataOverInherited(mapOf(file, f, c.dir), src, cluster);
        expect(bad(theirs), `${what} (qemu-img)`).toEqual([]);
        expect(bad(ours), what).toEqual([]);
      }
    });
  }
});

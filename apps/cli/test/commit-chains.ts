/**
 * Seeded random backing chains for the commit and rebase twin tests: 2–3 images (qcow2, QED,
 * raw at the bottom), sizes that are not multiples of 512 or of the cluster (the base may be
 * shorter than the top), and a random layout of data, zero writes, discards and compressed
 * clusters written by qemu-io. The chain is made once in a directory and copied to twins, so
 * qemu-img and qimg start from byte-identical files (backing names are relative).
 */
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, expect } from "vitest";
import { qimg } from "./helpers.js";
import { qemuImg, qemuIo, prng } from "./qemu.js";

/** QIMG_LONG=1: more seeds. */
export const LONG = process.env.QIMG_LONG === "1";

/** The first seed of a test file: QIMG_SEED, else `fallback`. */
export function firstSeed(fallback: number): number {
  return Number(process.env.QIMG_SEED ?? fallback);
}

/** A scratch directory for one test file, removed after its tests. */
export function scratchRoot(prefix: string): string {
  const root = mkdtempSync(join(tmpdir(), prefix));
  afterAll(() => rmSync(root, { recursive: true, force: true }));
  return root;
}

export type Fmt = "qcow2" | "qed" | "raw";

export interface Layer {
  readonly name: string;
  readonly fmt: Fmt;
  readonly size: number;
  readonly cluster: number;
}

/** One chain, bottom first. */
export interface Chain {
  readonly layers: readonly Layer[];
  readonly seed: number;
}

function pick<T>(rnd: () => number, xs: readonly T[]): T {
  return xs[Math.floor(rnd() * xs.length)]!;
}

function must(r: { code: number; stdout: string; stderr: string }, what: string): void {
  if (r.code !== 0) throw new Error(`${what}: ${r.stdout}${r.stderr}`);
}

/** Random writes into `layer` with qemu-io (through its backing chain). */
function scribble(dir: string, layer: Layer, rnd: () => number): void {
  const cmds: string[] = [];
  const compressed: string[] = [];
  const n = 3 + Math.floor(rnd() * 6);
  const size = layer.fmt === "raw" ? layer.size : Math.ceil(layer.size / 512) * 512;
  const cs = layer.cluster;
  for (let i = 0; i < n; i++) {
    const kind = rnd();
    const len = 1 + Math.floor(rnd() * Math.min(size, 3 * cs));
    const off = Math.floor(rnd() * (size - len));
    const pat = 1 + Math.floor(rnd() * 250);
    if (kind < 0.5 || layer.fmt === "raw") {
      cmds.push(`write -P ${pat} ${off} ${len}`);
    } else if (kind < 0.7) {
      const a = Math.floor(off / 512) * 512;
      cmds.push(`write -z ${a} ${Math.max(512, Math.floor(len / 512) * 512)}`);
    } else if (kind < 0.85) {
      const a = Math.floor(off / cs) * cs;
      if (a + cs <= size) cmds.push(`discard ${a} ${cs}`);
    } else if (layer.fmt === "qcow2") {
      const a = Math.floor(off / cs) * cs;
      if (a + cs <= size) compressed.push(`write -c -P ${pat} ${a} ${cs}`);
    } else {
      cmds.push(`write -P ${pat} ${off} ${len}`);
    }
  }
  const args = ["-f", layer.fmt];
  for (const c of cmds) args.push("-c", c);
  must(qemuIo([...args, layer.name], dir), `qemu-io ${cmds.join("; ")}`);
  // qemu-io 7.2 refuses a compressed write onto an allocated cluster: those go last, one per
  // run, and a refused one just leaves the cluster as it was.
  for (const c of compressed) qemuIo(["-f", layer.fmt, "-c", c, layer.name], dir);
}

/**
 * Make a random chain of `depth` images in `dir` (bottom "l0.<fmt>", top "l<depth-1>.<fmt>").
 * `topFormats` limits the formats of the images above the bottom.
 */
export function makeChain(
  dir: string,
  seed: number,
  depth: number,
  options: { topFormats?: readonly Fmt[]; shortBase?: boolean } = {},
): Chain {
  const rnd = prng(seed);
  mkdirSync(dir, { recursive: true });
  const layers: Layer[] = [];
  const topSize = 600_000 + Math.floor(rnd() * 1_500_000);
  for (let i = 0; i < depth; i++) {
    const fmt: Fmt =
      i === 0
        ? pick(rnd, ["qcow2", "qed", "raw"])
        : pick(rnd, options.topFormats ?? ["qcow2", "qed"]);
    const short = i === 0 && (options.shortBase ?? rnd() < 0.5);
    const size =
      i === depth - 1
        ? topSize
        : short
          ? Math.floor(topSize * (0.3 + rnd() * 0.5))
          : topSize + Math.floor(rnd() * 3) * 1000;
    const cluster =
      fmt === "qcow2"
        ? pick(rnd, [4096, 16384, 65536])
        : fmt === "qed"
          ? pick(rnd, [4096, 65536])
          : 4096;
    const name = `l${i}.${fmt}`;
    const args = ["create", "-q", "-f", fmt];
    if (fmt === "qcow2")
      args.push("-o", `cluster_size=${cluster},compat=${rnd() < 0.8 ? "1.1" : "0.10"}`);
    if (fmt === "qed") args.push("-o", `cluster_size=${cluster}`);
    const below = layers[i - 1];
    if (below !== undefined) args.push("-b", below.name, "-F", below.fmt);
    must(qemuImg([...args, name, String(size)], dir), `create ${name}`);
    const layer = { name, fmt, size, cluster };
    layers.push(layer);
    scribble(dir, layer, rnd);
  }
  return { layers, seed };
}

/** Copy every file of `from` into `to` (a twin). */
export function twin(from: string, to: string): void {
  mkdirSync(to, { recursive: true });
  for (const f of readdirSync(from)) copyFileSync(join(from, f), join(to, f));
}

/** Twins of `src` (default `dir/src`): `dir/q` for qemu-img and `dir/o` for qimg. */
export function twins(dir: string, src = join(dir, "src")): { q: string; o: string } {
  const q = join(dir, "q");
  const o = join(dir, "o");
  twin(src, q);
  twin(src, o);
  return { q, o };
}

/**
 * Run `args` with qemu-img in `q` and with qimg in `o`: the same exit code and stdout, and a
 * refusal leaves every file in `o` byte-identical. Returns qemu-img's exit code and a label
 * (`what`, the command line and qemu-img's stderr) for further checks.
 */
export async function runTwins(
  args: readonly string[],
  q: string,
  o: string,
  what: string,
): Promise<{ code: number; label: string }> {
  const theirs = qemuImg(args, q);
  const before = snapshotFiles(o);
  const ours = await qimg(args, o);
  const label = `${what}: ${args.join(" ")}: ${theirs.stderr}`;
  expect(ours.code, `${label} / ours: ${ours.stderr}`).toBe(theirs.code);
  expect(ours.stdout, label).toBe(theirs.stdout);
  if (theirs.code !== 0) expect(snapshotFiles(o), label).toEqual(before);
  return { code: theirs.code, label };
}

/** A digest of every file in `dir`, by name (to prove files byte-identical). */
export function snapshotFiles(dir: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const f of readdirSync(dir)) {
    m.set(
      f,
      createHash("sha256")
        .update(readFileSync(join(dir, f)))
        .digest("hex"),
    );
  }
  return m;
}

/** What `qemu-img info` says of an image's backing file, and its size. */
export function backingFacts(dir: string, layer: Layer): Record<string, unknown> {
  const r = qemuImg(["info", "-U", "-f", layer.fmt, "--output=json", layer.name], dir);
  if (r.code !== 0) return { error: r.stderr };
  const j = JSON.parse(r.stdout) as Record<string, unknown>;
  return {
    size: j["virtual-size"],
    backing: j["backing-filename"],
    backingFormat: j["backing-filename-format"],
  };
}

/** `qemu-img compare` of one layer in two twin directories (through each one's chain). */
export function compareTwins(a: string, b: string, layer: Layer): string {
  const r = qemuImg([
    "compare",
    "-f",
    layer.fmt,
    "-F",
    layer.fmt,
    join(a, layer.name),
    join(b, layer.name),
  ]);
  return `${r.code} ${r.stdout.trim()}${r.stderr.trim()}`;
}

/**
 * Every layer reads alike in the twins `q` and `o` (`qemu-img compare`), has the same backing
 * facts in `qemu-img info`, and passes `qemu-img check` in `o`.
 */
export function expectSameLayers(
  layers: readonly Layer[],
  q: string,
  o: string,
  label: string,
): void {
  for (const layer of layers) {
    expect(compareTwins(q, o, layer), `${label}: ${layer.name} guest bytes`).toMatch(
      /^0 Images are identical/,
    );
    expect(backingFacts(o, layer), `${label}: ${layer.name} info`).toEqual(backingFacts(q, layer));
    const ours = checkLayer(o, layer);
    expect(ours.code, `${label}: check ${layer.name}: ${ours.out}`).toBe(0);
  }
}

/** `qemu-img check` of a layer: the exit code and output ("" for raw, which has no check). */
export function checkLayer(dir: string, layer: Layer): { code: number; out: string } {
  if (layer.fmt === "raw") return { code: 0, out: "" };
  const r = qemuImg(["check", "-f", layer.fmt, layer.name], dir);
  return { code: r.code, out: r.stdout + r.stderr };
}

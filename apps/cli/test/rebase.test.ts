/**
 * `qimg rebase` against `qemu-img rebase` on twins: seeded random chains (qcow2, QED, raw at
 * the bottom; odd sizes; random data/zero/discard/compressed layouts) and a second random
 * image to rebase onto; safe rebase to a different backing file, `-u`, and `-b ""` on qcow2
 * and QED tops. Every image is compared (`qemu-img compare`: the top must read as before),
 * with the backing facts of `qemu-img info`, a clean `qemu-img check`, and the same output and
 * exit code. Refusals leave every file byte-identical. `-c` (not in qemu-img 7.2) is checked
 * against the top's old content and qemu-img check.
 */
import { rmSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg, qemuIo } from "./qemu.js";
import {
  LONG,
  backingFacts,
  checkLayer,
  compareTwins,
  expectSameLayers,
  firstSeed,
  makeChain,
  runTwins,
  scratchRoot,
  snapshotFiles,
  twin,
  twins,
} from "./commit-chains.js";
import type { Chain, Fmt, Layer } from "./commit-chains.js";

const root = scratchRoot("qimg-rebase-");
const SEED = firstSeed(2500);

type Mode = "safe" | "unsafe" | "remove";

/** A second backing candidate "nb.<fmt>" in `dir`, with random data. */
function makeNewBacking(dir: string, seed: number, size: number): Layer {
  const rnd = prng(seed * 7 + 1);
  const fmt: Fmt = (["qcow2", "qed", "raw"] as const)[Math.floor(rnd() * 3)]!;
  const name = `nb.${fmt}`;
  const sz = Math.floor(size * (0.4 + rnd() * 0.9));
  expect(qemuImg(["create", "-q", "-f", fmt, name, String(sz)], dir).code).toBe(0);
  const args = ["-f", fmt];
  for (let i = 0; i < 4; i++) {
    const len = 1 + Math.floor(rnd() * 150_000);
    const off = Math.floor(rnd() * Math.max(1, sz - len));
    args.push("-c", `write -P ${1 + Math.floor(rnd() * 250)} ${off} ${len}`);
  }
  const r = qemuIo([...args, name], dir);
  expect(r.code, r.stderr).toBe(0);
  return { name, fmt, size: sz, cluster: 4096 };
}

/**
 * A random chain of `depth` images in `root/name/src` from `seed`, a new backing candidate
 * beside it, and twins of both.
 */
function chainAndNewBacking(
  name: string,
  seed: number,
  depth: number,
  topFormats?: readonly Fmt[],
): { src: string; chain: Chain; top: Layer; nb: Layer; q: string; o: string } {
  const dir = join(root, name);
  const src = join(dir, "src");
  const chain = makeChain(src, seed, depth, topFormats === undefined ? {} : { topFormats });
  const top = chain.layers[depth - 1]!;
  const nb = makeNewBacking(src, seed, top.size);
  return { src, chain, top, nb, ...twins(dir) };
}

describe.skipIf(!hasQemu)("qimg rebase, as qemu-img rebase (twins)", () => {
  const count = LONG ? 60 : 12;
  for (let k = 0; k < count; k++) {
    const seed = SEED + k;
    const depth = k % 2 === 0 ? 2 : 3;
    const mode: Mode = (["safe", "safe", "unsafe", "remove"] as const)[k % 4]!;
    // Each mode on a qcow2 top and on a QED top.
    const topFmt: Fmt = Math.floor(k / 4) % 2 === 0 ? "qcow2" : "qed";
    it(`${depth} images, ${topFmt} top, ${mode} (seed ${seed})`, async () => {
      const { src, chain, top, nb, q, o } = chainAndNewBacking(`r${seed}`, seed, depth, [topFmt]);
      const args = ["rebase", "-f", top.fmt];
      if (mode === "unsafe") args.push("-u");
      if (mode === "remove") args.push("-b", "");
      else args.push("-b", nb.name, "-F", nb.fmt);
      args.push(top.name);
      const { code, label } = await runTwins(args, q, o, `seed ${seed}`);
      if (code !== 0) return;
      expectSameLayers([...chain.layers, nb], q, o, label);
      if (mode !== "unsafe") {
        // Safe mode: the top reads as it did before the rebase.
        expect(compareTwins(src, o, top), label).toMatch(/^0 Images are identical/);
      }
    });
  }

  it("safe rebase onto the backing file's own backing file (dropping the middle image), as qemu-img", async () => {
    for (let seed = SEED + 300; seed < SEED + 304; seed++) {
      const dir = join(root, `g${seed}`);
      const src = join(dir, "src");
      const chain = makeChain(src, seed, 3);
      const [l0, , top] = chain.layers as [Layer, Layer, Layer];
      const { q, o } = twins(dir);
      const args = ["rebase", "-b", l0.name, "-F", l0.fmt, top.name];
      const theirs = qemuImg(args, q);
      const ours = await qimg(args, o);
      const label = `seed ${seed}: ${args.join(" ")}`;
      expect(ours.code, `${label}: ${ours.stderr}`).toBe(theirs.code);
      expect(compareTwins(q, o, top), label).toMatch(/^0 Images are identical/);
      expect(backingFacts(o, top), label).toEqual(backingFacts(q, top));
      // The top reads as it did before the rebase.
      expect(compareTwins(src, o, top), label).toMatch(/^0 Images are identical/);
      expect(checkLayer(o, top).code, label).toBe(0);
    }
  });

  it("a relative new backing name is opened relative to the image and stored as given", async () => {
    const dir = join(root, "relative");
    const src = join(dir, "src");
    const chain = makeChain(join(src, "sub"), SEED + 400, 2, { topFormats: ["qcow2"] });
    const top = chain.layers[1]!;
    const nb = makeNewBacking(join(src, "sub"), SEED + 400, top.size);
    const q = join(dir, "q");
    const o = join(dir, "o");
    twin(join(src, "sub"), join(q, "sub"));
    twin(join(src, "sub"), join(o, "sub"));
    const args = ["rebase", "-b", nb.name, "-F", nb.fmt, join("sub", top.name)];
    const theirs = qemuImg(args, q);
    const ours = await qimg(args, o);
    expect(theirs.code, theirs.stderr).toBe(0);
    expect(ours.code, ours.stderr).toBe(0);
    const subQ = join(q, "sub");
    const subO = join(o, "sub");
    expect(backingFacts(subO, top)).toEqual(backingFacts(subQ, top));
    expect(compareTwins(subQ, subO, top)).toMatch(/^0 Images are identical/);
  });

  it("-p prints qemu-img's progress lines", async () => {
    const { top, nb, q, o } = chainAndNewBacking("progress", SEED + 600, 2);
    const args = ["rebase", "-p", "-b", nb.name, "-F", nb.fmt, top.name];
    const theirs = qemuImg(args, q);
    const ours = await qimg(args, o);
    expect(ours.code).toBe(theirs.code);
    const frame = /^ {4}\(0\.00\/100%\)\r(?: {4}\(\d+\.\d\d\/100%\)\r)* {4}\(100\.00\/100%\)\r\n$/;
    expect(theirs.stdout).toMatch(frame);
    expect(ours.stdout).toMatch(frame);
  });

  it("-c writes what rebase copies compressed (qcow2), reading as before", async () => {
    const dir = join(root, "compress");
    const src = join(dir, "src");
    let seed = SEED + 500;
    let chain = makeChain(src, seed, 2, { topFormats: ["qcow2"] });
    while (chain.layers[1]!.fmt !== "qcow2") {
      rmSync(src, { recursive: true, force: true });
      chain = makeChain(src, ++seed, 2, { topFormats: ["qcow2"] });
    }
    const top = chain.layers[1]!;
    const o = join(dir, "o");
    twin(src, o);
    const ours = await qimg(["rebase", "-c", "-b", "", top.name], o);
    expect(ours.code, ours.stderr).toBe(0);
    // (top is a qcow2 image: compareTwins compares with -f qcow2 -F qcow2.)
    expect(compareTwins(src, o, top), `seed ${seed}`).toMatch(/^0 Images are identical/);
    expect(checkLayer(o, top).code).toBe(0);
    const map = JSON.parse(qemuImg(["map", "--output=json", join(o, top.name)]).stdout) as {
      compressed?: boolean;
    }[];
    expect(map.length).toBeGreaterThan(0);
    const info = qemuImg(["check", "--output=json", join(o, top.name)]);
    const j = JSON.parse(info.stdout) as { "compressed-clusters"?: number };
    expect(j["compressed-clusters"] ?? 0, `seed ${seed}`).toBeGreaterThan(0);
  });

  it("refusals leave every file byte-identical, with qemu-img's messages", async () => {
    const { top, nb, q, o } = chainAndNewBacking("refuse", SEED + 999, 2);
    const cases = [
      ["rebase", "-F", "qcow2", "-b", "nothere.qcow2", top.name],
      ["rebase", "-b", nb.name, top.name],
      ["rebase", "-u", "-b", nb.name, top.name],
      ["rebase", top.name],
      ["rebase", "-F", "bogus", "-b", nb.name, top.name],
      ["rebase", "-t", "bogus", "-F", nb.fmt, "-b", nb.name, top.name],
      ["rebase", "-u", "-F", "qcow2", "-b", "x", "-f", "raw", nb.name],
    ];
    for (const args of cases) {
      if (args.includes("raw") && nb.fmt !== "raw") continue;
      const theirs = qemuImg(args, q);
      const before = snapshotFiles(o);
      const ours = await qimg(args, o);
      expect(theirs.code, args.join(" ")).not.toBe(0);
      expect(ours.code, `${args.join(" ")}: ${ours.stderr}`).toBe(theirs.code);
      const first = (s: string): string =>
        (s.split("\n")[0] ?? "").replace(/^(qemu-img|qimg): /, "");
      expect(first(ours.stderr), args.join(" ")).toBe(first(theirs.stderr));
      expect(snapshotFiles(o), args.join(" ")).toEqual(before);
    }
  });
});

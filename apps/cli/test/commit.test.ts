/**
 * `qimg commit` against `qemu-img commit` on twins: seeded random chains of 2–3 images
 * (qcow2, QED, raw at the bottom; sizes not multiples of 512 or the cluster, the base often
 * shorter than the top; data, zero, discarded and compressed clusters), the same command run
 * by both in twin directories, then every layer compared (`qemu-img compare`), the backing
 * facts of `qemu-img info`, a clean `qemu-img check`, and the same output and exit code.
 * Refusals leave every file byte-identical.
 */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";
import { hasQemu, qemuImg, qemuIo } from "./qemu.js";
import {
  LONG,
  expectSameLayers,
  firstSeed,
  makeChain,
  runTwins,
  scratchRoot,
  snapshotFiles,
  twins,
} from "./commit-chains.js";

const root = scratchRoot("qimg-commit-");
const SEED = firstSeed(1500);

type Mode = "plain" | "drop" | "deep" | "quiet";

/** Run qemu-img (or `tool`) with `args` in the source directory; it must succeed. */
type Step = (args: string[], tool?: typeof qemuImg) => void;

/**
 * A hand-made source in `root/name/src` (`build` runs qemu-img, or the tool it names, there;
 * every step must succeed), then its twins.
 */
function handMade(name: string, build: (sh: Step) => void): { q: string; o: string } {
  const dir = join(root, name);
  const src = join(dir, "src");
  mkdirSync(src, { recursive: true });
  build((args, tool = qemuImg) => {
    const r = tool(args, src);
    expect(r.code, r.stderr).toBe(0);
  });
  return twins(dir);
}

/** `args` fails with exit 1 for both, with the same message, and leaves every file of `o` as it was. */
async function expectSameFailure(args: string[], q: string, o: string): Promise<void> {
  const theirs = qemuImg(args, q);
  const before = snapshotFiles(o);
  const ours = await qimg(args, o);
  expect(theirs.code).toBe(1);
  expect(ours.code).toBe(1);
  expect(ours.stderr.replace(/^qimg: /, "")).toBe(theirs.stderr.replace(/^qemu-img: /, ""));
  expect(snapshotFiles(o)).toEqual(before);
}

describe.skipIf(!hasQemu)("qimg commit, as qemu-img commit (twins)", () => {
  const count = LONG ? 60 : 10;
  for (let k = 0; k < count; k++) {
    const seed = SEED + k;
    const depth = k % 3 === 2 ? 2 : 3;
    const modes: Mode[] = depth === 3 ? ["plain", "deep", "drop"] : ["plain", "drop", "quiet"];
    const mode = modes[Math.floor(k / 3) % modes.length]!;
    it(`${depth} images, ${mode} (seed ${seed})`, async () => {
      const dir = join(root, `c${seed}`);
      const chain = makeChain(join(dir, "src"), seed, depth);
      const { q, o } = twins(dir);
      const top = chain.layers[depth - 1]!;
      const args = ["commit", "-f", top.fmt];
      if (mode === "drop") args.push("-d");
      if (mode === "quiet") args.push("-q");
      if (mode === "deep") args.push("-b", chain.layers[0]!.name);
      args.push(top.name);
      const { code, label } = await runTwins(args, q, o, `seed ${seed}`);
      if (code === 0) expectSameLayers(chain.layers, q, o, label);
    });
  }

  it("a QED base with a backing file that cannot grow: the job fails as qemu-img's, files unchanged", async () => {
    const { q, o } = handMade("qed-grow", (sh) => {
      sh(["create", "-q", "-f", "raw", "l0.raw", "2000000"]);
      sh(["-f", "raw", "-c", "write -P 1 0 2000000", "l0.raw"], qemuIo);
      sh(["create", "-q", "-f", "qed", "-b", "l0.raw", "-F", "raw", "l1.qed", "1000448"]);
      sh(["create", "-q", "-f", "qcow2", "-b", "l1.qed", "-F", "qed", "l2.qcow2", "1999360"]);
      sh(["-c", "write -P 2 1500000 5000", "l2.qcow2"], qemuIo);
    });
    await expectSameFailure(["commit", "l2.qcow2"], q, o);
  });

  it("a shorter version 2 qcow2 base with snapshots cannot grow: refused as qemu-img, files unchanged", async () => {
    const { q, o } = handMade("v2-snap", (sh) => {
      sh(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "base.qcow2", "1000448"]);
      sh(["-c", "write -P 1 0 100000", "base.qcow2"], qemuIo);
      sh(["snapshot", "-c", "s1", "base.qcow2"]);
      const overBase = ["-b", "base.qcow2", "-F", "qcow2"];
      sh(["create", "-q", "-f", "qcow2", ...overBase, "top.qcow2", "1999360"]);
      sh(["-c", "write -P 2 1500000 5000", "top.qcow2"], qemuIo);
    });
    await expectSameFailure(["commit", "top.qcow2"], q, o);
  });

  it("zero clusters in the top become zero clusters in the base, as with qemu-img (same map)", async () => {
    const { q, o } = handMade("zeros", (sh) => {
      sh(["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
      sh(["-c", "write -P 1 0 1M", "base.qcow2"], qemuIo);
      sh(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", "1M"]);
      const io = [
        "write -z 0 128k",
        "write -z -u 256k 64k",
        "write -P 3 512k 64k",
        "discard 768k 64k",
      ];
      sh([...io.flatMap((c) => ["-c", c]), "top.qcow2"], qemuIo);
    });
    expect(qemuImg(["commit", "-q", "top.qcow2"], q).code).toBe(0);
    expect((await qimg(["commit", "-q", "top.qcow2"], o)).code).toBe(0);
    const map = (d: string): string => qemuImg(["map", "--output=json", "base.qcow2"], d).stdout;
    expect(map(o)).toBe(map(q));
    expect(map(o)).toMatch(
      /"start": 0, "length": 131072, "depth": 0, "present": true, "zero": true, "data": false/,
    );
  });

  it("-p prints qemu-img's progress lines, then the verdict", async () => {
    const dir = join(root, "progress");
    makeChain(join(dir, "src"), SEED + 77, 2, { topFormats: ["qcow2"] });
    const { q, o } = twins(dir);
    const theirs = qemuImg(["commit", "-p", "l1.qcow2"], q);
    const ours = await qimg(["commit", "-p", "l1.qcow2"], o);
    expect(ours.code).toBe(theirs.code);
    // The steps between depend on the job's timing; the frame is the same.
    const frame =
      /^ {4}\(0\.00\/100%\)\r(?: {4}\(\d+\.\d\d\/100%\)\r)* {4}\(100\.00\/100%\)\r\nImage committed\.\n$/;
    expect(theirs.stdout).toMatch(frame);
    expect(ours.stdout).toMatch(frame);
  });

  it("refusals: no backing file, -b not in the chain, bad -r/-t; files unchanged", async () => {
    const dir = join(root, "refuse");
    const chain = makeChain(join(dir, "src"), SEED + 999, 2);
    const { q, o } = twins(dir);
    const [base, top] = chain.layers as [(typeof chain.layers)[0], (typeof chain.layers)[0]];
    const cases = [
      ["commit", "-f", base.fmt, base.name],
      ["commit", "-b", "nothere.qcow2", top.name],
      ["commit", "-b", top.name, top.name],
      ["commit", "-r", "1x", top.name],
      ["commit", "-t", "bogus", top.name],
      ["commit", "missing.qcow2"],
    ];
    for (const args of cases) {
      const theirs = qemuImg(args, q);
      const before = snapshotFiles(o);
      const ours = await qimg(args, o);
      expect(ours.code, args.join(" ")).toBe(theirs.code);
      expect(theirs.code).not.toBe(0);
      // qemu-img splits a few messages over two "qemu-img: " lines; qimg prints one line.
      const first = (s: string): string =>
        (s.replace(/\nqemu-img: /g, " ").split("\n")[0] ?? "").replace(/^(qemu-img|qimg): /, "");
      // (A missing file is worded the way every qimg command words it.)
      if (!args.includes("missing.qcow2")) {
        expect(first(ours.stderr), args.join(" ")).toBe(first(theirs.stderr));
      }
      expect(snapshotFiles(o)).toEqual(before);
    }
  });
});

/**
 * Byte-for-byte comparisons with the real qemu-img (human layouts, backing chains, compare
 * verdicts, dd). Skipped with a printed reason when qemu-img is not installed.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join } from "node:path";
import { fixturePath, listFixtures, requireQemu } from "@qimg/fixtures";
import { afterAll, describe, expect, it } from "vitest";
import { qimg } from "./helpers.js";

const hasQemu = requireQemu();
if (!hasQemu) console.log("skipping qemu-img interop tests: qemu-img is not on PATH");

function qemuImg(
  args: readonly string[],
  cwd: string,
): { code: number; stdout: string; stderr: string } {
  const r = spawnSync("qemu-img", args, {
    cwd,
    encoding: "utf8",
    env: { ...process.env, LC_ALL: "C" },
  });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

const tmp = mkdtempSync(join(tmpdir(), "qimg-interop-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe.skipIf(!hasQemu)("human output equals qemu-img's", () => {
  for (const f of listFixtures()) {
    if (f.info === null) continue;
    it(`info and info --backing-chain: ${f.name}`, async () => {
      const path = fixturePath(f.name);
      const dir = dirname(path);
      const name = basename(path);
      for (const extra of [[], ["--backing-chain"], ["--output=json", "--backing-chain"]]) {
        const ours = await qimg(["info", ...extra, name], dir);
        const theirs = qemuImg(["info", "-U", ...extra, name], dir);
        expect(ours.code).toBe(theirs.code);
        if (extra.includes("--output=json"))
          expect(JSON.parse(ours.stdout)).toEqual(JSON.parse(theirs.stdout));
        else expect(ours.stdout).toBe(theirs.stdout);
      }
    });
  }

  // (qcow2-backing-chain is left out: qemu-img's human map of it depends on host-file holes.)
  for (const name of [
    "qcow2-snapshots",
    "qed-backing",
    "raw-basic",
    "qcow2-zero-clusters",
    "qcow2-compressed-zlib",
  ]) {
    const entry = listFixtures().find((f) => f.name === name);
    if (entry === undefined) continue;
    it(`map (human): ${name}`, async () => {
      const path = fixturePath(name);
      const ours = await qimg(["map", basename(path)], dirname(path));
      const theirs = qemuImg(["map", "-U", basename(path)], dirname(path));
      expect(ours.stdout).toBe(theirs.stdout);
      expect(ours.code).toBe(theirs.code);
      if (theirs.stderr !== "")
        expect(ours.stderr).toBe(theirs.stderr.replace(/^qemu-img: /, `qimg: ${basename(path)}: `));
    });
  }
});

describe.skipIf(!hasQemu)("compare and dd verdicts equal qemu-img's", () => {
  function raw(
    name: string,
    size: number,
    pokes: ReadonlyArray<readonly [number, number]> = [],
  ): string {
    const buf = new Uint8Array(size);
    for (const [at, v] of pokes) buf[at] = v;
    const path = join(tmp, name);
    writeFileSync(path, buf);
    return path;
  }

  const cases: ReadonlyArray<{
    name: string;
    a: [number, ReadonlyArray<readonly [number, number]>];
    b: [number, ReadonlyArray<readonly [number, number]>];
    flags: string[];
  }> = [
    { name: "identical", a: [1 << 20, [[5, 1]]], b: [1 << 20, [[5, 1]]], flags: [] },
    { name: "first sector differs", a: [1 << 20, []], b: [1 << 20, [[100, 1]]], flags: [] },
    {
      name: "later sector differs",
      a: [1 << 20, [[100, 1]]],
      b: [
        1 << 20,
        [
          [100, 1],
          [1000, 2],
        ],
      ],
      flags: [],
    },
    { name: "size mismatch, zero tail", a: [1 << 20, []], b: [2 << 20, []], flags: [] },
    {
      name: "size mismatch, data in tail",
      a: [1 << 20, []],
      b: [2 << 20, [[1500000, 9]]],
      flags: [],
    },
    { name: "strict size mismatch", a: [1 << 20, []], b: [2 << 20, []], flags: ["-s"] },
  ];
  for (const c of cases) {
    it(c.name, async () => {
      const a = raw(`${c.name}-a.raw`, c.a[0], c.a[1]);
      const b = raw(`${c.name}-b.raw`, c.b[0], c.b[1]);
      const args = ["compare", "-f", "raw", "-F", "raw", ...c.flags, a, b];
      const ours = await qimg(args);
      const theirs = qemuImg(args, tmp);
      expect({ code: ours.code, stdout: ours.stdout }).toEqual({
        code: theirs.code,
        stdout: theirs.stdout,
      });
    });
  }

  it("compare of a missing file exits 2 with one line", async () => {
    const a = raw("present.raw", 4096);
    const ours = await qimg(["compare", a, join(tmp, "missing.raw")]);
    expect(ours.code).toBe(2);
    expect(ours.stdout).toBe("");
    expect(ours.stderr).toBe(`qimg: ${join(tmp, "missing.raw")}: No such file or directory\n`);
  });

  const ddCases = [
    ["bs=1000", "skip=2", "count=5"],
    ["bs=4k"],
    ["bs=1", "count=1K"],
    ["skip=100"],
    ["bs=1.5k", "skip=1"],
  ];
  for (const extra of ddCases) {
    it(`dd ${extra.join(" ")}`, async () => {
      const src = join(tmp, "dd-src.raw");
      const data = new Uint8Array(10000);
      for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
      writeFileSync(src, data);
      const ours = await qimg([
        "dd",
        "-f",
        "raw",
        "-O",
        "raw",
        `if=${src}`,
        `of=${join(tmp, "dd-ours.raw")}`,
        ...extra,
      ]);
      const theirs = qemuImg(
        ["dd", "-f", "raw", "-O", "raw", `if=${src}`, `of=${join(tmp, "dd-theirs.raw")}`, ...extra],
        tmp,
      );
      expect(ours.code).toBe(theirs.code);
      expect(readFileSync(join(tmp, "dd-ours.raw"))).toEqual(
        readFileSync(join(tmp, "dd-theirs.raw")),
      );
    });
  }

  it("dd of a qcow2 fixture equals qemu-img dd", async () => {
    const path = fixturePath("qcow2-backing-chain");
    const ours = await qimg([
      "dd",
      `if=${path}`,
      `of=${join(tmp, "ddq-ours.raw")}`,
      "bs=64k",
      "skip=3",
      "count=40",
    ]);
    const theirs = qemuImg(
      [
        "dd",
        "-U",
        `if=${path}`,
        `of=${join(tmp, "ddq-theirs.raw")}`,
        "bs=64k",
        "skip=3",
        "count=40",
      ],
      tmp,
    );
    expect(ours.code).toBe(0);
    expect(theirs.code).toBe(0);
    expect(readFileSync(join(tmp, "ddq-ours.raw"))).toEqual(
      readFileSync(join(tmp, "ddq-theirs.raw")),
    );
  });
});

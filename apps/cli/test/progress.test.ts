/**
 * CLI rough edges of the process itself: `-p` progress as qemu-img prints it (lines on stdout
 * when stdout is not a terminal; a bar on a terminal that is restored on Ctrl-C), and a
 * closed stdout pipe ending quietly as with qemu-io.
 */
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { CLI_DIR, qimg } from "./helpers.js";
import { printf2 } from "../src/util/progress.js";
import { hasQemu, prng, qemuImg, qemuIo } from "./qemu.js";

if (!hasQemu) console.log("skipping the qemu-img comparisons of -p and EPIPE: no qemu-img");

const tmp = mkdtempSync(join(tmpdir(), "qimg-progress-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const TSX = pathToFileURL(createRequire(join(CLI_DIR, "package.json")).resolve("tsx")).href;
const FROM_SOURCE = [process.execPath, "--conditions=@qimg/source", "--import", TSX];
const quote = (s: string): string => `'${s.replace(/'/g, "'\\''")}'`;
const PROGRESS_LINES =
  /^ {4}\(0\.00\/100%\)\r( {4}\(\d{1,3}\.\d\d\/100%\)\r)* {4}\(100\.00\/100%\)\r\n$/;

/** A raw file of `size` bytes, random data in half of its 64 KiB stretches. */
function rawFile(name: string, size: number, seed: number): string {
  const rnd = prng(seed);
  const buf = new Uint8Array(size);
  for (let off = 0; off < size; off += 65536) {
    if (rnd() < 0.5) continue;
    for (let i = off; i < Math.min(size, off + 65536); i++) buf[i] = Math.floor(rnd() * 256);
  }
  const path = join(tmp, name);
  writeFileSync(path, buf);
  return path;
}

describe("-p when stdout is not a terminal: qemu-img's progress lines on stdout", () => {
  const seed = Number(process.env.QIMG_SEED ?? 4242);
  const src = rawFile("src.raw", 5 * 1024 * 1024 + 1234, seed);

  it("convert -p prints (N.NN/100%) lines, rising by more than 1%, ending 100.00 and a newline", async () => {
    const r = await qimg([
      "convert",
      "-p",
      "-f",
      "raw",
      "-O",
      "qcow2",
      src,
      join(tmp, "out.qcow2"),
    ]);
    expect(r.stderr, `seed ${seed}`).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(PROGRESS_LINES);
    const values = [...r.stdout.matchAll(/\((\d+\.\d\d)\/100%\)/g)].map((m) => Number(m[1]));
    for (let i = 1; i < values.length - 1; i++) {
      expect(values[i]! - values[i - 1]!).toBeGreaterThan(1);
    }
  });

  it.skipIf(!hasQemu)("qemu-img convert -p prints the same shape to a pipe", () => {
    const q = qemuImg(["convert", "-p", "-f", "raw", "-O", "qcow2", src, join(tmp, "q.qcow2")]);
    expect(q.code).toBe(0);
    expect(q.stdout).toMatch(PROGRESS_LINES);
  });

  it("without -p nothing is printed", async () => {
    const r = await qimg(["convert", "-f", "raw", "-O", "raw", src, join(tmp, "copy.raw")]);
    expect(r.stdout + r.stderr).toBe("");
  });
});

describe.skipIf(!hasQemu)("compare -p as qemu-img compare -p", () => {
  const seed = Number(process.env.QIMG_SEED ?? 777);
  const a = rawFile("a.raw", 7 * 1024 * 1024 + 333, seed);
  const same = rawFile("same.raw", 7 * 1024 * 1024 + 333, seed);
  const other = rawFile("other.raw", 7 * 1024 * 1024 + 333, seed + 1);

  /** The progress lines, then the verdict, then the newline that ends the progress. */
  const SHAPE = /^ {4}\(0\.00\/100%\)\r( {4}\(\d{1,3}\.\d\d\/100%\)\r)*([^\r]*\n)\n$/;

  it.each([
    ["identical", same],
    ["different", other],
  ])("%s raw images: the same verdict after the progress lines", async (_what, b) => {
    const args = ["compare", "-p", "-f", "raw", "-F", "raw", a, b];
    const ours = await qimg(args);
    const theirs = qemuImg(args);
    expect(ours.code, `seed ${seed}`).toBe(theirs.code);
    expect(ours.stdout).toMatch(SHAPE);
    expect(theirs.stdout).toMatch(SHAPE);
    expect(SHAPE.exec(ours.stdout)?.[2]).toBe(SHAPE.exec(theirs.stdout)?.[2]);
  });

  it("sparse qcow2 images (the same chunks as qemu-img): byte for byte", async () => {
    const x = join(tmp, "x.qcow2");
    const y = join(tmp, "y.qcow2");
    for (const f of [x, y])
      expect(qemuImg(["create", "-q", "-f", "qcow2", f, "3145728"]).code).toBe(0);
    expect(qemuIo(["-c", "write -P 3 1049088 4608", y]).code).toBe(0);
    for (const [p, q] of [
      [x, x],
      [x, y],
    ] as const) {
      const ours = await qimg(["compare", "-p", p, q]);
      const theirs = qemuImg(["compare", "-p", p, q]);
      expect(ours.code).toBe(theirs.code);
      expect(JSON.stringify(ours.stdout)).toBe(JSON.stringify(theirs.stdout));
    }
  });
});

describe("printf2 (the %.2f of qemu-img's progress lines)", () => {
  it("rounds the exact binary value, ties to even, as C's printf", () => {
    const values = [
      0,
      3.125,
      0.125,
      0.375,
      2.675,
      1.005,
      100 / 3,
      200 / 3,
      99.995,
      99.999,
      12.345,
      100,
    ];
    const c = spawnSync("printf", [values.map(() => "%.2f\n").join(""), ...values.map(String)], {
      encoding: "utf8",
    });
    expect(values.map(printf2).join("\n") + "\n").toBe(c.stdout);
  });
});

describe("a closed stdout pipe", () => {
  it("qimg io ... | head -1 exits quietly with qemu-io's status", () => {
    const image = join(tmp, "pipe.qcow2");
    expect(createImage(image).code).toBe(0);
    const command = (tool: string): string =>
      `${tool} -r -c 'read -v 0 1M' ${quote(image)} | head -1; echo "status=\${PIPESTATUS[0]}" >&2`;
    const ours = spawnSync(
      "bash",
      ["-c", command([...FROM_SOURCE, join(CLI_DIR, "src", "main.ts"), "io"].map(quote).join(" "))],
      { encoding: "utf8" },
    );
    expect(ours.stdout).toMatch(/^00000000: {2}00 00/);
    expect(ours.stdout.split("\n")).toHaveLength(2);
    // Nothing but the status line: no EPIPE stack trace.
    expect(ours.stderr).toBe("status=0\n");
    if (hasQemu) {
      const theirs = spawnSync("bash", ["-c", command("qemu-io")], { encoding: "utf8" });
      expect(ours.stderr).toBe(theirs.stderr);
    }
  });
});

/** A qcow2 image of 1 MiB + 1 byte made by qimg create (no qemu-img needed). */
function createImage(path: string): { code: number } {
  const r = spawnSync(
    process.execPath,
    [
      ...FROM_SOURCE.slice(1),
      join(CLI_DIR, "src", "main.ts"),
      "create",
      "-q",
      "-f",
      "qcow2",
      path,
      "1048577",
    ],
    { encoding: "utf8" },
  );
  return { code: r.status ?? -1 };
}

describe.skipIf(spawnSync("script", ["--version"]).status !== 0)("-p on a terminal", () => {
  it("Ctrl-C while the bar is drawn restores the cursor and line wrap, and ends by SIGINT", async () => {
    const child = [...FROM_SOURCE, join(CLI_DIR, "test", "progress-bar-child.ts")];
    const p = spawn("script", ["-qfec", child.map(quote).join(" "), "/dev/null"], {
      stdio: ["pipe", "pipe", "pipe"],
    });
    let out = "";
    p.stdout.setEncoding("latin1");
    const pid = await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`no READY in:\n${JSON.stringify(out)}`)),
        30_000,
      );
      p.stdout.on("data", (chunk: string) => {
        out += chunk;
        const m = /READY (\d+)/.exec(out);
        if (m !== null) {
          clearTimeout(timer);
          resolve(Number(m[1]));
        }
      });
    });
    expect(out).toContain("\x1b[?25l"); // the bar hid the cursor
    process.kill(pid, "SIGINT");
    const status = await new Promise<number | null>((resolve) => p.on("close", resolve));
    const afterHide = out.slice(out.lastIndexOf("\x1b[?25l"));
    expect(afterHide).toContain("\x1b[?25h");
    if (out.includes("\x1b[?7l"))
      expect(out.slice(out.lastIndexOf("\x1b[?7l"))).toContain("\x1b[?7h");
    // script -e passes on how the child ended: killed by SIGINT.
    expect(status).toBe(128 + 2);
  });
});

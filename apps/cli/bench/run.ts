/**
 * qimg vs qemu-img, side by side in one run: prints seconds for each and the ratio
 * (qimg / qemu-img). Asserts nothing about time.
 *
 *   pnpm --filter qimg bench                 # 1 GiB images
 *   QIMG_BENCH_SIZE=256M pnpm --filter qimg bench
 *
 * Runs the built CLI (dist/qimg.cjs) when it exists, else the source through tsx. Each case
 * runs QIMG_BENCH_REPEAT times (default 3), alternating tools, after a sync; the best counts.
 * qimg's times include Node's start-up (the first row measures it), which matters at small sizes.
 * Temporary files live under os.tmpdir() and are deleted at the end.
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, openSync, closeSync, rmSync, writeSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const CLI_DIR = join(dirname(fileURLToPath(import.meta.url)), "..");
const DIST = join(CLI_DIR, "dist", "qimg.cjs");

function parseSize(text: string): number {
  const m = /^(\d+)([kmgt]?)$/i.exec(text.trim());
  if (m === null) throw new Error(`QIMG_BENCH_SIZE: cannot parse '${text}'`);
  const unit = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[
    (m[2] ?? "").toLowerCase() as "" | "k" | "m" | "g" | "t"
  ];
  return Number(m[1]) * unit;
}

const SIZE = parseSize(process.env.QIMG_BENCH_SIZE ?? "1G");
const BENCH_COUNT = Number(process.env.QIMG_BENCH_COUNT ?? 200000);

const qimgCmd: string[] = existsSync(DIST)
  ? [process.execPath, DIST]
  : [
      process.execPath,
      "--conditions=@qimg/source",
      "--import",
      pathToFileURL(createRequire(join(CLI_DIR, "package.json")).resolve("tsx")).href,
      join(CLI_DIR, "src", "main.ts"),
    ];

// NODE_EXTRA_CA_CERTS makes Node parse a certificate bundle before running any script (about
// 40 ms on a machine that sets it for a TLS proxy). qimg never uses TLS, so both tools run
// without it; the start-up row below shows what remains of Node's start-up.
const childEnv = { ...process.env };
const droppedCaCerts = childEnv.NODE_EXTRA_CA_CERTS !== undefined;
delete childEnv.NODE_EXTRA_CA_CERTS;

function run(cmd: readonly string[]): number {
  const t0 = performance.now();
  const r = spawnSync(cmd[0]!, cmd.slice(1), {
    encoding: "utf8",
    maxBuffer: 1 << 26,
    env: childEnv,
  });
  const seconds = (performance.now() - t0) / 1000;
  if (r.status !== 0) {
    throw new Error(`${cmd.join(" ")} failed (${r.status ?? r.signal}): ${r.stderr}`);
  }
  return seconds;
}

const qemuImg = (...args: string[]): number => run(["qemu-img", ...args]);
const qimg = (...args: string[]): number => run([...qimgCmd, ...args]);

if (spawnSync("qemu-img", ["--version"]).status !== 0) {
  console.log("qemu-img is not installed: nothing to compare against");
  process.exit(0);
}

const dir = mkdtempSync(join(tmpdir(), "qimg-bench-"));
try {
  // A random-ish raw file: xorshift words, every 8th MiB half text (compressible).
  const raw = join(dir, "src.raw");
  const fd = openSync(raw, "w");
  const chunk = new Uint32Array(1 << 18); // 1 MiB
  let x = 0x9e3779b9;
  for (let off = 0, mib = 0; off < SIZE; off += chunk.byteLength, mib++) {
    for (let i = 0; i < chunk.length; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      chunk[i] = mib % 8 === 0 && i < chunk.length / 2 ? 0x41424344 + (i & 0xff) : x >>> 0;
    }
    writeSync(fd, new Uint8Array(chunk.buffer, 0, Math.min(chunk.byteLength, SIZE - off)));
  }
  closeSync(fd);
  const full = join(dir, "full.qcow2");
  const comp = join(dir, "comp.qcow2");
  qemuImg("convert", "-f", "raw", "-O", "qcow2", raw, full);
  qemuImg("convert", "-c", "-f", "raw", "-O", "qcow2", raw, comp);
  const out = (name: string): string => join(dir, name);

  type Case = [name: string, qemu: () => number, ours: () => number];
  const cases: Case[] = [
    ["start-up (--version)", () => qemuImg("--version"), () => qimg("--version")],
    [
      "convert -O raw (qcow2, allocated)",
      () => qemuImg("convert", "-f", "qcow2", "-O", "raw", full, out("a.raw")),
      () => qimg("convert", "-f", "qcow2", "-O", "raw", full, out("b.raw")),
    ],
    [
      "convert -O raw (compressed qcow2)",
      () => qemuImg("convert", "-f", "qcow2", "-O", "raw", comp, out("a.raw")),
      () => qimg("convert", "-f", "qcow2", "-O", "raw", comp, out("b.raw")),
    ],
    [
      "convert -O qcow2 (raw)",
      () => qemuImg("convert", "-f", "raw", "-O", "qcow2", raw, out("a.qcow2")),
      () => qimg("convert", "-f", "raw", "-O", "qcow2", raw, out("b.qcow2")),
    ],
    [
      "convert -c -O qcow2 (raw)",
      () => qemuImg("convert", "-c", "-f", "raw", "-O", "qcow2", raw, out("a.qcow2")),
      () => qimg("convert", "-c", "-f", "raw", "-O", "qcow2", raw, out("b.qcow2")),
    ],
    [
      `bench 4k reads, depth 64 (${BENCH_COUNT})`,
      () =>
        qemuImg("bench", "-f", "qcow2", "-c", String(BENCH_COUNT), "-d", "64", "-S", "1M", full),
      () => qimg("bench", "-f", "qcow2", "-c", String(BENCH_COUNT), "-d", "64", "-S", "1M", full),
    ],
    [
      `bench 4k writes, depth 64 (${BENCH_COUNT})`,
      () =>
        qemuImg(
          "bench",
          "-w",
          "-f",
          "qcow2",
          "-c",
          String(BENCH_COUNT),
          "-d",
          "64",
          "-S",
          "1M",
          full,
        ),
      () =>
        qimg("bench", "-w", "-f", "qcow2", "-c", String(BENCH_COUNT), "-d", "64", "-S", "1M", full),
    ],
  ];
  console.log(`qimg: ${qimgCmd.slice(1).join(" ")}; image size ${SIZE} bytes`);
  if (droppedCaCerts) {
    console.log("NODE_EXTRA_CA_CERTS is set here; both tools run without it (qimg uses no TLS)");
  }
  const rows: string[][] = [["case", "qemu-img s", "qimg s", "ratio"]];
  // Page-cache writeback of one run slows the next, so every timing starts after a sync, the
  // two tools alternate, and the best of REPEAT runs counts.
  const REPEAT = Number(process.env.QIMG_BENCH_REPEAT ?? 3);
  const settle = (): void => {
    spawnSync("sync");
    rmSync(out("a.raw"), { force: true });
    rmSync(out("b.raw"), { force: true });
    rmSync(out("a.qcow2"), { force: true });
    rmSync(out("b.qcow2"), { force: true });
    spawnSync("sync");
  };
  for (const [name, q, o] of cases) {
    let tq = Infinity;
    let to = Infinity;
    for (let i = 0; i < REPEAT; i++) {
      settle();
      tq = Math.min(tq, q());
      settle();
      to = Math.min(to, o());
    }
    rows.push([name, tq.toFixed(3), to.toFixed(3), (to / tq).toFixed(2)]);
  }
  settle();
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  for (const r of rows) {
    console.log(
      r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  "),
    );
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

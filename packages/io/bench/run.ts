/**
 * I/O micro-benchmark for @qimg/io: 4 KiB random reads and writes on a 64 MiB file that sits
 * in the page cache. Compares FileBackend (positional sync calls inside async methods) with
 * raw fs.promises FileHandle at queue depth 64 and raw fs.readSync/writeSync.
 * Prints a table; asserts nothing about time.
 *
 *   pnpm --filter @qimg/io bench            (QIMG_BENCH_SECONDS=2 for longer runs)
 */
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { FileBackend } from "../src/node.js";

const FILE_SIZE = 64 * 1024 * 1024;
const BLOCK = 4096;
const QD = 64;
const SECONDS = Number(process.env["QIMG_BENCH_SECONDS"] ?? "1");
const ROUNDS = 3;
const BLOCKS = FILE_SIZE / BLOCK;

/** Seeded xorshift32 so every run reads the same offsets. */
function offsets(n: number, seed: number): Float64Array {
  const out = new Float64Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = (x % BLOCKS) * BLOCK;
  }
  return out;
}
const OFFS = offsets(1 << 16, 12345);
const OFF_MASK = OFFS.length - 1;

type Op = (offset: number, buf: Uint8Array) => Promise<unknown>;

/** Run `op` from QD concurrent loops for SECONDS; returns ops/s. */
async function runAsync(op: Op, qd: number): Promise<number> {
  const end = performance.now() + SECONDS * 1000;
  let ops = 0;
  let cursor = 0;
  const start = performance.now();
  const worker = async (): Promise<void> => {
    const buf = new Uint8Array(BLOCK).fill(0x5a);
    while (performance.now() < end) {
      // check the clock every 64 ops in the tightest case is not needed: now() is cheap enough
      await op(OFFS[cursor++ & OFF_MASK] ?? 0, buf);
      ops++;
    }
  };
  await Promise.all(Array.from({ length: qd }, worker));
  return ops / ((performance.now() - start) / 1000);
}

/** Run a synchronous op in a loop for SECONDS; returns ops/s. */
function runSync(op: (offset: number, buf: Uint8Array) => void): number {
  const buf = new Uint8Array(BLOCK).fill(0x5a);
  const start = performance.now();
  const end = start + SECONDS * 1000;
  let ops = 0;
  let cursor = 0;
  while (performance.now() < end) {
    for (let i = 0; i < 64; i++) op(OFFS[cursor++ & OFF_MASK] ?? 0, buf);
    ops += 64;
  }
  return ops / ((performance.now() - start) / 1000);
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? 0;
}

interface Row {
  name: string;
  opsPerSec: number;
}

function table(title: string, rows: Row[], baseline: string): void {
  const base = rows.find((r) => r.name === baseline)?.opsPerSec ?? 1;
  console.log(`\n${title}`);
  const head = ["case", "ops/s", "MiB/s", `vs ${baseline}`];
  const lines = rows.map((r) => [
    r.name,
    Math.round(r.opsPerSec).toLocaleString("en-US"),
    ((r.opsPerSec * BLOCK) / (1024 * 1024)).toFixed(1),
    (r.opsPerSec / base).toFixed(2) + "x",
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...lines.map((l) => (l[i] ?? "").length)));
  const fmt = (cells: string[]): string =>
    "| " +
    cells
      .map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0)))
      .join(" | ") +
    " |";
  console.log(fmt(head));
  console.log(
    "|" +
      widths
        .map((w, i) => (i === 0 ? "-".repeat(w + 1) + "-" : "-".repeat(w + 1) + ":"))
        .join("|") +
      "|",
  );
  for (const l of lines) console.log(fmt(l));
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-io-bench-"));
  const file = path.join(dir, "bench.img");
  try {
    // Create and fill 64 MiB (non-zero so nothing is sparse), then warm the page cache.
    const chunk = new Uint8Array(1024 * 1024);
    for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131) & 0xff;
    const wfd = fs.openSync(file, "w");
    for (let off = 0; off < FILE_SIZE; off += chunk.length)
      fs.writeSync(wfd, chunk, 0, chunk.length, off);
    fs.fsyncSync(wfd);
    fs.closeSync(wfd);
    const warm = fs.openSync(file, "r");
    for (let off = 0; off < FILE_SIZE; off += chunk.length)
      fs.readSync(warm, chunk, 0, chunk.length, off);
    fs.closeSync(warm);

    console.log(
      `@qimg/io bench: ${FILE_SIZE / 1024 / 1024} MiB file (page cache warm), ${BLOCK} B random ops, ` +
        `QD ${QD} for async cases, median of ${ROUNDS} x ${SECONDS}s; ` +
        `node ${process.version}, ${os.cpus().length} CPUs, UV_THREADPOOL_SIZE=${process.env["UV_THREADPOOL_SIZE"] ?? "4 (default)"}`,
    );

    const backend = await FileBackend.open(file);
    const handle = await fs.promises.open(file, "r+");
    const fd = fs.openSync(file, "r+");

    const readCases: [string, () => Promise<number>][] = [
      ["FileBackend.read QD64", () => runAsync((o, b) => backend.read(o, b), QD)],
      ["FileHandle.read QD64", () => runAsync((o, b) => handle.read(b, 0, BLOCK, o), QD)],
      ["FileHandle.read QD1", () => runAsync((o, b) => handle.read(b, 0, BLOCK, o), 1)],
      [
        "fs.readSync loop",
        () => Promise.resolve(runSync((o, b) => void fs.readSync(fd, b, 0, BLOCK, o))),
      ],
    ];
    const writeCases: [string, () => Promise<number>][] = [
      ["FileBackend.write QD64", () => runAsync((o, b) => backend.write(o, b), QD)],
      ["FileHandle.write QD64", () => runAsync((o, b) => handle.write(b, 0, BLOCK, o), QD)],
      [
        "fs.writeSync loop",
        () => Promise.resolve(runSync((o, b) => void fs.writeSync(fd, b, 0, BLOCK, o))),
      ],
    ];

    for (const [title, cases, baseline] of [
      ["4 KiB random reads", readCases, "FileHandle.read QD64"],
      ["4 KiB random writes (page cache, no flush)", writeCases, "FileHandle.write QD64"],
    ] as const) {
      const samples = new Map<string, number[]>(cases.map(([n]) => [n, []]));
      // Interleave rounds so drift (thermal, neighbours) hits every case alike.
      for (let r = 0; r < ROUNDS; r++) {
        for (const [name, run] of cases) samples.get(name)?.push(await run());
      }
      table(
        title,
        cases.map(([name]) => ({ name, opsPerSec: median(samples.get(name) ?? []) })),
        baseline,
      );
    }

    await backend.close();
    await handle.close();
    fs.closeSync(fd);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();

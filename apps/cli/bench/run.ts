/**
 * qimg vs qemu-img, side by side in one run: prints seconds and peak RSS for each, and the
 * ratio (qimg / qemu-img). Asserts nothing about time.
 *
 *   pnpm --filter qimg bench                                # default sizes
 *   QIMG_BENCH_SIZE=256M pnpm --filter qimg bench           # size of the general rows
 *   QIMG_BENCH_CONVERT_SIZES=1G,4G pnpm --filter qimg bench # sizes of the convert rows
 *   QIMG_BENCH_ONLY='convert' pnpm --filter qimg bench      # only rows whose name matches
 *
 * Runs the built CLI (dist/qimg.cjs) when it exists, else the source through tsx. Each case
 * runs QIMG_BENCH_REPEAT times (default 3), alternating tools, each run after a sync; the
 * table gives the median and the best run of each tool. qimg's times include Node's start-up
 * (the first row measures it), which matters at small sizes. Peak RSS comes from GNU time
 * (/usr/bin/time) when it is installed. Temporary files live under os.tmpdir() (or
 * QIMG_BENCH_DIR) and are deleted at the end.
 *
 * Adding rows: append to `cases` inside your marked block below (see `Case`); images are
 * made on first use by `rawImage(size)` / `qcow2Image(size, ...createArgs)` and shared.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import {
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  writeSync,
} from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const CLI_DIR = join(dirname(fileURLToPath(import.meta.url)), "..");
const DIST = join(CLI_DIR, "dist", "qimg.cjs");

function parseSize(text: string): number {
  const m = /^(\d+)([kmgt]?)$/i.exec(text.trim());
  if (m === null) throw new Error(`cannot parse the size '${text}'`);
  const unit = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[
    (m[2] ?? "").toLowerCase() as "" | "k" | "m" | "g" | "t"
  ];
  return Number(m[1]) * unit;
}

/** "1G", "512M", "4K" for row names. */
function sizeName(bytes: number): string {
  for (const [unit, n] of [
    ["T", 1024 ** 4],
    ["G", 1024 ** 3],
    ["M", 1024 ** 2],
    ["K", 1024],
  ] as const) {
    if (bytes >= n && bytes % n === 0) return `${bytes / n}${unit}`;
  }
  return String(bytes);
}

const SIZE = parseSize(process.env.QIMG_BENCH_SIZE ?? "1G");
const CONVERT_SIZES = (process.env.QIMG_BENCH_CONVERT_SIZES ?? "1G,4G")
  .split(",")
  .filter((s) => s.trim() !== "")
  .map(parseSize);
const BENCH_COUNT = Number(process.env.QIMG_BENCH_COUNT ?? 200000);
const REPEAT = Number(process.env.QIMG_BENCH_REPEAT ?? 3);
const ONLY =
  process.env.QIMG_BENCH_ONLY === undefined ? undefined : new RegExp(process.env.QIMG_BENCH_ONLY);

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

/** GNU time, for the children's peak RSS (its -f %M), when installed. */
const GNU_TIME = spawnSync("/usr/bin/time", ["-f", "%M", "true"]).status === 0;

const dir = mkdtempSync(join(process.env.QIMG_BENCH_DIR ?? tmpdir(), "qimg-bench-"));
const rusageFile = join(dir, "rusage.txt");

/** One run of a tool. */
interface Run {
  readonly seconds: number;
  /** Peak resident set size in bytes (undefined without GNU time). */
  readonly rss: number | undefined;
}

function run(cmd: readonly string[]): Run {
  const argv = GNU_TIME ? ["/usr/bin/time", "-o", rusageFile, "-f", "%M", ...cmd] : cmd;
  const t0 = performance.now();
  const r = spawnSync(argv[0]!, argv.slice(1), {
    encoding: "utf8",
    maxBuffer: 1 << 26,
    env: childEnv,
  });
  const seconds = (performance.now() - t0) / 1000;
  if (r.status !== 0) {
    throw new Error(`${cmd.join(" ")} failed (${r.status ?? r.signal}): ${r.stderr}`);
  }
  let rss: number | undefined;
  if (GNU_TIME) {
    const kib = Number(readFileSync(rusageFile, "utf8").trim().split("\n").pop());
    if (Number.isFinite(kib)) rss = kib * 1024;
  }
  return { seconds, rss };
}

const qemuImg = (...args: string[]): Run => run(["qemu-img", ...args]);
const qimg = (...args: string[]): Run => run([...qimgCmd, ...args]);

/** A row: the same job for both tools (argument lists after the program name). */
interface Case {
  readonly name: string;
  readonly qemu: () => readonly string[];
  readonly qimg: () => readonly string[];
  /**
   * When set, both columns run this program (a client such as nbdcopy) with the row's
   * argument lists, instead of qemu-img and qimg (the tools then serve, e.g. over NBD).
   */
  readonly client?: readonly string[];
}

/** Output files the cases write; removed before every run. */
const out = (name: string): string => join(dir, name);
const OUTPUTS = ["a.raw", "b.raw", "a.qcow2", "b.qcow2"];

const made = new Map<string, string>();

/**
 * A raw file of `size` bytes, made once: xorshift words, every 8th MiB half text
 * (compressible), so copies cannot skip anything and compression has something to do.
 */
function rawImage(size: number): string {
  const key = `raw-${size}`;
  const have = made.get(key);
  if (have !== undefined) return have;
  const path = join(dir, `src-${sizeName(size)}.raw`);
  const fd = openSync(path, "w");
  const chunk = new Uint32Array(1 << 18); // 1 MiB
  let x = 0x9e3779b9;
  for (let off = 0, mib = 0; off < size; off += chunk.byteLength, mib++) {
    for (let i = 0; i < chunk.length; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      chunk[i] = mib % 8 === 0 && i < chunk.length / 2 ? 0x41424344 + (i & 0xff) : x >>> 0;
    }
    writeSync(fd, new Uint8Array(chunk.buffer, 0, Math.min(chunk.byteLength, size - off)));
  }
  closeSync(fd);
  made.set(key, path);
  return path;
}

/** A qcow2 copy of {@link rawImage}(size), made once by qemu-img convert with `args`. */
function qcow2Image(size: number, ...args: string[]): string {
  const key = `qcow2-${size}-${args.join(" ")}`;
  const have = made.get(key);
  if (have !== undefined) return have;
  const path = join(dir, `src-${sizeName(size)}-${made.size}.qcow2`);
  qemuImg("convert", ...args, "-f", "raw", "-O", "qcow2", rawImage(size), path);
  made.set(key, path);
  return path;
}

const cases: Case[] = [
  { name: "start-up (--version)", qemu: () => ["--version"], qimg: () => ["--version"] },
];

// --- convert at scale (helper E) ---
for (const size of CONVERT_SIZES) {
  const s = sizeName(size);
  cases.push(
    {
      name: `convert qcow2 -> raw, ${s}`,
      qemu: () => ["convert", "-f", "qcow2", "-O", "raw", qcow2Image(size), out("a.raw")],
      qimg: () => ["convert", "-f", "qcow2", "-O", "raw", qcow2Image(size), out("b.raw")],
    },
    {
      name: `convert raw -> qcow2, ${s}`,
      qemu: () => ["convert", "-f", "raw", "-O", "qcow2", rawImage(size), out("a.qcow2")],
      qimg: () => ["convert", "-f", "raw", "-O", "qcow2", rawImage(size), out("b.qcow2")],
    },
  );
}
// --- end convert at scale ---

// --- compressed convert and request benchmarks ---
const S = sizeName(SIZE);
cases.push(
  {
    name: `convert -O raw (compressed qcow2), ${S}`,
    qemu: () => ["convert", "-f", "qcow2", "-O", "raw", qcow2Image(SIZE, "-c"), out("a.raw")],
    qimg: () => ["convert", "-f", "qcow2", "-O", "raw", qcow2Image(SIZE, "-c"), out("b.raw")],
  },
  {
    name: `convert -c -O qcow2 (raw), ${S}`,
    qemu: () => ["convert", "-c", "-f", "raw", "-O", "qcow2", rawImage(SIZE), out("a.qcow2")],
    qimg: () => ["convert", "-c", "-f", "raw", "-O", "qcow2", rawImage(SIZE), out("b.qcow2")],
  },
);
for (const write of [false, true]) {
  const args = (): string[] => [
    "bench",
    ...(write ? ["-w"] : []),
    "-f",
    "qcow2",
    "-c",
    String(BENCH_COUNT),
    "-d",
    "64",
    "-S",
    "1M",
    // Its own copy: the write benchmark changes the image.
    qcow2Image(SIZE),
  ];
  cases.push({
    name: `bench 4k ${write ? "writes" : "reads"}, depth 64 (${BENCH_COUNT}), ${S}`,
    qemu: args,
    qimg: args,
  });
}
// --- end compressed convert and request benchmarks ---

// --- check at scale (helper W) ---
/**
 * An empty qcow2 image whose clusters are all mapped (preallocation=metadata), made once by
 * qemu-img create: `check` walks one L2 entry and counts one refcount per cluster.
 */
function metadataImage(size: number, clusterSize: number): string {
  const key = `meta-${size}-${clusterSize}`;
  const have = made.get(key);
  if (have !== undefined) return have;
  const path = join(dir, `meta-${sizeName(size)}-${sizeName(clusterSize)}.qcow2`);
  const o = `cluster_size=${clusterSize},preallocation=metadata`;
  qemuImg("create", "-q", "-f", "qcow2", "-o", o, path, String(size));
  made.set(key, path);
  return path;
}
for (const [size, clusterSize] of [
  [8 * 1024 ** 3, 64 * 1024], // 131,072 clusters
  [8 * 1024 ** 3, 4096], // 2M clusters
  [64 * 1024 ** 3, 4096], // 16M clusters
] as const) {
  const n = size / clusterSize;
  const label = n >= 1024 ** 2 ? `${n / 1024 ** 2}M` : String(n);
  cases.push({
    name: `check, ${label} clusters (${sizeName(size)}, ${sizeName(clusterSize)} clusters, metadata)`,
    qemu: () => ["check", metadataImage(size, clusterSize)],
    qimg: () => ["check", metadataImage(size, clusterSize)],
  });
}
// --- end check at scale ---

// --- zstd (helper Z) ---
const ZSTD = ["-o", "compression_type=zstd"];
const ZS = sizeName(SIZE);

/**
 * A compressible raw file of `size` bytes, made once: per 16 KiB, 4 KiB random and 12 KiB
 * text-like. rawImage is mostly random, so qemu-img stores most of its clusters uncompressed;
 * nearly every cluster of a zstd image made from this one is a zstd frame, so reading it
 * measures the zstd decoder.
 */
function textImage(size: number): string {
  const key = `text-${size}`;
  const have = made.get(key);
  if (have !== undefined) return have;
  const path = join(dir, `text-${sizeName(size)}.raw`);
  const fd = openSync(path, "w");
  const chunk = new Uint8Array(1 << 20);
  let x = 0x2545f491;
  for (let off = 0, mib = 0; off < size; off += chunk.byteLength, mib++) {
    for (let i = 0; i < chunk.length; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      const letter = (x >>> 8) % 5 === 0 ? (x >>> 12) % 26 : (i * 7 + mib) % 13;
      chunk[i] = (i >> 12) % 4 === 0 ? x & 0xff : 97 + letter;
    }
    writeSync(fd, chunk.subarray(0, Math.min(chunk.byteLength, size - off)));
  }
  closeSync(fd);
  made.set(key, path);
  return path;
}

/** A zstd-compressed qcow2 copy of {@link textImage}(size), made once by qemu-img. */
function zstdImage(size: number): string {
  const key = `zstd-${size}`;
  const have = made.get(key);
  if (have !== undefined) return have;
  const path = join(dir, `zstd-${sizeName(size)}.qcow2`);
  qemuImg("convert", "-c", ...ZSTD, "-f", "raw", "-O", "qcow2", textImage(size), path);
  made.set(key, path);
  return path;
}

cases.push(
  {
    name: `convert -O raw (zstd qcow2), ${ZS}`,
    qemu: () => ["convert", "-f", "qcow2", "-O", "raw", zstdImage(SIZE), out("a.raw")],
    qimg: () => ["convert", "-f", "qcow2", "-O", "raw", zstdImage(SIZE), out("b.raw")],
  },
  {
    name: `convert -c zstd -O qcow2 (raw), ${ZS}`,
    qemu: () => [
      "convert",
      "-c",
      ...ZSTD,
      "-f",
      "raw",
      "-O",
      "qcow2",
      textImage(SIZE),
      out("a.qcow2"),
    ],
    qimg: () => [
      "convert",
      "-c",
      ...ZSTD,
      "-f",
      "raw",
      "-O",
      "qcow2",
      textImage(SIZE),
      out("b.qcow2"),
    ],
  },
);
// --- end zstd ---

// --- NBD: nbdcopy through qemu-nbd vs through qimg serve (helper H7) ---
/**
 * Both servers export the same 1 GiB qcow2 image read-only with -e 4 (so both offer multi-conn) over a
 * Unix socket, started once and kept running (-t) until the bench exits; the row times
 * nbdcopy copying the whole export to a raw file from each.
 */
const nbdServers: ChildProcess[] = [];
process.on("exit", () => {
  for (const p of nbdServers) p.kill("SIGTERM");
});
function nbdServer(which: "qemu" | "qimg", image: string): string {
  const key = `nbd-${which}-${image}`;
  const have = made.get(key);
  if (have !== undefined) return have;
  const socket = join(dir, `${which}.sock`);
  const args = ["-t", "-r", "-e", "4", "-f", "qcow2", "-k", socket, image];
  const p =
    which === "qemu"
      ? spawn("qemu-nbd", args, { stdio: "ignore" })
      : spawn(qimgCmd[0]!, [...qimgCmd.slice(1), "serve", ...args], {
          stdio: "ignore",
          env: childEnv,
        });
  p.unref(); // the servers must not keep the bench alive; they are stopped at exit
  nbdServers.push(p);
  for (let i = 0; i < 600 && !existsSync(socket); i++) spawnSync("sleep", ["0.05"]);
  if (!existsSync(socket)) throw new Error(`${which} NBD server did not start`);
  const uri = `nbd+unix:///?socket=${socket}`;
  made.set(key, uri);
  return uri;
}
if (
  spawnSync("nbdcopy", ["--version"]).status === 0 &&
  spawnSync("qemu-nbd", ["--version"]).status === 0
) {
  cases.push({
    name: `nbdcopy qcow2 -> raw over NBD (qemu-nbd vs qimg serve), ${S}`,
    client: ["nbdcopy"],
    qemu: () => [nbdServer("qemu", qcow2Image(SIZE)), out("a.raw")],
    qimg: () => [nbdServer("qimg", qcow2Image(SIZE)), out("b.raw")],
  });
  // The same read to nbdcopy's null: sink: the servers' side alone, no file writes.
  cases.push({
    name: `nbdcopy qcow2 -> null: over NBD (qemu-nbd vs qimg serve), ${S}`,
    client: ["nbdcopy"],
    qemu: () => [nbdServer("qemu", qcow2Image(SIZE)), "null:"],
    qimg: () => [nbdServer("qimg", qcow2Image(SIZE)), "null:"],
  });
}
// --- end NBD ---

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

const mib = (bytes: number | undefined): string =>
  bytes === undefined ? "-" : (bytes / 1024 ** 2).toFixed(0);

try {
  if (spawnSync("qemu-img", ["--version"]).status !== 0) {
    console.log("qemu-img is not installed: nothing to compare against");
  } else {
    console.log(`qimg: ${qimgCmd.slice(1).join(" ")}; ${REPEAT} runs per tool and row`);
    if (droppedCaCerts) {
      console.log("NODE_EXTRA_CA_CERTS is set here; both tools run without it (qimg uses no TLS)");
    }
    const rows: string[][] = [
      [
        "case",
        "qemu-img s",
        "qimg s",
        "ratio",
        "best qemu-img s",
        "best qimg s",
        "best ratio",
        "qemu-img MiB",
        "qimg MiB",
      ],
    ];
    // Page-cache writeback of one run slows the next, so every timing starts after a sync
    // and the two tools alternate.
    const settle = (): void => {
      spawnSync("sync");
      for (const f of OUTPUTS) rmSync(out(f), { force: true });
      spawnSync("sync");
    };
    for (const c of cases) {
      if (ONLY !== undefined && !ONLY.test(c.name)) continue;
      // Make the inputs before timing anything.
      c.qemu();
      c.qimg();
      const q: Run[] = [];
      const o: Run[] = [];
      for (let i = 0; i < REPEAT; i++) {
        settle();
        q.push(c.client ? run([...c.client, ...c.qemu()]) : qemuImg(...c.qemu()));
        settle();
        o.push(c.client ? run([...c.client, ...c.qimg()]) : qimg(...c.qimg()));
      }
      const tq = median(q.map((r) => r.seconds));
      const to = median(o.map((r) => r.seconds));
      const bq = Math.min(...q.map((r) => r.seconds));
      const bo = Math.min(...o.map((r) => r.seconds));
      const rq = q.every((r) => r.rss !== undefined)
        ? Math.max(...q.map((r) => r.rss!))
        : undefined;
      const ro = o.every((r) => r.rss !== undefined)
        ? Math.max(...o.map((r) => r.rss!))
        : undefined;
      rows.push([
        c.name,
        tq.toFixed(3),
        to.toFixed(3),
        (to / tq).toFixed(2),
        bq.toFixed(3),
        bo.toFixed(3),
        (bo / bq).toFixed(2),
        mib(rq),
        mib(ro),
      ]);
      console.log(`  ${c.name}: ${(to / tq).toFixed(2)} (best ${(bo / bq).toFixed(2)})`);
    }
    settle();
    const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
    console.log("");
    for (const r of rows) {
      console.log(
        "| " +
          r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(" | ") +
          " |",
      );
      if (r === rows[0])
        console.log(
          "|" +
            widths
              .map((w, i) => (i === 0 ? "-" : "") + "-".repeat(w + 1) + (i === 0 ? "" : ":"))
              .join("|") +
            "|",
        );
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

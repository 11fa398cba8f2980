/**
 * Copy-on-write data reaches the disk before the L2 entry that points at it, with lazy
 * refcounts too (QEMU's perform_cow calls qcow2_cache_depends_on_flush on the L2 cache every
 * time). With lazy refcounts the L2 cache depends on no other cache, so without that sync an
 * L2 table evicted from a small cache could be written, and survive a crash, while the
 * copied-on-write data it points to was lost: the guest then reads zeros where the backing
 * file's bytes (flushed long ago) were.
 *
 * The crash model: FaultBackend keeps what completed flushes made durable; a disk may also
 * have persisted any subset of the writes since the last completed flush (it reorders them),
 * so each crash point is tried with several such subsets, adversarial ones included (every
 * later write kept, every earlier one lost). After the crash the image must read every byte
 * flushed before the crash as it was, every other byte as some value written to it (never
 * bytes nobody wrote), and `qemu-img check -r all` must repair it clean.
 */
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend, RawImage } from "@qimg/io";
import type { BackendKind, BlockBackend, ReadOptions } from "@qimg/io";
import { requireQemu } from "@qimg/fixtures";
import { createQcow2, openQcow2 } from "../src/index.js";
import { prng } from "./prng.js";

const LONG = process.env.QIMG_LONG === "1";
const haveQemu = requireQemu();
if (!haveQemu)
  console.log("lazy-cow-order.test: qemu-img not found, skipping the qemu-img check step");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-lazy-cow-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

interface Logged {
  offset: number;
  data: Uint8Array;
}

/**
 * Between the driver and a FaultBackend: logs every write that reached the FaultBackend and
 * where the last completed flush was, so a crash can persist any subset of the writes since.
 */
class WriteLog implements BlockBackend {
  readonly writes: Logged[] = [];
  /** Writes [0, synced) were covered by a completed flush. */
  synced = 0;
  /** Every write, flush and truncate attempted, in order (as FaultBackend counts them). */
  readonly kinds: ("write" | "flush" | "truncate")[] = [];
  constructor(readonly inner: FaultBackend) {}
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get kind(): BackendKind {
    return this.inner.kind;
  }
  get name(): string {
    return this.inner.name;
  }
  read(offset: number, buf: Uint8Array, options?: ReadOptions): Promise<void> {
    return this.inner.read(offset, buf, options);
  }
  async write(offset: number, data: Uint8Array): Promise<void> {
    this.kinds.push("write");
    await this.inner.write(offset, data);
    this.writes.push({ offset, data: data.slice() });
  }
  async flush(): Promise<void> {
    const covered = this.writes.length;
    this.kinds.push("flush");
    await this.inner.flush();
    this.synced = covered;
  }
  size(): Promise<number> {
    return this.inner.size();
  }
  truncate(size: number): Promise<void> {
    this.kinds.push("truncate");
    return this.inner.truncate(size);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

function fill(r: () => number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (r() * 256) | 0;
  return b;
}

interface Config {
  clusterSize: number;
  size: number;
  extendedL2?: boolean;
  /** Lazy refcounts (default true). Without them the L2 cache also depends on the refcounts. */
  lazy?: boolean;
}

// Small clusters make many L2 tables (an L2 table of 512-byte clusters maps 32 KiB), and the
// driver's smallest L2 cache (4 tables) then evicts all the time.
const CONFIGS: Config[] = [
  { clusterSize: 512, size: 600_000 },
  { clusterSize: 1024, size: 1_000_000 },
  // Extended L2 (subclusters are filled in place, or a new cluster copies the old contents):
  // few L2 tables, so the crashes that matter fall inside a flush (tables written, not synced).
  { clusterSize: 16384, size: 700_000, extendedL2: true },
  // The same order without lazy refcounts, where a refcount flush's sync may stand in for it.
  { clusterSize: 512, size: 500_000, lazy: false },
];

interface Run {
  base: Uint8Array;
  /** Every write the driver made, and the guest model: after each flush / after each write. */
  log: WriteLog;
  fault: FaultBackend;
  /** Guest contents at the last completed image flush. */
  durable: Uint8Array;
  /** Guest writes since that flush (any of them may survive, in part). */
  since: Logged[];
}

/**
 * Create a lazy-refcounts image over a random raw backing file, then do random partial-cluster
 * writes (every allocation copies on write from the backing file) and a few flushes, until
 * power is lost after `lossAt` writes and flushes reached the file.
 */
async function run(seed: number, lossAt: number): Promise<Run> {
  const r = prng(seed);
  const cfg = CONFIGS[seed % CONFIGS.length]!;
  const base = fill(r, cfg.size);
  const mem = new MemoryBackend();
  await createQcow2(mem, {
    size: cfg.size,
    clusterSize: cfg.clusterSize,
    lazyRefcounts: cfg.lazy ?? true,
    extendedL2: cfg.extendedL2 ?? false,
    backingFile: "base.raw",
    backingFormat: "raw",
  });
  let ops = 0;
  const fault = await FaultBackend.wrap(mem, {
    failWhen: (op) => (op === "write" || op === "flush" || op === "truncate") && ++ops > lossAt,
  });
  const log = new WriteLog(fault);
  const image = await openQcow2(log, {
    readOnly: false,
    l2CacheBytes: 4 * cfg.clusterSize,
    openBacking: () => RawImage.open(MemoryBackend.from(base)),
  });
  const size = image.virtualSize;
  const model = new Uint8Array(size);
  model.set(base.subarray(0, size));
  let durable = model.slice();
  let since: Logged[] = [];
  const cs = cfg.clusterSize;
  // An L2 table maps cs/8 clusters; a write covers at most a few clusters, so that it is split
  // in at most two runs and each run copies on write at one end at least (never a whole
  // cluster-aligned run, where QEMU copies nothing and syncs nothing either).
  for (let i = 0; i < 200; i++) {
    try {
      if (r() < 0.06) {
        await image.flush();
        durable = model.slice();
        since = [];
        continue;
      }
      let off = Math.floor(r() * size);
      if (off % cs === 0) off++;
      let len = Math.min(1 + Math.floor(r() * 3 * cs), size - off);
      if ((off + len) % cs === 0 && len > 1) len--;
      const data = fill(r, len);
      model.set(data, off);
      since.push({ offset: off, data });
      await image.write(off, data);
    } catch {
      break; // power is gone
    }
  }
  return { base, log, fault, durable, since };
}

/** The survivor of a crash: the durable state plus the chosen writes since the last flush. */
async function survivor(
  durable: Uint8Array,
  run: Run,
  keep: (index: number, count: number) => boolean,
): Promise<Uint8Array> {
  const mem = MemoryBackend.from(durable.slice());
  const pending = run.log.writes.slice(run.log.synced);
  for (let i = 0; i < pending.length; i++) {
    if (keep(i, pending.length)) await mem.write(pending[i]!.offset, pending[i]!.data);
  }
  return mem.bytes();
}

/** Check a crashed image against the guest model; returns the first problem found. */
async function verify(bytes: Uint8Array, run: Run, label: string): Promise<void> {
  const image = await openQcow2(MemoryBackend.from(bytes), {
    openBacking: () => RawImage.open(MemoryBackend.from(run.base)),
  });
  const size = image.virtualSize;
  const back = new Uint8Array(size);
  await image.read(0, back);
  await image.close();
  for (let i = 0; i < size; i++) {
    const v = back[i];
    if (v === run.durable[i]) continue;
    const covering = run.since.filter((w) => i >= w.offset && i < w.offset + w.data.length);
    if (covering.some((w) => w.data[i - w.offset] === v)) continue;
    const flushed = covering.length === 0;
    expect.fail(
      `${label}: guest byte ${i} reads ${v}, but ${
        flushed
          ? `${run.durable[i]} was flushed before the crash and never changed`
          : `no write put that value there (flushed: ${run.durable[i]})`
      }`,
    );
  }
}

describe("lazy refcounts: copy-on-write data before the L2 entries that point to it", () => {
  it(`a crash losing any unsynced writes leaves every L2 entry pointing at written data`, async () => {
    const seeds = LONG ? 60 : 6;
    const first = Number(process.env.QIMG_SEED ?? 1);
    let checked = 0;
    for (let seed = first; seed < first + seeds; seed++) {
      // How many writes and flushes a whole run makes, then crash points across it.
      const whole = await run(seed, Number.MAX_SAFE_INTEGER);
      const total = whole.log.kinds.length;
      // Half the crash points fall just before a sync (everything since the last one is then
      // in doubt, which is where order matters most), the others anywhere.
      const beforeSync = whole.log.kinds.flatMap((k, i) => (k === "flush" && i > 0 ? [i] : []));
      const r = prng(seed ^ 0x5eed);
      // Extended L2 images have one or two L2 tables: the crashes that matter are the few
      // inside a flush, so they get more crash points (they are also cheaper).
      const extended = CONFIGS[seed % CONFIGS.length]!.extendedL2 === true;
      const points = (LONG ? 20 : 6) * (extended ? 5 : 1);
      for (let p = 0; p < points; p++) {
        const lossAt =
          p % 2 === 0 && beforeSync.length > 0
            ? beforeSync[Math.floor(r() * beforeSync.length)]!
            : 1 + Math.floor(r() * total);
        const subsetSeed = (r() * 2 ** 32) >>> 0;
        const label = `seed ${seed} (QIMG_SEED=${seed}), power lost after ${lossAt} of ${total} operations, subset seed ${subsetSeed}`;
        const crashed = await run(seed, lossAt);
        // What completed flushes made durable (FaultBackend's power loss) ...
        const durable = crashed.fault.powerLoss().bytes();
        const pick = prng(subsetSeed);
        const cut = pick();
        const subsets: [string, (i: number, n: number) => boolean][] = [
          ["none of the unsynced writes", () => false],
          ["all of them", () => true],
          ["the later ones only", (i, n) => i >= Math.floor(cut * n)],
          ["a random subset", () => pick() < 0.5],
        ];
        for (const [name, keep] of subsets) {
          // ... plus the subset of later writes the disk happened to keep.
          const bytes = await survivor(durable, crashed, keep);
          await verify(bytes, crashed, `${label}, ${name}`);
          checked++;
          if (haveQemu && (p + seed) % 4 === 0 && name !== "none of the unsynced writes") {
            const file = path.join(tmp, `crash-${seed}-${p}.qcow2`);
            fs.writeFileSync(path.join(tmp, "base.raw"), crashed.base);
            fs.writeFileSync(file, bytes);
            const fix = spawnSync("qemu-img", ["check", "-r", "all", file], { encoding: "utf8" });
            expect(
              [0, 3],
              `${label}, ${name}: qemu-img check -r all\n${fix.stdout}${fix.stderr}`,
            ).toContain(fix.status);
            const after = spawnSync("qemu-img", ["check", file], { encoding: "utf8" });
            expect(
              after.status,
              `${label}, ${name}: after -r all\n${after.stdout}${after.stderr}`,
            ).toBe(0);
            // And QEMU's repaired image still reads what we checked above.
            await verify(
              new Uint8Array(fs.readFileSync(file)),
              crashed,
              `${label}, ${name}, after qemu-img check -r all`,
            );
          }
        }
      }
    }
    expect(checked).toBeGreaterThan(0);
  }, 600_000);
});

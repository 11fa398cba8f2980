/**
 * Seeded mutation fuzzer: flip a few bytes of a fixture's metadata (header cluster, L1 table,
 * L2 tables, refcount table, snapshot table, bitmap directory), then open, info(), block
 * status over the whole disk, and read the whole disk. Every outcome must be success or a
 * QimgError; a TypeError/RangeError, a hang or an unbounded allocation fails the test.
 *
 * Short slice by default (40 iterations per fixture); QIMG_LONG=1 runs 2000. The seed comes
 * from QIMG_SEED (default below) and is printed in every failure together with the fixture,
 * the iteration and the exact bytes poked. QIMG_FUZZ_ONLY=<fixture>:<iteration> replays one.
 */
import { describe, expect, it } from "vitest";
import { QimgError } from "@qimg/structs";
import type { Qcow2Image } from "../src/index.js";
import {
  extensionsOf,
  l2OffsetOf,
  layoutOf,
  loadFixture,
  openBytes,
  peekU16,
  peekU32,
  peekU64,
} from "./poke.js";
import { seededRandom } from "@qimg/io";

const LONG = process.env.QIMG_LONG === "1";
const ITERATIONS = LONG ? 2000 : 40;
const SEED = parseSeed(process.env.QIMG_SEED) ?? 0x9e3779b9;
const ONLY = process.env.QIMG_FUZZ_ONLY;
/** Time allowed for one mutated image (open + info + block status + read). */
const ITERATION_TIMEOUT_MS = 5000;
/** RSS may grow at most this much over the run (an unbounded allocation shows up here). */
const RSS_BUDGET = 512 * 1024 * 1024;
/** Mutated sizes can be huge: read at most this much of a disk per iteration. */
const READ_BUDGET = 16 * 1024 * 1024;
const READ_CHUNK = 64 * 1024;
/** Block status calls per iteration before we stop walking (not a failure: the disk may be huge). */
const MAX_EXTENTS = 20_000;

const FIXTURES = [
  "qcow2-v2",
  "qcow2-v3",
  "qcow2-cluster-512",
  "qcow2-cluster-4k",
  "qcow2-extended-l2",
  "qcow2-compressed-zlib",
  "qcow2-compressed-zstd",
  "qcow2-compressed-v2",
  "qcow2-zero-clusters",
  "qcow2-snapshots",
  "qcow2-snapshots-v2",
  "qcow2-bitmaps",
  "qcow2-mixed",
] as const;

function parseSeed(s: string | undefined): number | undefined {
  if (s === undefined || s === "") return undefined;
  const n = Number(s);
  if (!Number.isFinite(n)) throw new Error(`QIMG_SEED must be a number, got ${s}`);
  return n >>> 0;
}

const prng = seededRandom;

/** One independent stream per (seed, fixture, iteration), so any iteration replays alone. */
function iterationSeed(seed: number, fixture: string, iteration: number): number {
  let h = seed ^ 0x85ebca6b;
  for (const c of `${fixture}#${iteration}`) h = Math.imul(h ^ c.charCodeAt(0), 0x01000193);
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  return h >>> 0;
}

interface Region {
  readonly name: string;
  readonly start: number;
  readonly end: number;
}

/** The metadata a reader looks at, found from the pristine image. */
function metadataRegions(bytes: Uint8Array): Region[] {
  const L = layoutOf(bytes);
  const cs = L.clusterSize;
  const regions: Region[] = [];
  const add = (name: string, start: number, end: number): void => {
    const e = Math.min(end, bytes.length);
    if (e > start) regions.push({ name, start, end: e });
  };
  // Header fields, then the extensions (and the backing file name) in the header cluster.
  add("header", 0, L.headerLength);
  const exts = extensionsOf(bytes);
  const extEnd =
    exts.reduce(
      (end, e) => Math.max(end, e.offset + 8 + Math.ceil(e.length / 8) * 8),
      L.headerLength,
    ) + 8;
  add("extensions", L.headerLength, extEnd);
  const backingOffset = Number(peekU64(bytes, 8));
  if (backingOffset !== 0) add("backing name", backingOffset, backingOffset + peekU32(bytes, 16));
  // Active L1 table and the L2 tables it points to (the entries that map the disk).
  add("L1", L.l1TableOffset, L.l1TableOffset + L.l1Size * 8);
  const extendedL2 = (peekU64(bytes, 72) & 16n) !== 0n && L.version >= 3;
  const entrySize = extendedL2 ? 16 : 8;
  const l2Entries = cs / entrySize;
  for (let i = 0; i < L.l1Size; i++) {
    const l2 = l2OffsetOf(bytes, i);
    if (l2 === 0) continue;
    const mapped = Math.min(l2Entries, Math.ceil((L.size - i * l2Entries * cs) / cs));
    add(`L2[${i}]`, l2, l2 + Math.max(1, mapped) * entrySize);
  }
  // Refcount table, up to its last used entry.
  const rtEnd = L.refcountTableOffset + L.refcountTableClusters * cs;
  let used = L.refcountTableOffset + 8;
  for (let p = L.refcountTableOffset; p + 8 <= Math.min(rtEnd, bytes.length); p += 8) {
    if (peekU64(bytes, p) !== 0n) used = p + 8;
  }
  add("refcount table", L.refcountTableOffset, used);
  // Snapshot table: walk the entries to find its end.
  if (L.nbSnapshots > 0) {
    let p = L.snapshotsOffset;
    for (let i = 0; i < L.nbSnapshots; i++) {
      const extra = peekU32(bytes, p + 36);
      p = Math.ceil((p + 40 + extra + peekU16(bytes, p + 12) + peekU16(bytes, p + 14)) / 8) * 8;
    }
    add("snapshot table", L.snapshotsOffset, p);
  }
  // Bitmap directory (read at open while the bitmaps autoclear bit is set).
  const bm = exts.find((e) => e.type === 0x23852875);
  if (bm) {
    const dirSize = Number(peekU64(bytes, bm.offset + 8 + 8));
    const dirOffset = Number(peekU64(bytes, bm.offset + 8 + 16));
    add("bitmap directory", dirOffset, dirOffset + dirSize);
  }
  return regions;
}

interface Poke {
  readonly region: string;
  readonly offset: number;
  readonly before: number;
  readonly after: number;
}

function mutate(bytes: Uint8Array, regions: readonly Region[], rand: () => number): Poke[] {
  const pokes: Poke[] = [];
  const n = 1 + Math.floor(rand() * 8);
  for (let k = 0; k < n; k++) {
    const r = regions[Math.floor(rand() * regions.length)]!;
    const offset = r.start + Math.floor(rand() * (r.end - r.start));
    const before = bytes[offset]!;
    const how = rand();
    let after: number;
    if (how < 0.55) after = before ^ (1 + Math.floor(rand() * 255));
    else if (how < 0.7) after = before ^ (1 << Math.floor(rand() * 8));
    else if (how < 0.85) after = 0;
    else after = 0xff;
    bytes[offset] = after;
    pokes.push({ region: r.name, offset, before, after });
  }
  return pokes;
}

function describePokes(pokes: readonly Poke[]): string {
  return pokes
    .map(
      (p) =>
        `${p.region} @0x${p.offset.toString(16)}: 0x${p.before.toString(16)} -> 0x${p.after.toString(16)}`,
    )
    .join("; ");
}

class Hang extends Error {}

type Outcome = "open-failed" | "opened";

/** Throw anything that is not a QimgError; return whether the operation failed cleanly. */
async function allowed<T>(
  phase: string,
  body: () => Promise<T>,
): Promise<{ ok: true; value: T } | { ok: false }> {
  try {
    return { ok: true, value: await body() };
  } catch (e) {
    if (e instanceof QimgError) return { ok: false };
    throw new PhaseError(phase, e);
  }
}

class PhaseError extends Error {
  constructor(
    readonly phase: string,
    readonly original: unknown,
  ) {
    super(
      `${phase}: ${original instanceof Error ? `${original.name}: ${original.message}\n${original.stack ?? ""}` : String(original)}`,
    );
  }
}

async function exercise(bytes: Uint8Array, deadline: number): Promise<Outcome> {
  const checkTime = (where: string): void => {
    if (Date.now() > deadline)
      throw new Hang(`no progress within ${ITERATION_TIMEOUT_MS} ms (${where})`);
  };
  const opened = await allowed("open", () => openBytes(bytes));
  if (!opened.ok) return "open-failed";
  const img: Qcow2Image = opened.value;
  try {
    await allowed("info", () => Promise.resolve(img.info()));
    const size = img.virtualSize;
    if (!Number.isSafeInteger(size) || size < 0)
      throw new PhaseError("open", new Error(`virtualSize ${size}`));

    // Block status over the whole disk; after a (typed) error, skip ahead and keep walking.
    const zeros: [number, number][] = [];
    let pos = 0;
    let extents = 0;
    while (pos < size && extents < MAX_EXTENTS) {
      checkTime(`block status at ${pos}`);
      extents++;
      const r = await allowed(`blockStatus(${pos}, ${size - pos})`, () =>
        img.blockStatus(pos, size - pos),
      );
      if (!r.ok) {
        pos = Math.min(size, (Math.floor(pos / READ_CHUNK) + 1) * READ_CHUNK);
        continue;
      }
      const s = r.value;
      if (
        s.offset !== pos ||
        !Number.isSafeInteger(s.length) ||
        s.length <= 0 ||
        pos + s.length > size
      ) {
        throw new PhaseError(
          "blockStatus",
          new Error(`bad extent ${JSON.stringify(s)} for request at ${pos} of ${size}`),
        );
      }
      if (s.zero && zeros.length < 10_000) zeros.push([pos, pos + s.length]);
      pos += s.length;
    }

    // Read the disk (all of it when it is small, else a bounded sample), chunk by chunk so one
    // bad cluster does not hide the rest. Ranges block status called zero must read as zeros.
    const spans: [number, number][] =
      size <= READ_BUDGET
        ? [[0, size]]
        : [
            [0, READ_BUDGET / 2],
            [size - READ_BUDGET / 2, size],
          ];
    const buf = new Uint8Array(READ_CHUNK);
    for (const [from, to] of spans) {
      for (let at = from; at < to; at += READ_CHUNK) {
        checkTime(`read at ${at}`);
        const n = Math.min(READ_CHUNK, to - at);
        const chunk = buf.subarray(0, n);
        chunk.fill(0xa5);
        const r = await allowed(`read(${at}, ${n})`, () => img.read(at, chunk));
        if (!r.ok) continue;
        for (const [zs, ze] of zeros) {
          const a = Math.max(zs, at);
          const b = Math.min(ze, at + n);
          for (let i = a; i < b; i++) {
            if (chunk[i - at] !== 0) {
              throw new PhaseError(
                "read",
                new Error(
                  `byte ${i} reads 0x${chunk[i - at]!.toString(16)} but block status said [${zs}, ${ze}) is zero`,
                ),
              );
            }
          }
        }
      }
    }
    return "opened";
  } finally {
    await allowed("close", () => img.close());
  }
}

async function runIteration(
  name: string,
  pristine: Uint8Array,
  regions: readonly Region[],
  i: number,
): Promise<{ outcome: Outcome; pokes: Poke[] }> {
  const bytes = pristine.slice();
  const pokes = mutate(bytes, regions, prng(iterationSeed(SEED, name, i)));
  const deadline = Date.now() + ITERATION_TIMEOUT_MS;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Hang(`timed out after ${ITERATION_TIMEOUT_MS} ms`)),
      ITERATION_TIMEOUT_MS,
    );
  });
  try {
    const outcome = await Promise.race([exercise(bytes, deadline), timeout]);
    return { outcome, pokes };
  } catch (e) {
    const what =
      e instanceof PhaseError ? e.message : e instanceof Hang ? `hang: ${e.message}` : String(e);
    throw new Error(
      `QIMG_SEED=${SEED} QIMG_FUZZ_ONLY=${name}:${i} pokes [${describePokes(pokes)}]\n${what}`,
      { cause: e },
    );
  } finally {
    clearTimeout(timer);
  }
}

const only = ONLY?.match(/^(.+):(\d+)$/);
const selected = only ? FIXTURES.filter((f) => f === only[1]) : FIXTURES;
if (only && selected.length === 0)
  throw new Error(`QIMG_FUZZ_ONLY names an unknown fixture: ${ONLY}`);

describe(`qcow2 metadata mutation fuzzer (seed ${SEED}, ${ITERATIONS} iterations per fixture)`, () => {
  const rssStart = process.memoryUsage().rss;

  it.each(selected)("%s", async (name) => {
    const pristine = loadFixture(name);
    const regions = metadataRegions(pristine);
    expect(regions.length).toBeGreaterThan(2);
    const iterations = only ? [Number(only[2])] : Array.from({ length: ITERATIONS }, (_, i) => i);
    const failures: string[] = [];
    const counts: Record<Outcome, number> = { "open-failed": 0, opened: 0 };
    for (const i of iterations) {
      try {
        const { outcome } = await runIteration(name, pristine, regions, i);
        counts[outcome]++;
      } catch (e) {
        failures.push((e as Error).message);
        if (failures.length >= 10) break;
      }
      const grown = process.memoryUsage().rss - rssStart;
      if (grown > RSS_BUDGET) {
        failures.push(
          `QIMG_SEED=${SEED} QIMG_FUZZ_ONLY=${name}:${i}: RSS grew by ${Math.round(grown / 2 ** 20)} MiB (budget ${RSS_BUDGET / 2 ** 20} MiB)`,
        );
        break;
      }
    }
    if (LONG || process.env.QIMG_FUZZ_STATS === "1") {
      console.log(
        `${name}: ${counts.opened} opened, ${counts["open-failed"]} refused, ${failures.length} failures (seed ${SEED})`,
      );
    }
    expect(failures, `fuzz failures for ${name} (seed ${SEED}):\n${failures.join("\n\n")}`).toEqual(
      [],
    );
    // The fuzzer must reach the read path, not only bounce off the header checks.
    if (!only && iterations.length >= 40) expect(counts.opened).toBeGreaterThan(0);
  });
});

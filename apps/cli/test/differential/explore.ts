/**
 * Run the differential suite outside vitest and print every failure (shrunk), grouped by
 * category: `node --conditions=@qimg/source --import tsx apps/cli/test/differential/explore.ts
 * [cases] [baseSeed] [long]`.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CI_LIMITS, LONG_LIMITS, generateCase } from "./gen.js";
import { formatFailure, runCase, runPool, shrink, timings, type CaseResult } from "./run.js";

const cases = Number(process.argv[2] ?? 100);
const base = Number(process.argv[3] ?? 1);
const limits = process.argv[4] === "long" ? LONG_LIMITS : CI_LIMITS;
const PER_CATEGORY = Number(process.env.PER_CATEGORY ?? 3);
/** A coarse key of what a case exercises, to pick different examples of one category. */
function featureKey(r: CaseResult): string {
  const c = r.spec;
  const opts = c.options
    .filter((o) => !/^(cluster_size|refcount_bits=16|compat=1.1|.*=off)/.test(o))
    .map((o) => o.replace(/=.*$/, (v) => (/^=(on|zlib)$/.test(v) ? "" : v)));
  return [
    c.format,
    c.backing ? `backing-${c.backing.format}` : "",
    c.dataFile ? "data_file" : "",
    ...opts,
    ...[...new Set(c.ops.map((o) => o.k))].sort(),
  ]
    .filter((x) => x !== "")
    .join(" ");
}
const root = mkdtempSync(join(tmpdir(), "qimg-diff-"));
const t0 = Date.now();
const seeds = Array.from({ length: cases }, (_, i) => base + i);
const results = await runPool(seeds, 2, (seed) =>
  runCase(generateCase(seed, limits), root, process.env.KEEP === "1"),
);
const byCat = new Map<string, CaseResult[]>();
let skipped = 0;
const reasons = new Map<string, number>();
for (const r of results) {
  if (r.skipped) {
    skipped++;
    reasons.set(r.skipReason ?? "", (reasons.get(r.skipReason ?? "") ?? 0) + 1);
  }
  for (const c of new Set(r.failures.map((f) => f.category))) {
    const l = byCat.get(c) ?? [];
    l.push(r);
    byCat.set(c, l);
  }
}
console.log(
  `${cases} cases (${skipped} skipped: QEMU refused the options) in ${((Date.now() - t0) / 1000).toFixed(1)} s; ${byCat.size} failure categories`,
);
for (const [k, t] of [...timings].sort((a, b) => b[1].ms - a[1].ms)) {
  console.log(
    `  time ${k}: ${(t.ms / 1000).toFixed(1)} s in ${t.n} (${(t.ms / t.n).toFixed(0)} ms each)`,
  );
}
const noted = results.filter((r) => r.notes.length > 0);
for (const r of noted) console.log(`  QEMU-side note, seed ${r.spec.seed}: ${r.notes.join("; ")}`);
for (const [why, n] of reasons) console.log(`  skipped ${n}: ${why}`);
for (const [cat, rs] of [...byCat].sort()) {
  console.log(
    `\n=== ${cat}: ${rs.length} cases, seeds ${rs
      .slice(0, 12)
      .map((r) => r.spec.seed)
      .join(" ")}`,
  );
  // Up to PER_CATEGORY cases with different features, each shrunk: one category may hide
  // several bugs.
  const seen = new Set<string>();
  const sorted = [...rs].sort((a, b) => a.spec.ops.length - b.spec.ops.length);
  for (const r of sorted) {
    const key = featureKey(r);
    if (seen.has(key) || seen.size >= PER_CATEGORY) continue;
    seen.add(key);
    const small = process.env.NOSHRINK === "1" ? r : await shrink(r, root, cat);
    console.log(`-- features: ${key}`);
    console.log(formatFailure(small, cat));
  }
}
if (process.env.KEEP === "1") console.log(`kept ${root}`);
else rmSync(root, { recursive: true, force: true });

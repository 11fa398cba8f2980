/**
 * Scan a 64 KiB qcow2-style L2 table (8192 big-endian u64 entries) and sum the masked host
 * offsets: once through U64TableView (two 32-bit reads, no allocation per entry) and once with
 * a BigInt per entry (DataView.getBigUint64 + BigInt masking), in the same run.
 * Prints entries/second for both and the ratio. Asserts nothing about time.
 */
import { U64TableView, mask64 } from "../src/index.js";

const ENTRIES = 8192;
const OFFSET_MASK = 0x00ff_ffff_ffff_fe00n;
const OFFSET = mask64(OFFSET_MASK);

const bytes = new Uint8Array(ENTRIES * 8);
const dv = new DataView(bytes.buffer);
for (let i = 0; i < ENTRIES; i++) {
  // COPIED flag + a cluster-aligned host offset, as a fully allocated L2 table has.
  dv.setBigUint64(i * 8, (1n << 63n) | BigInt(0x5000_0000 + i * 65536), false);
}

function scanView(): number {
  const t = new U64TableView(bytes, "big");
  let sum = 0;
  for (let i = 0; i < t.length; i++) sum += t.getMasked(i, OFFSET);
  return sum;
}

function scanBigInt(): number {
  let sum = 0n;
  for (let i = 0; i < ENTRIES; i++) sum += dv.getBigUint64(i * 8, false) & OFFSET_MASK;
  return Number(sum);
}

function measure(name: string, fn: () => number): number {
  for (let i = 0; i < 200; i++) fn(); // warm up the JIT
  let scans = 0;
  let check = 0;
  const start = performance.now();
  let now = start;
  while (now - start < 1000) {
    for (let k = 0; k < 50; k++) check = fn();
    scans += 50;
    now = performance.now();
  }
  const rate = (scans * ENTRIES) / ((now - start) / 1000);
  console.log(
    `${name.padEnd(28)} ${(rate / 1e6).toFixed(1).padStart(8)} M entries/s  (sum ${check})`,
  );
  return rate;
}

console.log(
  `@qimg/structs bench: scan a 64 KiB table (${ENTRIES} u64 entries), sum masked offsets`,
);
const a = measure("U64TableView.getMasked", scanView);
const b = measure("BigInt per entry (baseline)", scanBigInt);
console.log(`ratio view/bigint: ${(a / b).toFixed(1)}x`);

/**
 * Power loss at every step of a shrink (`resizeWith(n, { shrink: true })`): after each write,
 * flush or truncate of the shrink the power goes (unsynced writes lost, the last one maybe
 * torn). `qemu-img check -r all` must repair the image to a clean verdict, and every guest
 * byte below the new size must read as before the shrink.
 */
import fs from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend } from "@qimg/io";
import { requireQemu } from "@qimg/fixtures";
import { createQcow2, openQcow2 } from "../src/index.js";
import type { Qcow2CreateOptions } from "../src/index.js";
import { prng } from "./prng.js";
import { qemuImg, scratchDirs } from "./twins.js";

const LONG = process.env.QIMG_LONG === "1";
const haveQemu = requireQemu();
if (!haveQemu) console.log("skipping shrink crash test: qemu-img is not on PATH");
const newDir = scratchDirs("qimg-shrink-crash-");

const CONFIGS: Qcow2CreateOptions[] = [
  { size: 3 << 20, clusterSize: 4096 },
  { size: (3 << 20) + 7 * 512, clusterSize: 512, refcountBits: 64 },
  { size: 5 << 20, clusterSize: 65536, extendedL2: true, lazyRefcounts: true },
  { size: (2 << 20) + 4096 + 512, clusterSize: 1024, compat: "0.10" },
  { size: 3 << 20, clusterSize: 512, refcountBits: 2 },
];

function fill(seed: number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  const r = prng(seed);
  for (let i = 0; i < len; i++) b[i] = (r() * 256) | 0;
  return b;
}

/** A written image (bytes) and its guest content. */
async function makeImage(seed: number): Promise<{ bytes: Uint8Array; guest: Uint8Array }> {
  const r = prng(seed);
  const cfg = CONFIGS[seed % CONFIGS.length]!;
  const mem = new MemoryBackend();
  await createQcow2(mem, cfg);
  const image = await openQcow2(mem, { readOnly: false });
  const size = image.virtualSize;
  const cs = image.clusterSize;
  // Compressed clusters first (they need unallocated clusters), then plain writes.
  const compressed = new Set<number>();
  for (let i = 0; i < 6; i++) {
    const c = Math.floor((r() * size) / cs);
    if ((c + 1) * cs > size || compressed.has(c)) continue;
    compressed.add(c);
    await image.writeCompressed(c * cs, fill(seed * 100 + i, cs).fill(7, 0, cs / 2));
  }
  for (let i = 0; i < 40; i++) {
    const off = Math.floor(r() * size);
    const len = Math.min(size - off, 1 + Math.floor(r() * 6 * cs));
    await image.write(off, fill(seed * 1000 + i, len));
  }
  await image.close();
  const check = await openQcow2(MemoryBackend.from(mem.bytes()));
  const guest = new Uint8Array(check.virtualSize);
  await check.read(0, guest);
  await check.close();
  return { bytes: mem.bytes(), guest };
}

/** Shrink a copy of `bytes`, losing power after `lossAt` operations (Infinity: never). */
async function shrinkWithLoss(
  bytes: Uint8Array,
  newSize: number,
  lossAt: number,
  seed: number,
): Promise<{ survivor: Uint8Array; ops: number; finished: boolean }> {
  const mem = MemoryBackend.from(bytes);
  let armed = false;
  let ops = 0;
  const fault = await FaultBackend.wrap(mem, {
    failWhen: (op) => armed && op !== "read" && ++ops > lossAt,
  });
  const image = await openQcow2(fault, { readOnly: false });
  armed = true;
  let finished = false;
  try {
    await image.resizeWith(newSize, { shrink: true });
    await image.close();
    finished = true;
  } catch {
    // the power is gone
  }
  const survivor = finished
    ? mem.bytes()
    : fault.powerLoss({ tearLastWrite: seed % 2 === 0, seed }).bytes();
  return { survivor, ops, finished };
}

async function crashCase(seed: number): Promise<void> {
  const { bytes, guest } = await makeImage(seed);
  const r = prng(seed ^ 0xabc);
  const newSize = Math.max(512, Math.floor((r() * guest.length) / 512) * 512);
  const full = await shrinkWithLoss(bytes, newSize, Infinity, seed);
  expect(full.finished).toBe(true);
  const dir = newDir();
  const steps = LONG ? full.ops : Math.min(full.ops, 40);
  for (let k = 0; k <= steps; k++) {
    const lossAt = steps === full.ops ? k : Math.floor((k * full.ops) / steps);
    if (process.env.H4_DEBUG) console.log("k", k, lossAt, full.ops);
    const { survivor } = await shrinkWithLoss(bytes, newSize, lossAt, seed + k);
    const file = path.join(dir, `k${k}.qcow2`);
    fs.writeFileSync(file, survivor);
    const why = `seed ${seed}, power lost after ${lossAt} of ${full.ops} operations (new size ${newSize})`;
    const repair = qemuImg(["check", "-r", "all", file]);
    expect([0], `${why}: ${repair.stdout}${repair.stderr}`).toContain(repair.code);
    const again = qemuImg(["check", file]);
    expect(again.code, `${why}: ${again.stdout}${again.stderr}`).toBe(0);
    const image = await openQcow2(MemoryBackend.from(fs.readFileSync(file)));
    const back = new Uint8Array(newSize);
    await image.read(0, back);
    expect(image.virtualSize === newSize || image.virtualSize === guest.length, why).toBe(true);
    await image.close();
    expect(Buffer.compare(back, guest.subarray(0, newSize)), `${why}: guest data lost`).toBe(0);
  }
}

describe.skipIf(!haveQemu)("shrink survives power loss at every step", () => {
  const seeds = LONG ? Array.from({ length: 50 }, (_, i) => 100 + i) : [1, 2, 3, 4, 5];
  it.each(seeds)(
    "seed %i",
    async (seed) => {
      await crashCase(seed);
    },
    120_000,
  );
});

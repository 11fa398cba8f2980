import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend } from "@qimg/io";
import { requireQemu } from "@qimg/fixtures";
import { createQcow2, openQcow2 } from "../src/index.js";
import type { Qcow2CreateOptions } from "../src/index.js";
import { consistency } from "./consistency.js";
import { prng } from "./prng.js";

const LONG = process.env.QIMG_LONG === "1";
const haveQemu = requireQemu();
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-crash-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const CONFIGS: Qcow2CreateOptions[] = [
  { size: 2 << 20, clusterSize: 4096 },
  { size: 2 << 20, clusterSize: 4096, lazyRefcounts: true },
  { size: 1 << 20, clusterSize: 512, refcountBits: 2 },
  { size: 4 << 20, clusterSize: 65536, extendedL2: true, lazyRefcounts: true },
  { size: 2 << 20, clusterSize: 4096, compat: "0.10" },
];

function fill(seed: number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  const r = prng(seed);
  for (let i = 0; i < len; i++) b[i] = (r() * 256) | 0;
  return b;
}

/**
 * Random writes, zeroes, discards and flushes; power is lost after a random number of
 * write/flush operations reach the file. Then the image must reopen (repairing itself when
 * dirty), show every byte that was durable at the last completed flush, and have no refcount
 * below its references.
 */
async function crashRun(seed: number): Promise<void> {
  const r = prng(seed);
  const cfg = CONFIGS[seed % CONFIGS.length]!;
  const mem = new MemoryBackend();
  await createQcow2(mem, cfg);
  let ops = 0;
  const lossAt = 5 + Math.floor(r() * 120);
  const fault = await FaultBackend.wrap(mem, {
    failWhen: (op) => (op === "write" || op === "flush" || op === "truncate") && ++ops > lossAt,
  });
  const image = await openQcow2(fault, { readOnly: false });
  const size = image.virtualSize;
  const cs = image.clusterSize;
  const model = new Uint8Array(size);
  let durable = model.slice();
  // Bytes touched since the last completed flush may read either way after the crash.
  let touched = new Uint8Array(size);
  let dead = false;
  for (let i = 0; i < 200 && !dead; i++) {
    const x = r();
    const aligned = r() < 0.4;
    let off = Math.floor(r() * size);
    let len = 1 + Math.floor(r() * (aligned ? 3 * cs : 3000));
    if (aligned) off = Math.floor(off / cs) * cs;
    len = Math.min(len, size - off);
    try {
      if (x < 0.6) {
        const d = fill(seed * 1000 + i, len);
        await image.write(off, d);
        model.set(d, off);
        touched.fill(1, off, off + len);
      } else if (x < 0.75) {
        await image.writeZeroes(off, len, { mayUnmap: r() < 0.5 });
        model.fill(0, off, off + len);
        touched.fill(1, off, off + len);
      } else if (x < 0.85) {
        await image.discard(off, len);
        const a = Math.ceil(off / cs) * cs;
        const e = off + len === size ? size : Math.floor((off + len) / cs) * cs;
        if (e > a) {
          model.fill(0, a, e);
          touched.fill(1, a, e);
        }
      } else {
        await image.flush();
        durable = model.slice();
        touched = new Uint8Array(size);
      }
    } catch {
      dead = true; // power is gone: nothing after this reaches the disk
      touched.fill(1, off, off + len);
    }
  }
  const survivor = fault.powerLoss({ tearLastWrite: r() < 0.5, seed });
  const bytes = survivor.bytes();
  // Reopen read-write: a dirty (lazy refcounts) image repairs itself here.
  const repaired = MemoryBackend.from(bytes);
  const again = await openQcow2(repaired, { readOnly: false });
  const back = new Uint8Array(size);
  await again.read(0, back);
  for (let i = 0; i < size; i++) {
    if (touched[i] === 0 && back[i] !== durable[i]) {
      expect.fail(
        `seed ${seed}: byte ${i} reads ${back[i]} but ${durable[i]} was flushed before the crash`,
      );
    }
  }
  await again.close();
  const c = await consistency(MemoryBackend.from(repaired.bytes()));
  expect(c.corruptions, `seed ${seed}: refcounts below references after reopen`).toEqual([]);
  // The crash image itself, before any repair, may only leak (unless lazy: then it is dirty).
  const crashImage = await openQcow2(MemoryBackend.from(bytes));
  const dirty = crashImage.info().dirty;
  await crashImage.close();
  if (!dirty) {
    const raw = await consistency(MemoryBackend.from(bytes));
    expect(raw.corruptions, `seed ${seed}: crash image has refcounts below references`).toEqual([]);
  }
  if (haveQemu && seed % 10 === 0) {
    const file = path.join(tmp, `crash-${seed}.qcow2`);
    fs.writeFileSync(file, repaired.bytes());
    const q = spawnSync("qemu-img", ["check", file], { encoding: "utf8" });
    expect([0, 3], `seed ${seed}: ${q.stdout}${q.stderr}`).toContain(q.status);
  }
}

describe("crash safety", () => {
  const base = Number(process.env.QIMG_SEED ?? 1);
  const runs = LONG ? 3000 : 60;
  it(`survives power loss at random points (${runs} seeded runs from seed ${base})`, async () => {
    for (let s = base; s < base + runs; s++) await crashRun(s);
  }, 600_000);
});

describe("injected I/O errors", () => {
  it("fail the request and leave the image consistent and usable", async () => {
    for (let seed = 1; seed <= (LONG ? 500 : 25); seed++) {
      const r = prng(seed);
      const mem = new MemoryBackend();
      await createQcow2(mem, { size: 2 << 20, clusterSize: 4096 });
      const fault = await FaultBackend.wrap(mem, {
        trackDurability: false,
        failWhen: (op) => (op === "write" || op === "flush") && r() < 0.08,
      });
      const image = await openQcow2(fault, { readOnly: false });
      const size = image.virtualSize;
      const model = new Uint8Array(size);
      let failures = 0;
      for (let i = 0; i < 120; i++) {
        const off = Math.floor(r() * size);
        const len = Math.min(1 + Math.floor(r() * 4096), size - off, 4096 - (off % 4096));
        try {
          if (r() < 0.85) {
            const d = fill(seed * 7919 + i, len);
            await image.write(off, d);
            model.set(d, off);
          } else {
            await image.flush();
          }
        } catch (e) {
          failures++;
          expect((e as Error).message, `seed ${seed}`).toMatch(/injected|fail/i);
        }
      }
      const back = new Uint8Array(size);
      await image.read(0, back);
      expect(
        Buffer.compare(back, model),
        `seed ${seed}: image differs from the successful writes`,
      ).toBe(0);
      fault.clearFaults();
      await image.close();
      const c = await consistency(MemoryBackend.from(mem.bytes()));
      expect(c.corruptions, `seed ${seed}`).toEqual([]);
      const reopened = await openQcow2(MemoryBackend.from(mem.bytes()));
      const after = new Uint8Array(size);
      await reopened.read(0, after);
      expect(
        Buffer.compare(after, model),
        `seed ${seed}: data lost across close (${failures} failures)`,
      ).toBe(0);
    }
  }, 600_000);
});

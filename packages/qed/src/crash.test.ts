import { describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend, RawImage } from "@qimg/io";
import type { MemoryBackend as Mem } from "@qimg/io";
import { checkQed } from "./check.js";
import { createQed } from "./create.js";
import { openQed } from "./image.js";
import type { QedImage } from "./image.js";
import { FakeTimer, LONG, pattern, prng } from "./testing/util.js";

const K = 1024;
const SIZE = 4 * 1024 * 1024;

/**
 * Random operations, power lost at a random write (the last unflushed write possibly torn),
 * reopen read-write (which checks and repairs), then: every byte last changed before the last
 * completed flush must read back; the image must check clean.
 */
async function crashRun(seed: number, withBacking: boolean): Promise<void> {
  const rand = prng(seed);
  const base = new Uint8Array(SIZE).map((_, i) => ((i >> 12) * 7 + 1) & 0xff);
  const m = new MemoryBackend();
  await createQed(m, {
    size: SIZE,
    clusterSize: rand() < 0.5 ? 4096 : 65536,
    tableSize: rand() < 0.5 ? 1 : 2,
    ...(withBacking ? { backingFile: "base", backingFormat: "raw" } : {}),
  });
  const openBacking = withBacking
    ? async () => await RawImage.open(MemoryBackend.from(base))
    : undefined;
  const fault = await FaultBackend.wrap(m);
  const timer = new FakeTimer();
  const img: QedImage = await openQed(fault, {
    readOnly: false,
    timer,
    ...(openBacking ? { openBacking } : {}),
  });
  const model = withBacking ? base.slice() : new Uint8Array(SIZE);
  let durable = model.slice();
  const dirty = new Uint8Array(SIZE);

  const lossAt = 1 + Math.floor(rand() * 120);
  let survivor: Mem | undefined;
  fault.failWhen((op, _o, _l, count) => {
    if (survivor === undefined && op === "write" && count >= lossAt) {
      survivor = fault.powerLoss({ tearLastWrite: true, seed });
    }
    return false;
  });

  try {
    for (let step = 0; step < 200 && survivor === undefined; step++) {
      const r = rand();
      const off = Math.floor(rand() * (SIZE - 1));
      const len = Math.min(SIZE - off, 1 + Math.floor(rand() * 150 * K));
      if (r < 0.6) {
        const d = pattern(len, Math.floor(rand() * 256));
        model.set(d, off);
        dirty.fill(1, off, off + len);
        await img.write(off, d);
      } else if (r < 0.75) {
        model.fill(0, off, off + len);
        dirty.fill(1, off, off + len);
        await img.writeZeroes(off, len);
      } else if (r < 0.9) {
        await img.flush();
        durable = model.slice();
        dirty.fill(0);
      } else {
        timer.advance(6000);
        await img.whenIdle();
      }
    }
  } catch (e) {
    if (survivor === undefined) throw e;
  }
  if (survivor === undefined) survivor = fault.powerLoss({ tearLastWrite: true, seed });

  const reopened = await openQed(survivor, {
    readOnly: false,
    ...(openBacking ? { openBacking } : {}),
  });
  expect(reopened.needCheck, `seed ${seed}`).toBe(false);
  const got = new Uint8Array(SIZE);
  await reopened.read(0, got);
  for (let i = 0; i < SIZE; i++) {
    if (dirty[i] === 0 && got[i] !== durable[i]) {
      throw new Error(
        `seed ${seed} (backing ${withBacking}): byte ${i} reads ${got[i]}, flushed value was ${durable[i]}`,
      );
    }
  }
  const check = await checkQed(reopened);
  expect(check.corruptions, `seed ${seed}`).toBe(0);
  await reopened.close();
}

describe("crash consistency (power loss at random writes)", () => {
  const runs = LONG ? 300 : 12;
  it(`without a backing file (${runs} seeds)`, async () => {
    for (let s = 1; s <= runs; s++) await crashRun(s, false);
  });
  it(`with a backing file (${runs} seeds)`, async () => {
    for (let s = 1; s <= runs; s++) await crashRun(1000 + s, true);
  });
});

import { describe, expect, it } from "vitest";
import { FaultBackend, MemoryBackend, RawImage } from "@qimg/io";
import { createQed } from "./create.js";
import { openQed } from "./image.js";
import { decodeQedHeader } from "./spec/header.js";
import { FakeTimer, pattern } from "./testing/util.js";

const K = 1024;
const M = 1024 * 1024;

async function setup() {
  const m = new MemoryBackend();
  await createQed(m, { size: 4 * M });
  const fault = await FaultBackend.wrap(m);
  const timer = new FakeTimer();
  const log: string[] = [];
  fault.failWhen((op, offset, length) => {
    if (op === "write") log.push(offset === 0 && length === 64 ? "header" : `write ${offset}`);
    if (op === "flush") log.push("flush");
    return false;
  });
  const img = await openQed(fault, { readOnly: false, timer, needCheckClearDelayMs: 5000 });
  const onDisk = () => (decodeQedHeader(m.snapshot()).features & 2n) !== 0n;
  return { m, fault, timer, img, log, onDisk };
}

describe("need-check bit", () => {
  it("is set and flushed before the first allocating write reaches the disk", async () => {
    const { fault, img, log, onDisk } = await setup();
    await img.write(0, pattern(4 * K, 1));
    expect(log.slice(0, 3)).toEqual(["header", "flush", "write 327680"]);
    expect(onDisk()).toBe(true);
    // Durable: a power loss now still has the bit set.
    const survivor = fault.powerLoss();
    expect(decodeQedHeader(survivor.snapshot()).features & 2n).toBe(2n);
  });

  it("is cleared after the quiet period, with a flush first", async () => {
    const { timer, img, log, onDisk } = await setup();
    await img.write(0, pattern(4 * K, 1));
    expect(timer.pending.size).toBe(1);
    timer.advance(4999);
    await img.whenIdle();
    expect(onDisk()).toBe(true);
    log.length = 0;
    timer.advance(1);
    await img.whenIdle();
    expect(onDisk()).toBe(false);
    expect(img.needCheck).toBe(false);
    expect(log).toEqual(["flush", "header", "flush"]);
  });

  it("restarts the quiet period on each allocating write; in-place writes do not set it", async () => {
    const { timer, img, onDisk } = await setup();
    await img.write(0, pattern(4 * K, 1));
    timer.advance(3000);
    await img.write(M, pattern(4 * K, 2));
    timer.advance(3000);
    await img.whenIdle();
    expect(onDisk()).toBe(true);
    timer.advance(2000);
    await img.whenIdle();
    expect(onDisk()).toBe(false);
    await img.write(100, pattern(10, 3)); // allocated: in place
    expect(onDisk()).toBe(false);
    expect(timer.pending.size).toBe(0);
    await img.writeZeroes(2 * M, 64 * K); // zero clusters are allocations too
    expect(onDisk()).toBe(true);
  });

  it("an allocation racing the clean waits for it and sets the bit again", async () => {
    const { timer, img, onDisk } = await setup();
    await img.write(0, pattern(4 * K, 1));
    timer.advance(5000);
    const w = img.write(M, pattern(4 * K, 2)); // starts while the clean is running
    await w;
    await img.whenIdle();
    expect(onDisk()).toBe(true);
    expect(img.needCheck).toBe(true);
  });

  it("is cleared on close", async () => {
    const { m, img } = await setup();
    await img.write(0, pattern(4 * K, 1));
    await img.close();
    expect(decodeQedHeader(m.snapshot()).features & 2n).toBe(0n);
  });

  it("is never set with a backing file; data is flushed before the table update", async () => {
    const m = new MemoryBackend();
    await createQed(m, { size: 2 * M, backingFile: "b", backingFormat: "raw" });
    const fault = await FaultBackend.wrap(m);
    const log: string[] = [];
    fault.failWhen((op, offset) => {
      if (op !== "read") log.push(op === "write" ? `write ${offset}` : op);
      return false;
    });
    const timer = new FakeTimer();
    const img = await openQed(fault, {
      readOnly: false,
      timer,
      openBacking: async () => await RawImage.open(MemoryBackend.from(new Uint8Array(2 * M))),
    });
    await img.write(0, pattern(4 * K, 1));
    await img.write(4 * K, pattern(4 * K, 2));
    expect(log).toEqual([
      "write 327680", // data cluster
      "flush", // before the L2 table update (QEMU's ordering with a backing file)
      "write 393216", // new L2 table
      "flush", // before the L1 update
      "write 65536", // L1 sector
      "write 331776", // second write: in place, no flush
    ]);
    expect(img.needCheck).toBe(false);
    expect(timer.pending.size).toBe(0);
  });
});

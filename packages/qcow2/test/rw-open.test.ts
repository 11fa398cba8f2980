import { spawnSync } from "node:child_process";
import fs from "node:fs";
import { describe, expect, it } from "vitest";
import { CorruptImageError } from "@qimg/structs";
import { MemoryBackend } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import { copyFixture, fixturePath, getFixture, requireQemu } from "@qimg/fixtures";
import { AutoclearFeatures, createQcow2, openQcow2 } from "../src/index.js";
import { consistency } from "./consistency.js";
import { prng } from "./prng.js";

const haveQemu = requireQemu();

async function openCopy(name: string, rw = true) {
  const file = copyFixture(name);
  return {
    file,
    image: await openQcow2(await FileBackend.open(file, { readOnly: !rw }), {
      readOnly: !rw,
      noBacking: true,
    }),
  };
}

describe("read-write opens", () => {
  it("refuses a corrupt-flagged image read/write and opens it read-only", async () => {
    const file = fixturePath("qcow2-corrupt-bit");
    await expect(
      openQcow2(await FileBackend.open(file, { readOnly: true }), { readOnly: false }),
    ).rejects.toThrow(/image is corrupt; cannot be opened read\/write/);
    const ro = await openQcow2(await FileBackend.open(file, { readOnly: true }));
    expect(ro.info().corrupt).toBe(true);
    await ro.close();
  });

  it("repairs a dirty lazy-refcounts image on a read-write open, as QEMU does", async () => {
    const { file, image } = await openCopy("qcow2-lazy-refcounts-dirty");
    expect(image.info().dirty).toBe(false);
    await image.close();
    const c = await consistency(MemoryBackend.from(new Uint8Array(fs.readFileSync(file))));
    expect(c.corruptions).toEqual([]);
    if (haveQemu) {
      const q = spawnSync("qemu-img", ["check", file], { encoding: "utf8" });
      expect(q.status, q.stdout + q.stderr).toBe(0);
      // Reading shows what qemu-img read from the crashed image.
      const raw = spawnSync("qemu-img", ["convert", "-O", "raw", file, `${file}.raw`]);
      expect(raw.status).toBe(0);
      const sha = (await import("node:crypto"))
        .createHash("sha256")
        .update(fs.readFileSync(`${file}.raw`))
        .digest("hex");
      expect(sha).toBe(getFixture("qcow2-lazy-refcounts-dirty").sha256);
    }
  });

  it("clears unknown autoclear bits (the bitmaps bit is kept: bitmaps.test.ts)", async () => {
    const { file, image } = await openCopy("qcow2-autoclear-unknown");
    expect(image.header.autoclearFeatures & ~AutoclearFeatures.maskOf("rawExternalData")).toBe(0n);
    await image.close();
    const again = await openQcow2(await FileBackend.open(file, { readOnly: true }));
    expect(again.header.autoclearFeatures).toBe(0n);
    await again.close();
  });

  it("marks the image corrupt and read-only instead of overwriting metadata", async () => {
    const { file, image } = await openCopy("qcow2-broken-l2-overlaps-refcount-table");
    // Find the guest range whose L2 table is the refcount table.
    const l1 = new Uint8Array(image.header.l1Size * 8);
    await image.backend.read(image.header.l1TableOffset, l1);
    const view = new DataView(l1.buffer);
    let index = -1;
    for (let i = 0; i < image.header.l1Size; i++) {
      const off = Number(view.getBigUint64(i * 8, false) & 0x00ff_ffff_ffff_fe00n);
      if (off === image.header.refcountTableOffset) index = i;
    }
    expect(index).toBeGreaterThanOrEqual(0);
    const guest = index * (image.clusterSize / 8) * image.clusterSize;
    const err = await image.write(guest, new Uint8Array(512).fill(9)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CorruptImageError);
    expect((err as Error).message).toMatch(
      /Preventing invalid write on metadata \(overlaps with the refcount table\)/,
    );
    await expect(image.write(0, new Uint8Array(512))).rejects.toThrow(/marked corrupt/);
    await image.close();
    const ro = await openQcow2(await FileBackend.open(file, { readOnly: true }), {
      noBacking: true,
    });
    expect(ro.info().corrupt).toBe(true);
    await ro.close();
  });

  it("honours the lazyRefcounts open option over the header bit", async () => {
    const mem = new MemoryBackend();
    await createQcow2(mem, { size: 1 << 20 });
    const image = await openQcow2(mem, { readOnly: false, lazyRefcounts: true });
    await image.write(0, new Uint8Array(65536).fill(3));
    expect(image.info().dirty).toBe(true);
    expect(image.info().lazyRefcounts).toBe(false);
    await image.close();
    expect((await openQcow2(MemoryBackend.from(mem.bytes()))).info().dirty).toBe(false);
  });

  it("refuses writes on a read-only open", async () => {
    const image = await openQcow2(
      await FileBackend.open(fixturePath("qcow2-v3"), { readOnly: true }),
    );
    await expect(image.write(0, new Uint8Array(1))).rejects.toThrow(/read-only/);
    await image.close();
  });
});

describe("writethrough", () => {
  it("makes every completed write durable, L1 included", async () => {
    const { FaultBackend } = await import("@qimg/io");
    const mem = new MemoryBackend();
    await createQcow2(mem, { size: 4 << 20 });
    const fault = await FaultBackend.wrap(mem);
    const image = await openQcow2(fault, { readOnly: false, writethrough: true });
    await image.write(1 << 20, new Uint8Array(65536).fill(7));
    // Power is lost without a flush or close: the write must still be there, with no leak.
    const survivor = fault.powerLoss();
    const again = await openQcow2(survivor);
    const buf = new Uint8Array(65536);
    await again.read(1 << 20, buf);
    expect(buf.every((b) => b === 7)).toBe(true);
    const c = await consistency(MemoryBackend.from(survivor.bytes()));
    expect(c.corruptions).toEqual([]);
    expect(c.leaks).toBe(0);
  });
});

describe("writethrough on every path that writes", () => {
  it("flushes after a zero write inside one subcluster and a compressed write that falls back", async () => {
    const { FaultBackend } = await import("@qimg/io");
    const mem = new MemoryBackend();
    await createQcow2(mem, { size: 4 << 20 });
    const fault = await FaultBackend.wrap(mem);
    const image = await openQcow2(fault, { readOnly: false, writethrough: true });
    // A zero write smaller than a cluster is written as data (no zero flag can cover it).
    await image.writeZeroes(100, 300);
    const afterZero = fault.flushes;
    expect(afterZero).toBeGreaterThan(0);
    // Incompressible data: stored uncompressed instead.
    const noise = new Uint8Array(65536);
    const rnd = prng(5);
    for (let i = 0; i < noise.length; i++) noise[i] = Math.floor(rnd() * 256);
    await image.writeCompressed(1 << 20, noise);
    expect(fault.flushes).toBeGreaterThan(afterZero);
    const survivor = fault.powerLoss();
    const again = await openQcow2(survivor);
    const buf = new Uint8Array(65536);
    await again.read(1 << 20, buf);
    expect(buf).toEqual(noise);
  });
});

describe("create edge cases found by the CLI interop tests", () => {
  it("a zero-sized image has no L1 cluster and no leak", async () => {
    const mem = new MemoryBackend();
    await createQcow2(mem, { size: 0 });
    const c = await consistency(MemoryBackend.from(mem.bytes()));
    expect(c.leaks).toBe(0);
    expect(c.corruptions).toEqual([]);
  });
});

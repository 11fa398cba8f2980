import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { MemoryBackend } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import { requireQemu } from "@qimg/fixtures";
import { createQcow2, openQcow2 } from "../src/index.js";
import type { Qcow2CreateOptions } from "../src/index.js";
import { prng } from "./prng.js";

const haveQemu = requireQemu();
if (!haveQemu)
  console.log("skipping qemu-img verification of written images: qemu-img is not on PATH");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-write-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function qemuCheck(file: string): { status: number | null; out: string } {
  const r = spawnSync("qemu-img", ["check", file], { encoding: "utf8", cwd: tmp });
  return { status: r.status, out: r.stdout + r.stderr };
}

function qemuRaw(file: string): Uint8Array {
  const out = `${file}.raw`;
  execFileSync("qemu-img", ["convert", "-O", "raw", file, out], { cwd: tmp });
  return new Uint8Array(fs.readFileSync(out));
}

type Op =
  | { kind: "write"; off: number; len: number; seed: number }
  | { kind: "zero"; off: number; len: number; unmap: boolean }
  | { kind: "discard"; off: number; len: number }
  | { kind: "flush" };

function randomOps(seed: number, size: number, count: number, cs: number): Op[] {
  const r = prng(seed);
  const ops: Op[] = [];
  for (let i = 0; i < count; i++) {
    const x = r();
    const off = Math.floor(r() * size);
    const maxLen = r() < 0.3 ? cs * 4 : 8192;
    let len = 1 + Math.floor(r() * maxLen);
    if (r() < 0.3) {
      // aligned requests hit the whole-cluster paths
      const a = Math.floor(off / cs) * cs;
      len = Math.min(size - a, cs * (1 + Math.floor(r() * 3)));
      if (len <= 0) continue;
      if (x < 0.6) ops.push({ kind: "write", off: a, len, seed: Math.floor(r() * 1e9) });
      else if (x < 0.8) ops.push({ kind: "zero", off: a, len, unmap: r() < 0.5 });
      else ops.push({ kind: "discard", off: a, len });
      continue;
    }
    len = Math.min(len, size - off);
    if (len <= 0) continue;
    if (x < 0.65) ops.push({ kind: "write", off, len, seed: Math.floor(r() * 1e9) });
    else if (x < 0.8) ops.push({ kind: "zero", off, len, unmap: r() < 0.5 });
    else if (x < 0.9) ops.push({ kind: "discard", off, len });
    else ops.push({ kind: "flush" });
  }
  return ops;
}

function pattern(seed: number, len: number): Uint8Array {
  const r = prng(seed);
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i += 4) {
    const v = Math.floor(r() * 0x1_0000_0000);
    b[i] = v & 0xff;
    if (i + 1 < len) b[i + 1] = (v >>> 8) & 0xff;
    if (i + 2 < len) b[i + 2] = (v >>> 16) & 0xff;
    if (i + 3 < len) b[i + 3] = v >>> 24;
  }
  return b;
}

/** Apply ops to the image and to a model; discards are "may read as zero or old data". */
async function run(
  image: Awaited<ReturnType<typeof openQcow2>>,
  model: Uint8Array,
  ops: Op[],
  cs: number,
  backingModel?: Uint8Array,
): Promise<void> {
  for (const op of ops) {
    switch (op.kind) {
      case "write": {
        const data = pattern(op.seed, op.len);
        await image.write(op.off, data);
        model.set(data, op.off);
        break;
      }
      case "zero":
        await image.writeZeroes(op.off, op.len, { mayUnmap: op.unmap });
        model.fill(0, op.off, op.off + op.len);
        break;
      case "discard": {
        await image.discard(op.off, op.len);
        // Only whole clusters are discarded; they read as zeros (v3) afterwards.
        const a = Math.ceil(op.off / cs) * cs;
        const end =
          op.off + op.len === model.length ? model.length : Math.floor((op.off + op.len) / cs) * cs;
        if (end > a) {
          if (image.header.version === 2 && backingModel)
            model.set(backingModel.subarray(a, end), a);
          else model.fill(0, a, end);
        }
        break;
      }
      case "flush":
        await image.flush();
        break;
    }
  }
}

const configs: [string, Qcow2CreateOptions][] = [
  ["v3-64k", { size: 4 << 20 }],
  ["v2-64k", { size: 4 << 20, compat: "0.10" }],
  ["v3-512-rb1", { size: 1 << 20, clusterSize: 512, refcountBits: 1 }],
  ["v3-4k-rb64", { size: 2 << 20, clusterSize: 4096, refcountBits: 64 }],
  ["v3-lazy", { size: 4 << 20, lazyRefcounts: true }],
  ["v3-extl2", { size: 4 << 20, extendedL2: true, clusterSize: 65536 }],
  ["v3-2m", { size: 8 << 20, clusterSize: 2 << 20 }],
];

describe("qcow2 writes", () => {
  it.each(configs)(
    "%s: random writes, zeroes and discards read back and pass qemu-img check",
    async (name, o) => {
      const file = path.join(tmp, `${name}.qcow2`);
      const b = await FileBackend.open(file, { create: true, truncate: true });
      await createQcow2(b, o);
      const image = await openQcow2(b, { readOnly: false });
      const cs = image.clusterSize;
      const model = new Uint8Array(image.virtualSize);
      const seed = 1000 + name.length;
      await run(image, model, randomOps(seed, image.virtualSize, 150, cs), cs);
      const back = new Uint8Array(image.virtualSize);
      await image.read(0, back);
      expect(Buffer.compare(back, model), `seed ${seed}: read-back differs from the model`).toBe(0);
      await image.close();
      if (!haveQemu) return;
      const c = qemuCheck(file);
      expect(c.status, c.out).toBe(0);
      expect(Buffer.compare(qemuRaw(file), model), `seed ${seed}: qemu-img's view differs`).toBe(0);
    },
  );

  it("writes over a backing file copy the rest of the cluster from it", async () => {
    const base = path.join(tmp, "base.raw");
    const baseBytes = pattern(7, 2 << 20);
    fs.writeFileSync(base, baseBytes);
    const file = path.join(tmp, "overlay.qcow2");
    const b = await FileBackend.open(file, { create: true, truncate: true });
    await createQcow2(b, { size: 2 << 20, backingFile: "base.raw", backingFormat: "raw" });
    const { openBacking } = await import("./open.js");
    const image = await openQcow2(b, { readOnly: false, openBacking });
    const model = baseBytes.slice();
    await run(image, model, randomOps(99, image.virtualSize, 120, 65536), 65536, baseBytes);
    const back = new Uint8Array(image.virtualSize);
    await image.read(0, back);
    expect(Buffer.compare(back, model)).toBe(0);
    await image.close();
    if (!haveQemu) return;
    const c = qemuCheck(file);
    expect(c.status, c.out).toBe(0);
    expect(Buffer.compare(qemuRaw(file), model)).toBe(0);
  });

  it("keeps sequential writes contiguous on the host", async () => {
    const mem = new MemoryBackend();
    await createQcow2(mem, { size: 8 << 20 });
    const image = await openQcow2(mem, { readOnly: false });
    for (let off = 0; off < 4 << 20; off += 65536) await image.write(off, pattern(off, 65536));
    const s = await image.blockStatus(0, 4 << 20);
    expect(s.length).toBe(4 << 20);
    expect(s.data).toBe(true);
    await image.close();
  });

  it("clears the dirty bit on close with lazy refcounts and sets it before allocating", async () => {
    const mem = new MemoryBackend();
    await createQcow2(mem, { size: 1 << 20, lazyRefcounts: true });
    const image = await openQcow2(mem, { readOnly: false });
    await image.write(0, new Uint8Array(4096).fill(1));
    expect(image.info().dirty).toBe(true);
    await image.close();
    const again = await openQcow2(MemoryBackend.from(mem.bytes()));
    expect(again.info().dirty).toBe(false);
  });
});

describe("compressed writes", () => {
  it.each(["zlib", "zstd"] as const)(
    "%s: clusters written compressed read back in qimg and qemu-img",
    async (type) => {
      const file = path.join(tmp, `compressed-${type}.qcow2`);
      const b = await FileBackend.open(file, { create: true, truncate: true });
      await createQcow2(b, { size: 4 << 20, compressionType: type });
      const image = await openQcow2(b, { readOnly: false });
      const cs = image.clusterSize;
      const model = new Uint8Array(image.virtualSize);
      // Compressible clusters (several share one host cluster), an incompressible one, and an
      // overwrite of a compressed cluster with a normal write.
      for (let g = 0; g < 40; g++) {
        const d = new Uint8Array(cs);
        if (g === 7) d.set(pattern(g, cs));
        else for (let i = 0; i < cs; i++) d[i] = (i % (g + 3)) * 11;
        await image.writeCompressed(g * cs, d);
        model.set(d, g * cs);
      }
      const over = pattern(99, 1000);
      await image.write(3 * cs + 100, over);
      model.set(over, 3 * cs + 100);
      const s = await image.blockStatus(0, cs);
      expect(s.compressed).toBe(true);
      const back = new Uint8Array(image.virtualSize);
      await image.read(0, back);
      expect(Buffer.compare(back, model)).toBe(0);
      await image.close();
      if (!haveQemu) return;
      const c = qemuCheck(file);
      expect(c.status, c.out).toBe(0);
      expect(c.out).toMatch(/compressed clusters/);
      expect(Buffer.compare(qemuRaw(file), model)).toBe(0);
    },
  );
});

describe("resize", () => {
  it.each([
    ["64k", { size: 1 << 20 }, 10 * 2 ** 30],
    ["512", { size: 1 << 20, clusterSize: 512 }, 64 << 20],
    ["same-l1", { size: 1 << 20 }, 2 << 20],
  ] as const)("%s: grows, keeps the data, passes qemu-img check", async (name, o, newSize) => {
    const file = path.join(tmp, `resize-${name}.qcow2`);
    const b = await FileBackend.open(file, { create: true, truncate: true });
    await createQcow2(b, o);
    const image = await openQcow2(b, { readOnly: false });
    const d = pattern(5, 300_000);
    await image.write(1000, d);
    await image.resize(newSize);
    expect(image.virtualSize).toBe(newSize);
    const tail = pattern(6, 4096);
    await image.write(newSize - 4096, tail);
    await expect(image.resize(newSize - 512)).rejects.toThrow(/cannot be shrunk/);
    await image.close();
    const again = await openQcow2(await FileBackend.open(file, { readOnly: true }));
    expect(again.virtualSize).toBe(newSize);
    const back = new Uint8Array(d.length);
    await again.read(1000, back);
    expect(Buffer.compare(back, d)).toBe(0);
    const t = new Uint8Array(4096);
    await again.read(newSize - 4096, t);
    expect(Buffer.compare(t, tail)).toBe(0);
    await again.close();
    if (!haveQemu) return;
    const c = qemuCheck(file);
    expect(c.status, c.out).toBe(0);
  });
});

describe("writes over internal snapshots", () => {
  it.skipIf(!haveQemu)(
    "copy shared clusters on write and leave every snapshot intact",
    async () => {
      const { copyFixture } = await import("@qimg/fixtures");
      const file = copyFixture("qcow2-snapshots");
      const snaps = ["snap1", "snap2", "snap3"];
      const before = snaps.map((s) => {
        const out = `${file}.${s}.before`;
        execFileSync("qemu-img", ["convert", "-O", "raw", "-l", `snapshot.name=${s}`, file, out]);
        return fs.readFileSync(out);
      });
      const image = await openQcow2(await FileBackend.open(file), { readOnly: false });
      const model = new Uint8Array(image.virtualSize);
      await image.read(0, model);
      const d = pattern(11, 1 << 20);
      await image.write(0, d);
      model.set(d, 0);
      await image.writeZeroes(1 << 20, 128 * 1024);
      model.fill(0, 1 << 20, (1 << 20) + 128 * 1024);
      const small = pattern(12, 3000);
      await image.write(100_000, small);
      model.set(small, 100_000);
      await image.close();
      const c = qemuCheck(file);
      expect(c.status, c.out).toBe(0);
      expect(Buffer.compare(qemuRaw(file), model)).toBe(0);
      snaps.forEach((s, i) => {
        const out = `${file}.${s}.after`;
        execFileSync("qemu-img", ["convert", "-O", "raw", "-l", `snapshot.name=${s}`, file, out]);
        expect(Buffer.compare(fs.readFileSync(out), before[i]!), `snapshot ${s} changed`).toBe(0);
      });
    },
  );
});

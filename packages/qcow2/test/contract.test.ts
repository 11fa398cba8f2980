/**
 * Qcow2Image as @qimg/io's WritableDiskImage, with the defaults and errors every driver shares:
 * a closed image refuses every call with CLOSED, a read-only open refuses writes with
 * READ_ONLY, and an image whose backing file was not opened (no opener given) opens read-only
 * but fails a read that reaches the backing file instead of returning zeros for it. The
 * overlay is made and written by qemu-img / qemu-io, and the bytes we read where the overlay
 * has data are compared with what qemu-io reads.
 */
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { ErrorCode, InvalidArgumentError, QimgError } from "@qimg/structs";
import { MemoryBackend, RawImage } from "@qimg/io";
import type { WritableDiskImage } from "@qimg/io";
import { FileBackend } from "@qimg/io/node";
import { requireQemu } from "@qimg/fixtures";
import { createQcow2, openQcow2 } from "../src/index.js";
import { prng } from "./prng.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("contract.test: qemu-img not found, skipping the qemu-made overlay");
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-contract-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

async function rejection(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (e) {
    return e;
  }
  return undefined;
}

async function expectCode(p: Promise<unknown>, code: string): Promise<void> {
  const e = await rejection(p);
  expect(e).toBeInstanceOf(QimgError);
  expect((e as QimgError).code).toBe(code);
}

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
}

describe("Qcow2Image: the shared writable contract", () => {
  // Not a multiple of 512 or of the cluster size.
  const SIZE = 3 * 65536 + 1234;

  it("every call after close() fails with CLOSED; close() twice is a no-op", async () => {
    const mem = new MemoryBackend();
    await createQcow2(mem, { size: SIZE });
    const image: WritableDiskImage = await openQcow2(mem, { readOnly: false });
    expect(image.clusterSize).toBe(65536);
    await image.write(1000, new Uint8Array(777).fill(7));
    await image.close();
    await image.close();
    await expectCode(image.read(0, new Uint8Array(512)), ErrorCode.CLOSED);
    await expectCode(image.blockStatus(0, 512), ErrorCode.CLOSED);
    await expectCode(image.write(0, new Uint8Array(512)), ErrorCode.CLOSED);
    await expectCode(image.writeZeroes(0, 512), ErrorCode.CLOSED);
    await expectCode(image.discard(0, 65536), ErrorCode.CLOSED);
    await expectCode(image.flush(), ErrorCode.CLOSED);
    await expectCode(image.resize(SIZE * 2 - (SIZE % 512)), ErrorCode.CLOSED);
    await expectCode(image.writeCompressed!(0, new Uint8Array(65536)), ErrorCode.CLOSED);
  });

  it("a read-only open (the default) refuses every write with READ_ONLY", async () => {
    const mem = new MemoryBackend();
    await createQcow2(mem, { size: SIZE });
    const image = await openQcow2(mem);
    expect(image.readOnly).toBe(true);
    await expectCode(image.write(0, new Uint8Array(512)), ErrorCode.READ_ONLY);
    await expectCode(image.writeZeroes(0, 512, { mayUnmap: true }), ErrorCode.READ_ONLY);
    await expectCode(image.discard(0, 65536), ErrorCode.READ_ONLY);
    await expectCode(image.writeCompressed(0, new Uint8Array(65536)), ErrorCode.READ_ONLY);
    await expectCode(image.resize(SIZE * 2 - (SIZE % 512)), ErrorCode.READ_ONLY);
    await image.close();
  });

  it.skipIf(!haveQemu)(
    "without a backing opener: read-only opens read the overlay's own data and fail reads that reach the backing file; read-write opens are refused",
    async () => {
      const seed = 20261202;
      const r = prng(seed);
      const base = path.join(tmp, "base.raw");
      const overlay = path.join(tmp, "overlay.qcow2");
      const bytes = new Uint8Array(SIZE);
      for (let i = 0; i < SIZE; i++) bytes[i] = Math.floor(r() * 256);
      fs.writeFileSync(base, bytes);
      run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay]);
      // One whole cluster of the overlay's own data (qemu-io copies on write around it).
      const at = 65536 + 4096;
      const len = 5000;
      run("qemu-io", ["-f", "qcow2", "-c", `write -P 0xab ${at} ${len}`, overlay]);

      const ro = await openQcow2(await FileBackend.open(overlay, { readOnly: true }));
      expect(ro.backing, `seed ${seed}`).toBeUndefined();
      const ours = new Uint8Array(len);
      await ro.read(at, ours);
      expect(ours.every((b) => b === 0xab)).toBe(true);
      // The rest of that cluster was copied from the backing file by QEMU: ours reads it too.
      const cow = new Uint8Array(4096);
      await ro.read(65536, cow);
      expect(cow).toEqual(bytes.subarray(65536, 65536 + 4096));
      // Cluster 0 is unallocated in the overlay: its bytes live in the backing file.
      const e = await rejection(ro.read(0, new Uint8Array(512)));
      expect(e).toBeInstanceOf(InvalidArgumentError);
      expect((e as Error).message).toMatch(/has backing file .* but it was not opened/);
      await ro.close();

      const rw = await FileBackend.open(overlay, { readOnly: false });
      await expect(openQcow2(rw, { readOnly: false })).rejects.toThrow(
        /but no backing opener was given/,
      );
      await rw.close();
      // The refused open changed nothing: qemu-img check is clean and the data is QEMU's.
      run("qemu-img", ["check", "-q", "-f", "qcow2", overlay]);

      // With the opener, every byte equals what QEMU reads.
      const full = await openQcow2(await FileBackend.open(overlay, { readOnly: true }), {
        openBacking: async () => RawImage.open(await FileBackend.open(base, { readOnly: true })),
      });
      const all = new Uint8Array(full.virtualSize);
      await full.read(0, all);
      await full.close();
      const out = path.join(tmp, "out.raw");
      run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", overlay, out]);
      expect(Buffer.compare(Buffer.from(all), fs.readFileSync(out).subarray(0, all.length))).toBe(
        0,
      );
    },
  );
});

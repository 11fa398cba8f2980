import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { copyFixture, requireQemu } from "@qimg/fixtures";
import { openFile } from "./open.js";
import { seededRandom } from "@qimg/io";

const haveQemu = requireQemu();
if (!haveQemu) console.log("skipping qcow2 random-read interop: qemu-img is not on PATH");

const prng = seededRandom;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "qimg-rr-"));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe.skipIf(!haveQemu)("random reads match qemu-img's view of the image", () => {
  const seed = Number(process.env.QIMG_SEED ?? 20261122);
  const reads = process.env.QIMG_LONG === "1" ? 20000 : 1000;

  it.each([
    "qcow2-mixed",
    "qcow2-extended-l2",
    "qcow2-compressed-zstd",
    "qcow2-backing-chain",
    "qcow2-cluster-512",
  ])("%s", async (name) => {
    const file = copyFixture(name, path.join(tmp, name));
    const raw = path.join(tmp, `${name}.raw`);
    execFileSync("qemu-img", ["convert", "-O", "raw", file, raw]);
    const expected = new Uint8Array(fs.readFileSync(raw));
    const image = await openFile(file);
    const rand = prng(seed);
    try {
      for (let i = 0; i < reads; i++) {
        const size = image.virtualSize;
        // Mix tiny unaligned reads with multi-cluster ones.
        const len = 1 + Math.floor(rand() * (rand() < 0.5 ? 4096 : 300_000));
        const off = Math.floor(rand() * Math.max(1, size - len));
        const n = Math.min(len, size - off);
        const buf = new Uint8Array(n);
        await image.read(off, buf);
        const want = expected.subarray(off, off + n);
        if (Buffer.compare(buf, want) !== 0) {
          expect.fail(`seed ${seed} read ${i}: [${off}, +${n}) differs from qemu-img's bytes`);
        }
      }
    } finally {
      await image.close();
    }
  });
});

/**
 * Compressed clusters decode in worker threads once a command has decoded many (as QEMU hands
 * them to its thread pool): the bytes must be qemu-img's, and a corrupt cluster must fail with
 * the same one line whether the main thread or a worker decoded it.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { decompressorFor } from "@qimg/qcow2";
import { afterAll, describe, expect, it } from "vitest";
import { CompressPool } from "../src/util/compress-pool.js";
import { offloadedDecodes } from "../src/util/decompress-offload.js";
import { qimg } from "./helpers.js";
import { hasQemu, prng, qemuImg } from "./qemu.js";

if (!hasQemu) console.log("skipping decompress-offload tests: qemu-img is not on PATH");
const SEED = Number(process.env.QIMG_SEED ?? Math.floor(Math.random() * 2 ** 31));
console.log(`decompress-offload.test seed ${SEED} (QIMG_SEED=${SEED} replays it)`);
const tmp = mkdtempSync(join(tmpdir(), "qimg-offload-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const CLUSTER = 65536;

/** Text runs and random runs: most clusters compress. */
function dataOf(r: () => number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  const words = "compressed cluster worker thread ";
  let i = 0;
  while (i < len) {
    const run = Math.min(len - i, 1 + Math.floor(r() * 3000));
    const text = r() < 0.85;
    for (let k = 0; k < run; k++) {
      b[i + k] = text ? words.charCodeAt((i + k) % words.length) : Math.floor(r() * 256);
    }
    i += run;
  }
  return b;
}

/** A qemu-made compressed image of `clusters` clusters and an odd tail. */
function compressedImage(name: string, type: "zlib" | "zstd", seed: number): string {
  const r = prng(seed);
  const raw = join(tmp, `${name}.src`);
  writeFileSync(raw, dataOf(r, 200 * CLUSTER + 1 + Math.floor(r() * 60000)));
  const file = join(tmp, `${name}.qcow2`);
  const c = qemuImg([
    "convert",
    "-c",
    "-o",
    `compression_type=${type}`,
    "-f",
    "raw",
    "-O",
    "qcow2",
    raw,
    file,
  ]);
  expect(c.code, c.stderr).toBe(0);
  return file;
}

/** Host offset of guest cluster `i`'s compressed bytes (64 KiB clusters, one L2 table). */
function compressedHost(bytes: Uint8Array, i: number): number {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const l1 = Number(v.getBigUint64(40, false));
  const l2 = Number(v.getBigUint64(l1, false) & 0x00ff_ffff_ffff_fe00n);
  const entry = v.getBigUint64(l2 + i * 8, false);
  expect(entry & (1n << 62n), `cluster ${i} is compressed`).not.toBe(0n);
  return Number(entry & ((1n << 54n) - 1n)); // 64 KiB clusters: 62 - (16 - 8) offset bits
}

/** Deterministic junk that no decoder takes for a stream (0xff: reserved deflate block, bad zstd magic). */
function junk(n: number): Uint8Array {
  const b = new Uint8Array(n);
  let s = 0x1234_5678;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    b[i] = s >>> 24;
  }
  b[0] = 0xff;
  return b;
}

describe.skipIf(!hasQemu)("compressed clusters decoded in worker threads", () => {
  it.each(["zstd", "zlib"] as const)(
    "convert -O raw of a %s image made by qemu-img: qemu-img's bytes",
    async (type) => {
      const seed = SEED + (type === "zstd" ? 1 : 2);
      const file = compressedImage(`read-${type}`, type, seed);
      const theirs = join(tmp, `read-${type}.qemu.raw`);
      const ours = join(tmp, `read-${type}.qimg.raw`);
      expect(qemuImg(["convert", "-f", "qcow2", "-O", "raw", file, theirs]).code).toBe(0);
      const before = offloadedDecodes();
      const r = await qimg(["convert", "-f", "qcow2", "-O", "raw", file, ours]);
      expect(r.stderr).toBe("");
      expect(r.code).toBe(0);
      expect(offloadedDecodes(), "decoded in worker threads").toBeGreaterThan(before);
      const why = `seed ${seed} (QIMG_SEED=${SEED} replays it)`;
      expect(Buffer.compare(readFileSync(ours), readFileSync(theirs)), why).toBe(0);
    },
  );

  it("a corrupt cluster fails with the same words in a worker as on the main thread", async () => {
    const pool = await CompressPool.start(2);
    try {
      for (const type of [0, 1]) {
        const bad = junk(3000);
        const inline = await decompressorFor(type)(bad, new Uint8Array(CLUSTER)).then(
          () => "decoded",
          (e: Error) => e.message,
        );
        const worker = await pool.decompress(bad, new Uint8Array(CLUSTER), type).then(
          () => "decoded",
          (e: Error) => e.message,
        );
        expect(inline).toMatch(/^(deflate|zstd) data is invalid/);
        expect(worker).toBe(inline);
      }
    } finally {
      await pool.close();
    }
  });

  it("a corrupt cluster late in a zstd image: qemu-img fails, qimg prints one line, no target", async () => {
    const file = compressedImage("corrupt", "zstd", SEED + 3);
    const bytes = new Uint8Array(readFileSync(file));
    const host = compressedHost(bytes, 150);
    bytes.set(junk(512), host);
    writeFileSync(file, bytes);
    const q = qemuImg(["convert", "-f", "qcow2", "-O", "raw", file, join(tmp, "corrupt.q.raw")]);
    expect(q.code).toBe(1);
    expect(q.stderr).toMatch(/error while reading/);
    const ours = join(tmp, "corrupt.ours.raw");
    const r = await qimg(["convert", "-f", "qcow2", "-O", "raw", file, ours]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(
      new RegExp(
        `^qimg: .*corrupt\\.qcow2: compressed cluster at 0x${host.toString(16)} \\(\\d+ bytes\\) cannot be decompressed: zstd data is invalid: no zstd frame at byte 0 \\(magic 0x[0-9a-f]+\\)\\n$`,
      ),
    );
    expect(existsSync(ours)).toBe(false);
  });
});

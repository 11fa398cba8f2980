/**
 * zstd compressed clusters, with qemu-img as the oracle. QEMU writes one frame per cluster and
 * pads it to a sector; its reader accepts several frames (and skippable frames) back to back
 * until the cluster is full, and refuses a frame that would run past the cluster's end. The
 * driver finds each frame's end by walking its blocks and decodes exactly that: these tests
 * read images made by qemu-img at every cluster size, and clusters rewritten by hand, through
 * both readers.
 */
import { readFileSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { compress as zstdCompress } from "@bokuweb/zstd-wasm";
import { requireQemu } from "@qimg/fixtures";
import { seededRandom } from "@qimg/io";
import { CorruptImageError } from "@qimg/structs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadWasmFrameDecoder } from "../src/compress.js";
import { compressedLayout, decodeCompressed, encodeCompressed } from "../src/spec/index.js";
import { l2OffsetOf, layoutOf, openBytes, peekU64 } from "./poke.js";
import { qemuImg } from "./twins.js";

const haveQemu = requireQemu();
if (!haveQemu) console.log("zstd-interop.test: qemu-img not found, skipping the QEMU oracle tests");
const SEED = Number(process.env.QIMG_SEED ?? Math.floor(Math.random() * 2 ** 31));
console.log(`zstd-interop.test seed ${SEED} (QIMG_SEED=${SEED} replays it)`);
const tmp = mkdtempSync(join(tmpdir(), "qimg-zstd-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
beforeAll(async () => {
  // The frames below are made with the same WebAssembly module; load it the package's way.
  await loadWasmFrameDecoder();
});

/** Text runs and random runs: most clusters compress, some do not (stored uncompressed). */
function dataOf(r: () => number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  const words = "guest cluster zstd frame sector ";
  let i = 0;
  while (i < len) {
    const run = Math.min(len - i, 1 + Math.floor(r() * 1500));
    const text = r() < 0.8;
    for (let k = 0; k < run; k++) {
      b[i + k] = text ? words.charCodeAt((i + k) % words.length) : Math.floor(r() * 256);
    }
    i += run;
  }
  return b;
}

function firstDiff(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

async function readWithQimg(bytes: Uint8Array): Promise<Uint8Array> {
  const img = await openBytes(bytes);
  try {
    const out = new Uint8Array(img.virtualSize);
    await img.read(0, out);
    return out;
  } finally {
    await img.close();
  }
}

/** qemu-img's reading of an image file: its raw conversion, or its error. */
function readWithQemu(file: string): { bytes?: Uint8Array; error?: string } {
  const raw = `${file}.raw`;
  const r = qemuImg(["convert", "-f", "qcow2", "-O", "raw", file, raw]);
  if (r.code !== 0) return { error: r.stderr };
  return { bytes: new Uint8Array(readFileSync(raw)) };
}

/** A qemu-made zstd image of `data`: its bytes and its compressed clusters. */
function makeImage(
  name: string,
  data: Uint8Array,
  clusterSize: number,
): {
  file: string;
  bytes: Uint8Array;
  compressed: { guest: number; host: number }[];
} {
  const raw = join(tmp, `${name}.src`);
  const file = join(tmp, `${name}.qcow2`);
  writeFileSync(raw, data);
  const r = qemuImg([
    "convert",
    "-c",
    "-f",
    "raw",
    "-O",
    "qcow2",
    "-o",
    `compression_type=zstd,cluster_size=${clusterSize}`,
    raw,
    file,
  ]);
  expect(r.code, r.stderr).toBe(0);
  const bytes = new Uint8Array(readFileSync(file));
  const { clusterBits } = layoutOf(bytes);
  const layout = compressedLayout(clusterBits);
  const perL2 = clusterSize / 8;
  const compressed: { guest: number; host: number }[] = [];
  for (let c = 0; c * clusterSize < data.length; c++) {
    const l2 = l2OffsetOf(bytes, Math.floor(c / perL2));
    if (l2 === 0) continue;
    const entry = peekU64(bytes, l2 + (c % perL2) * 8);
    if ((entry & (1n << 62n)) === 0n) continue;
    const hi = Number(entry >> 32n);
    const lo = Number(entry & 0xffff_ffffn);
    const d = decodeCompressed(hi, lo, layout);
    compressed.push({ guest: c * clusterSize, host: d.hostOffset });
  }
  return { file, bytes, compressed };
}

describe.skipIf(!haveQemu)("zstd images against qemu-img", () => {
  it.each([512, 4096, 65536, 2 * 1024 * 1024])(
    "qemu-img's zstd clusters read bit-exactly (cluster size %i, odd disk size)",
    async (clusterSize) => {
      const r = seededRandom(SEED + clusterSize);
      const size = Math.max(3 * clusterSize, 1 << 19) + 1 + Math.floor(r() * clusterSize);
      const data = dataOf(r, size);
      const { bytes, compressed } = makeImage(`qemu-${clusterSize}`, data, clusterSize);
      expect(compressed.length).toBeGreaterThan(0);
      const ours = await readWithQimg(bytes);
      // qemu-img rounds the disk up to a sector; the tail reads as zeros.
      const why = `seed ${SEED + clusterSize} (QIMG_SEED replays it), size ${size}`;
      expect(firstDiff(ours.subarray(0, size), data), why).toBe(-1);
      expect(
        ours.subarray(size).every((x) => x === 0),
        why,
      ).toBe(true);
    },
  );

  /**
   * Point the first compressed cluster's L2 entry at new bytes appended to the file (QEMU
   * packs compressed clusters back to back, so they cannot grow in place), and read the image
   * with both tools.
   */
  async function rewritten(
    name: string,
    make: (cluster: Uint8Array, r: () => number) => Uint8Array,
  ): Promise<{ ours: Uint8Array | Error; qemu: { bytes?: Uint8Array; error?: string } }> {
    const r = seededRandom(SEED + name.length);
    const clusterSize = 65536;
    const data = dataOf(r, 3 * clusterSize + 1234);
    const { file, bytes: original, compressed } = makeImage(name, data, clusterSize);
    const c = compressed[0]!;
    const frames = make(data.subarray(c.guest, c.guest + clusterSize), r);
    const host = Math.ceil(original.length / clusterSize) * clusterSize;
    const sectors = Math.ceil(frames.length / 512);
    const bytes = new Uint8Array(host + sectors * 512);
    bytes.set(original);
    bytes.set(frames, host);
    const { clusterBits } = layoutOf(bytes);
    const entry = encodeCompressed(host, sectors - 1, compressedLayout(clusterBits));
    const l2 = l2OffsetOf(bytes, 0) + (c.guest / clusterSize) * 8;
    new DataView(bytes.buffer).setUint32(l2, entry.hi, false);
    new DataView(bytes.buffer).setUint32(l2 + 4, entry.lo, false);
    writeFileSync(file, bytes);
    let ours: Uint8Array | Error;
    try {
      ours = await readWithQimg(bytes);
    } catch (e) {
      ours = e as Error;
    }
    return { ours, qemu: readWithQemu(file) };
  }

  const skippable = (n: number): Uint8Array => {
    const b = new Uint8Array(8 + n).fill(0xee);
    b.set([0x53, 0x2a, 0x4d, 0x18, n & 0xff, n >>> 8, 0, 0]);
    return b;
  };
  const concat = (...parts: Uint8Array[]): Uint8Array => {
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  };

  it("a cluster of several frames and skippable frames reads the same in both", async () => {
    const { ours, qemu } = await rewritten("multi", (cluster, r) => {
      const cut1 = 1 + Math.floor(r() * 20000);
      const cut2 = cut1 + 1 + Math.floor(r() * 20000);
      return concat(
        skippable(13),
        zstdCompress(cluster.subarray(0, cut1), 3),
        zstdCompress(cluster.subarray(cut1, cut2), 1),
        skippable(0),
        zstdCompress(cluster.subarray(cut2), 3),
      );
    });
    expect(qemu.error, "qemu-img reads it").toBeUndefined();
    expect(ours).toBeInstanceOf(Uint8Array);
    expect(
      firstDiff(ours as Uint8Array, qemu.bytes!.subarray(0, (ours as Uint8Array).length)),
    ).toBe(-1);
  });

  it.each([
    [
      "a frame holding more than the cluster",
      (cluster: Uint8Array): Uint8Array =>
        zstdCompress(concat(cluster, cluster.subarray(0, 100)), 3),
      /zstd data is invalid: the frame at byte 0 holds 65636 bytes, more than the 65536 left/,
    ],
    [
      "frames that stop short of the cluster",
      (cluster: Uint8Array): Uint8Array => zstdCompress(cluster.subarray(0, 60000), 3),
      /zstd data is invalid: no zstd frame at byte \d+/,
    ],
  ] as const)(
    "%s: qemu-img fails, and so does the driver (CorruptImageError)",
    async (name, make, msg) => {
      const { ours, qemu } = await rewritten(name.replace(/ /g, "-"), make);
      expect(qemu.error, "qemu-img refuses the cluster").toMatch(
        /error while reading|Input\/output error/i,
      );
      expect(ours).toBeInstanceOf(CorruptImageError);
      expect((ours as Error).message).toMatch(msg);
    },
  );
});

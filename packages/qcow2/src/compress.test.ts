import { compress as zstdCompress } from "@bokuweb/zstd-wasm";
import { seededRandom } from "@qimg/io";
import { CorruptImageError } from "@qimg/structs";
import { beforeAll, describe, expect, it } from "vitest";
import {
  QCOW2_COMPRESSION,
  decodeZstdCluster,
  defaultCompress,
  inflateRaw,
  loadFzstd,
  loadNodeFrameDecoder,
  loadWasmFrameDecoder,
  zstd,
  zstdDecoderInUse,
  type FrameDecoder,
} from "./compress.js";

const SEED = Number(process.env.QIMG_SEED ?? Math.floor(Math.random() * 2 ** 31));
console.log(`compress.test seed ${SEED} (QIMG_SEED=${SEED} replays it)`);

/** Cluster-like data: runs of text and of random bytes, so it compresses somewhat. */
function dataOf(r: () => number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  const words = "qcow2 zstd frame block cluster ";
  let i = 0;
  while (i < len) {
    const run = Math.min(len - i, 1 + Math.floor(r() * 900));
    const text = r() < 0.6;
    for (let k = 0; k < run; k++) {
      b[i + k] = text ? words.charCodeAt((i + k) % words.length) : Math.floor(r() * 256);
    }
    i += run;
  }
  return b;
}

/** Where two byte arrays first differ (-1: equal); toEqual is slow on megabytes. */
function firstDiff(a: Uint8Array, b: Uint8Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

const MAGIC = [0x28, 0xb5, 0x2f, 0xfd];

/**
 * A zstd frame made by hand from raw blocks (RFC 8878), so the frame walker is tested on
 * layouts the compressor never makes: no content size, single segment, RLE blocks.
 */
function handFrame(
  content: Uint8Array,
  o: { fcs?: boolean; single?: boolean; block?: number; rle?: boolean } = {},
): Uint8Array {
  const head: number[] = [...MAGIC];
  const fcs = o.fcs === true || o.single === true;
  let fhd = fcs ? 0x80 : 0; // 4-byte content size
  if (o.single === true) fhd |= 0x20;
  head.push(fhd);
  if (o.single !== true) head.push(7 << 3); // window 128 KiB
  if (fcs) {
    const n = content.length;
    head.push(n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, n >>> 24);
  }
  const parts: Uint8Array[] = [Uint8Array.from(head)];
  const block = o.block ?? 128 * 1024;
  let at = 0;
  do {
    const size = Math.min(block, content.length - at);
    const last = at + size >= content.length ? 1 : 0;
    const type = o.rle === true ? 1 : 0;
    const h = last | (type << 1) | (size << 3);
    parts.push(Uint8Array.from([h & 0xff, (h >>> 8) & 0xff, h >>> 16]));
    parts.push(o.rle === true ? content.subarray(at, at + 1) : content.subarray(at, at + size));
    at += size;
  } while (at < content.length);
  return concat(...parts);
}

/** A skippable frame of `n` bytes of junk. */
function skippable(n: number, r: () => number): Uint8Array {
  const b = new Uint8Array(8 + n);
  b.set([0x5a, 0x2a, 0x4d, 0x18, n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, n >>> 24]);
  for (let i = 8; i < b.length; i++) b[i] = Math.floor(r() * 256);
  return b;
}

/** Pad to the end of a 512-byte sector, as a qcow2 compressed cluster's bytes are. */
function padded(frame: Uint8Array, fill = 0): Uint8Array {
  const out = new Uint8Array(Math.ceil((frame.length + 1) / 512) * 512).fill(fill);
  out.set(frame);
  return out;
}

const decoders: [string, () => Promise<FrameDecoder | undefined>][] = [
  ["wasm (@bokuweb/zstd-wasm)", loadWasmFrameDecoder],
  ["fzstd", loadFzstd],
  ["node:zlib (Node >= 22.15)", loadNodeFrameDecoder],
];

beforeAll(async () => {
  // Through the package's own loader: a second init() of the module would start it again.
  await loadWasmFrameDecoder();
});

describe.each(decoders)("zstd clusters through %s", (name, load) => {
  let decode: FrameDecoder | undefined;
  beforeAll(async () => {
    decode = await load();
    if (decode === undefined) console.log(`skipping ${name}: this Node has no zstd in node:zlib`);
  });

  const run = (src: Uint8Array, size: number): Uint8Array => {
    const out = new Uint8Array(size);
    decodeZstdCluster(src, out, decode!);
    return out;
  };

  it("decodes library-made frames of every cluster size, padding ignored", ({ skip }) => {
    if (decode === undefined) skip();
    const r = seededRandom(SEED);
    for (const size of [512, 4096, 65536, 2 * 1024 * 1024]) {
      const data = dataOf(r, size);
      const frame = zstdCompress(data, QCOW2_COMPRESSION.zstdLevel);
      const src = padded(frame, Math.floor(r() * 256));
      expect(firstDiff(run(src, size), data), `seed ${SEED}, cluster ${size}`).toBe(-1);
    }
  });

  it("decodes several frames back to back, with skippable frames, as QEMU does", ({ skip }) => {
    if (decode === undefined) skip();
    const r = seededRandom(SEED + 1);
    const size = 65536;
    const data = dataOf(r, size);
    const cut1 = 1 + Math.floor(r() * 30000);
    const cut2 = cut1 + 1 + Math.floor(r() * 30000);
    const src = padded(
      concat(
        skippable(Math.floor(r() * 100), r),
        zstdCompress(data.subarray(0, cut1), 3),
        handFrame(data.subarray(cut1, cut2), { block: 1 + Math.floor(r() * 5000) }),
        skippable(0, r),
        handFrame(data.subarray(cut2), { single: true }),
      ),
    );
    expect(firstDiff(run(src, size), data), `seed ${SEED + 1}, cuts ${cut1} ${cut2}`).toBe(-1);
  });

  it("walks hand-made frames: no content size, RLE blocks, an empty frame", ({ skip }) => {
    if (decode === undefined) skip();
    const r = seededRandom(SEED + 2);
    const size = 4096;
    const data = dataOf(r, size);
    const cut = 1 + Math.floor(r() * 4000);
    const fill = new Uint8Array(size - cut).fill(data[cut]!);
    const expected = concat(data.subarray(0, cut), fill);
    const src = padded(
      concat(
        handFrame(new Uint8Array(0), { fcs: true }),
        handFrame(data.subarray(0, cut), { block: 777 }),
        handFrame(fill, { rle: true, fcs: true }),
      ),
    );
    expect(firstDiff(run(src, size), expected), `seed ${SEED + 2}, cut ${cut}`).toBe(-1);
  });

  it("refuses a frame that holds more than the cluster (QEMU: -EIO)", ({ skip }) => {
    if (decode === undefined) skip();
    const r = seededRandom(SEED + 3);
    const data = dataOf(r, 4096 + 1 + Math.floor(r() * 3000));
    // Declared size: refused before decoding.
    expect(() => run(padded(zstdCompress(data, 3)), 4096)).toThrow(
      new RegExp(
        `^zstd data is invalid: the frame at byte 0 holds ${data.length} bytes, more than the 4096 left in the cluster$`,
      ),
    );
    // Undeclared size: the decoder runs out of room.
    const err = (() => {
      try {
        run(padded(handFrame(data)), 4096);
      } catch (e) {
        return e;
      }
      return undefined;
    })();
    expect(err).toBeInstanceOf(CorruptImageError);
    expect((err as Error).message).toMatch(
      /^zstd data is invalid: the frame at byte 0 (does not decode|decoded to)/,
    );
  });

  it("refuses clusters that end early, junk between frames, reserved and oversized blocks", ({
    skip,
  }) => {
    if (decode === undefined) skip();
    const r = seededRandom(SEED + 4);
    const data = dataOf(r, 4096);
    const half = zstdCompress(data.subarray(0, 2000), 3);
    const cases: [Uint8Array, RegExp][] = [
      // The frames stop short of the cluster; zero padding is not a frame.
      [padded(half), /^zstd data is invalid: no zstd frame at byte \d+ \(magic 0x0\)$/],
      [half, /^zstd data is invalid: decompressed to 2000 bytes instead of 4096$/],
      // Cut short inside a block, and inside the header.
      [
        zstdCompress(data, 3).subarray(0, 40),
        /^zstd data is invalid: the frame at byte 0 is cut short by the end of the compressed data \(40 bytes\)$/,
      ],
      [Uint8Array.from([...MAGIC]), /cut short/],
      // Block type 3 is reserved.
      [
        padded(Uint8Array.from([...MAGIC, 0x00, 7 << 3, 0b111, 0, 0])),
        /^zstd data is invalid: block at byte 6 has the reserved type 3$/,
      ],
      // A block larger than 128 KiB.
      [
        padded(Uint8Array.from([...MAGIC, 0x00, 7 << 3, 0x08 | 1, 0x00, 0x20])),
        /^zstd data is invalid: block at byte 6 is 262145 bytes, more than 131072$/,
      ],
      // A reserved frame header bit.
      [padded(Uint8Array.from([...MAGIC, 0x08, 7 << 3])), /sets a reserved header bit/],
      // A skippable frame longer than the data.
      [Uint8Array.from([0x50, 0x2a, 0x4d, 0x18, 0xff, 0, 0, 0]), /cut short/],
    ];
    for (const [src, msg] of cases) {
      let err: unknown;
      try {
        run(src, 4096);
      } catch (e) {
        err = e;
      }
      expect(err, String(msg)).toBeInstanceOf(CorruptImageError);
      expect((err as Error).message).toMatch(msg);
    }
  });

  it("refuses a window above 8 MiB before decoding", ({ skip }) => {
    if (decode === undefined) skip();
    // Window descriptor 0xa7: exponent 20, mantissa 7 -> 2^30 + 7 * 2^27.
    const src = padded(Uint8Array.from([...MAGIC, 0x00, 0xa7, 0x01, 0, 0]));
    expect(() => run(src, 65536)).toThrow(
      /^zstd frame declares a 2013265920-byte window, more than the 8388608 allowed$/,
    );
  });
});

describe("the zstd decompressor the driver uses", () => {
  it("is a fast one in Node (node:zlib's own, or WebAssembly), not pure JavaScript", async () => {
    expect(["node", "wasm"]).toContain(await zstdDecoderInUse());
  });

  it("decodes exactly one cluster into the caller's buffer", async () => {
    const r = seededRandom(SEED + 5);
    const data = dataOf(r, 65536);
    const out = new Uint8Array(65536);
    await zstd(padded(zstdCompress(data, 3)), out);
    expect(out).toEqual(data);
  });
});

describe("the compression policy (QCOW2_COMPRESSION)", () => {
  it("zlib: raw deflate with a 4 KiB window and memLevel 9, as QEMU writes", async () => {
    expect(QCOW2_COMPRESSION.deflate).toEqual({ windowBits: 12, memLevel: 9 });
    const { deflateRawSync } = await import("node:zlib");
    const r = seededRandom(SEED + 6);
    const data = dataOf(r, 65536);
    const packed = await defaultCompress(data, 0);
    // (Both as plain Uint8Arrays: node:zlib answers a Buffer, which toEqual tells apart.)
    expect(new Uint8Array(packed!)).toEqual(
      new Uint8Array(deflateRawSync(data, { windowBits: 12, memLevel: 9 })),
    );
    const back = new Uint8Array(65536);
    await inflateRaw(padded(packed!), back);
    expect(back).toEqual(data);
  });

  it("zstd: level 3, one frame", async () => {
    expect(QCOW2_COMPRESSION.zstdLevel).toBe(3);
    const r = seededRandom(SEED + 7);
    const data = dataOf(r, 65536);
    const packed = await defaultCompress(data, 1);
    expect(packed).toEqual(zstdCompress(data, 3));
  });

  it("returns undefined when compression does not make the cluster smaller", async () => {
    const r = seededRandom(SEED + 8);
    const noise = new Uint8Array(4096).map(() => Math.floor(r() * 256));
    expect(await defaultCompress(noise, 0)).toBeUndefined();
    expect(await defaultCompress(noise, 1)).toBeUndefined();
  });
});

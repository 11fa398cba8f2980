import { describe, expect, it } from "vitest";
import { MemoryBackend, RawImage, seededRandom, type BlockStatus, type DiskImage } from "@qimg/io";
import { copy, type CopySink } from "./copy.js";

/**
 * A source whose block status comes from a map of zero runs (as a qcow2 image's metadata
 * would say), over bytes in memory; a "raw" one reads only. Counts status calls.
 */
function source(bytes: Uint8Array, zeroRuns: readonly [number, number][], format = "qcow2") {
  let statusCalls = 0;
  const zeroAt = (pos: number): [number, number] | undefined =>
    zeroRuns.find(([a, b]) => pos >= a && pos < b);
  const image: DiskImage = {
    format,
    virtualSize: bytes.length,
    readOnly: true,
    backend: new MemoryBackend(),
    backing: undefined,
    read(offset, buf) {
      if (offset + buf.length > bytes.length) return Promise.reject(new Error("past the end"));
      buf.set(bytes.subarray(offset, offset + buf.length));
      return Promise.resolve();
    },
    blockStatus(offset, length): Promise<BlockStatus> {
      statusCalls++;
      const end = offset + length;
      const z = zeroAt(offset);
      let stop = end;
      if (z !== undefined) stop = Math.min(end, z[1]);
      else for (const [a] of zeroRuns) if (a > offset && a < stop) stop = a;
      const zero = z !== undefined;
      return Promise.resolve({
        offset,
        length: stop - offset,
        present: !zero,
        zero,
        data: !zero,
        depth: 0,
      });
    },
    close: () => Promise.resolve(),
  };
  return { image, calls: () => statusCalls };
}

interface Recorded {
  readonly sink: CopySink;
  readonly out: Uint8Array;
  readonly writes: [number, number][];
  readonly zeros: [number, number][];
  readonly compressed: number[];
}

function recorder(size: number, blockSize: number, withZero: boolean): Recorded {
  const out = new Uint8Array(size).fill(0xee); // what the sink "shows" where nothing is written
  const writes: [number, number][] = [];
  const zeros: [number, number][] = [];
  const compressed: number[] = [];
  const later = (): Promise<void> => new Promise((r) => setTimeout(r, Math.random() * 2));
  const sink: CopySink = {
    blockSize,
    async write(offset, data) {
      writes.push([offset, data.length]);
      const copyOf = data.slice(); // the engine must not reuse the buffer before we finish
      await later();
      out.set(copyOf, offset);
      if (!Buffer.from(data).equals(copyOf))
        throw new Error(`buffer at ${offset} reused too early`);
    },
    async writeCompressed(offset, data) {
      compressed.push(offset);
      expect(data.length).toBeLessThanOrEqual(blockSize);
      const copyOf = data.slice();
      await later();
      out.set(copyOf, offset);
    },
    zero: withZero
      ? async (offset, length) => {
          zeros.push([offset, length]);
          await later();
          out.fill(0, offset, offset + length);
        }
      : undefined,
  };
  return { sink, out, writes, zeros, compressed };
}

/** Random bytes with zero runs; returns the bytes and the runs the "metadata" reports. */
function randomImage(rnd: () => number, size: number) {
  const bytes = new Uint8Array(size);
  const zeroRuns: [number, number][] = [];
  for (let pos = 0; pos < size;) {
    const n = 1 + Math.floor(rnd() * 3_000_000);
    const end = Math.min(size, pos + n);
    const kind = rnd();
    if (kind < 0.3)
      zeroRuns.push([pos, end]); // reported zero (metadata)
    else if (kind < 0.5) {
      // data that happens to be zeros (found by the scan), with a few non-zero bytes
      for (let i = pos; i < end; i += 1 + Math.floor(rnd() * 200_000)) bytes[i] = 1;
    } else for (let i = pos; i < end; i++) bytes[i] = (i * 31 + 7) & 0xff || 1;
    pos = end;
  }
  return { bytes, zeroRuns };
}

describe("copy", () => {
  it("copies every byte, skips zero blocks, writes in guest order (seeded, odd sizes)", async () => {
    const seed = Number(process.env.QIMG_SEED ?? Date.now() % 1e9);
    const rnd = seededRandom(seed);
    for (let round = 0; round < 6; round++) {
      const size = 1 + Math.floor(rnd() * 9_000_000);
      const { bytes, zeroRuns } = randomImage(rnd, size);
      const raw = rnd() < 0.3;
      const src = source(bytes, zeroRuns, raw ? "raw" : "qcow2");
      const bs = [512, 4096, 65536, 2 * 1024 * 1024 + 512][Math.floor(rnd() * 4)]!;
      const withZero = rnd() < 0.5;
      const from = rnd() < 0.5 ? 0 : Math.floor(rnd() * size);
      const length = size - from + (withZero ? Math.floor(rnd() * 5000) : 0);
      const r = recorder(length, bs, withZero);
      await copy(src.image, r.sink, {
        from,
        to: size,
        length,
        inFlight: 1 + Math.floor(rnd() * 8),
      });
      const what = `seed ${seed} round ${round} size ${size} bs ${bs} from ${from} raw ${raw}`;
      // The sink reads as the source (zeros past its end) wherever it had to; untouched
      // blocks are zero blocks and only where the sink reads zeros anyway (no zero()).
      const want = new Uint8Array(length);
      want.set(bytes.subarray(from));
      for (let b = 0; b < length; b += bs) {
        const e = Math.min(length, b + bs);
        const got = r.out.subarray(b, e);
        const exp = want.subarray(b, e);
        const blockZero = exp.every((x) => x === 0);
        if (!blockZero || withZero)
          expect(Buffer.from(got).equals(exp), `${what} block ${b}`).toBe(true);
        else
          expect(
            got.every((x) => x === 0xee),
            `${what}: zero block ${b} written`,
          ).toBe(true);
      }
      // Writes (data) are issued in increasing offsets, block-aligned to the copy's start.
      for (let i = 1; i < r.writes.length; i++) {
        expect(r.writes[i]![0], what).toBeGreaterThan(r.writes[i - 1]![0]);
      }
      for (const [o] of r.writes) expect(o % bs, what).toBe(0);
      if (raw) expect(src.calls(), `${what}: a raw source is not asked for status`).toBe(0);
      else expect(src.calls(), what).toBeLessThanOrEqual(2 * zeroRuns.length + 2);
    }
  });

  it("compresses each data block, zero blocks stay unwritten", async () => {
    const bytes = new Uint8Array(300_000);
    for (let i = 100_000; i < 170_000; i++) bytes[i] = i & 0xff || 3;
    const r = recorder(bytes.length, 65536, false);
    await copy(source(bytes, [[200_000, 300_000]]).image, r.sink, { compress: true });
    expect(r.compressed).toEqual([65536, 131072]);
    expect(r.writes).toEqual([]);
    expect(Buffer.from(r.out.subarray(65536, 196608)).equals(bytes.subarray(65536, 196608))).toBe(
      true,
    );
  });

  it("fails with the source's read error, and nothing is still writing when it does", async () => {
    const bytes = new Uint8Array(20 * 1024 * 1024).fill(1);
    const src = source(bytes, []);
    let reads = 0;
    let reading = 0;
    const read = src.image.read.bind(src.image);
    const failing: DiskImage = {
      ...src.image,
      async read(o, b) {
        if (++reads === 5) throw new Error("EIO at chunk 5");
        reading++;
        await new Promise((r) => setTimeout(r, 10)); // reads ahead still running at the failure
        reading--;
        return read(o, b);
      },
    };
    let active = 0;
    let settledAfter = false;
    const sink: CopySink = {
      blockSize: 4096,
      async write() {
        active++;
        await new Promise((r) => setTimeout(r, 5));
        active--;
      },
    };
    await expect(
      copy(failing, sink).finally(() => {
        settledAfter = active === 0 && reading === 0;
      }),
    ).rejects.toThrow("EIO at chunk 5");
    expect(settledAfter).toBe(true);
  });

  it("copies a raw image exactly (the real driver)", async () => {
    const backend = new MemoryBackend();
    const data = new Uint8Array(3 * 1024 * 1024 + 1234);
    for (let i = 0; i < data.length; i += 4096 * 3) data[i] = 7;
    await backend.write(0, data);
    const image = await RawImage.open(backend);
    const r = recorder(image.virtualSize, 4096, false);
    await copy(image, r.sink);
    const got = r.out.map((x) => (x === 0xee ? 0 : x));
    expect(Buffer.from(got.subarray(0, data.length)).equals(data)).toBe(true);
  });

  it("-S: zero runs shorter than minSparse are written, longer ones skipped; 0 writes every byte", async () => {
    // 1 MiB: data at [0, 4k), zeros [4k, 20k), data [20k, 24k), zeros to 600k (scanned),
    // a reported zero run [600k, 1M).
    const bytes = new Uint8Array(1 << 20);
    bytes.fill(5, 0, 4096);
    bytes.fill(6, 20480, 24576);
    const src = () => source(bytes, [[614400, 1 << 20]]).image;
    const written = (w: [number, number][]) => w.reduce((n, [, l]) => n + l, 0);
    // Default: every zero block (4 KiB) is skipped.
    let r = recorder(bytes.length, 4096, false);
    await copy(src(), r.sink);
    expect(r.writes).toEqual([
      [0, 4096],
      [20480, 4096],
    ]);
    // -S 32k: the 16 KiB zero run between data is written with it.
    r = recorder(bytes.length, 4096, false);
    await copy(src(), r.sink, { minSparse: 32768 });
    expect(r.writes).toEqual([[0, 24576]]);
    expect(Buffer.from(r.out.subarray(0, 24576)).equals(bytes.subarray(0, 24576))).toBe(true);
    // -S 0: every byte, the reported zero run too.
    r = recorder(bytes.length, 4096, true);
    await copy(src(), r.sink, { minSparse: 0 });
    expect(written(r.writes)).toBe(bytes.length);
    expect(r.zeros).toEqual([]);
    expect(Buffer.from(r.out).equals(bytes)).toBe(true);
  });

  it("-W: chunks are written as their reads finish, every byte once", async () => {
    const rnd = seededRandom(5);
    const bytes = new Uint8Array(9 * 1024 * 1024 + 777);
    for (let i = 0; i < bytes.length; i += 1 + Math.floor(rnd() * 5000)) bytes[i] = 1 + (i & 0x7f);
    const src = source(bytes, []);
    const read = src.image.read.bind(src.image);
    const slow: DiskImage = {
      ...src.image,
      async read(o, b) {
        // The first chunk is read last.
        await new Promise((r) => setTimeout(r, o === 0 ? 40 : 1));
        return read(o, b);
      },
    };
    const r = recorder(bytes.length, 4096, false);
    const progress: number[] = [];
    await copy(slow, r.sink, {
      outOfOrder: true,
      inFlight: 6,
      readAhead: 6,
      onProgress: (d) => progress.push(d),
    });
    const got = r.out.map((x) => (x === 0xee ? 0 : x));
    expect(Buffer.from(got).equals(bytes)).toBe(true);
    // Not in guest order, and the progress still climbs to the whole length.
    const firsts = r.writes.map(([o]) => o);
    expect(firsts).not.toEqual([...firsts].sort((a, b) => a - b));
    expect(progress).toEqual([...progress].sort((a, b) => a - b));
    expect(progress.at(-1)).toBe(bytes.length);
  });

  it("salvage: unreadable sectors are copied as zeros and reported, the rest is copied", async () => {
    const bytes = new Uint8Array(3 * 1024 * 1024).fill(9);
    const src = source(bytes, []);
    const read = src.image.read.bind(src.image);
    const bad = (o: number, n: number) => o < 70_000 && o + n > 66_000; // sectors 128..136
    const broken: DiskImage = {
      ...src.image,
      read: (o, b) => (bad(o, b.length) ? Promise.reject(new Error("EIO")) : read(o, b)),
    };
    const reported: number[] = [];
    const r = recorder(bytes.length, 4096, false);
    await copy(broken, r.sink, { onReadError: (offset) => reported.push(offset) });
    const bads = Array.from({ length: 9 }, (_, i) => 65536 + i * 512);
    expect(reported).toEqual(bads);
    const want = bytes.slice();
    want.fill(0, 65536, 65536 + 9 * 512);
    const got = r.out.map((x) => (x === 0xee ? 0 : x));
    expect(Buffer.from(got).equals(want)).toBe(true);
  });

  it("leaveAlone: blocks wholly inside the given ranges are not written", async () => {
    const bytes = new Uint8Array(600_000).fill(3);
    const r = recorder(bytes.length, 65536, true);
    const asked: number[] = [];
    await copy(source(bytes, []).image, r.sink, {
      leaveAlone: (offset, data) => {
        asked.push(offset, data.length);
        // Two touching ranges cover [65536, 262144): blocks 1..3; [300000, 330000) no block.
        return Promise.resolve([
          { start: 65536, end: 100_000 },
          { start: 100_000, end: 262_144 },
          { start: 300_000, end: 330_000 },
        ]);
      },
    });
    expect(asked).toEqual([0, 600_000]);
    expect(r.writes).toEqual([
      [0, 65536],
      [262144, 600_000 - 262144],
    ]);
  });

  it("rateLimit: a limited copy waits for its slices", async () => {
    const bytes = new Uint8Array(4 * 1024 * 1024).fill(1);
    const r = recorder(bytes.length, 65536, false);
    const t0 = performance.now();
    await copy(source(bytes, []).image, r.sink, { rateLimit: 8 * 1024 * 1024 });
    // 2 MiB pass at once, the other 2 MiB owe 0.25 s at 8 MiB/s.
    expect(performance.now() - t0).toBeGreaterThanOrEqual(200);
  });

  it("-m: at most inFlight writes at once, and that many are used", async () => {
    const bytes = new Uint8Array(40 * 1024 * 1024);
    for (let i = 0; i < bytes.length; i += 8192) bytes[i] = 1;
    for (const n of [1, 2, 8]) {
      let active = 0;
      let peak = 0;
      const sink: CopySink = {
        blockSize: 65536,
        async write() {
          peak = Math.max(peak, ++active);
          await new Promise((r) => setTimeout(r, 3));
          active--;
        },
      };
      await copy(source(bytes, []).image, sink, { inFlight: n, readAhead: n });
      expect(peak, `inFlight ${n}`).toBeLessThanOrEqual(n);
      expect(peak, `inFlight ${n}`).toBeGreaterThanOrEqual(Math.min(n, 2));
    }
  });

  it("salvage: warnings come in offset order, block-status failures before each read", async () => {
    const MiB = 1024 * 1024;
    const bytes = new Uint8Array(5 * MiB).fill(4);
    const src = source(bytes, []);
    const read = src.image.read.bind(src.image);
    const status = src.image.blockStatus.bind(src.image);
    // Reads fail in [1 MiB, 1 MiB + 1 KiB) (slowly) and [3 MiB, 3 MiB + 1 KiB); block status
    // fails in [3 MiB, 3 MiB + 1 KiB).
    const badRead = (o: number, n: number) =>
      (o < MiB + 1024 && o + n > MiB) || (o < 3 * MiB + 1024 && o + n > 3 * MiB);
    const broken: DiskImage = {
      ...src.image,
      async read(o, b) {
        if (o <= MiB && o + b.length > MiB) await new Promise((r) => setTimeout(r, 30));
        return badRead(o, b.length) ? Promise.reject(new Error("EIO")) : read(o, b);
      },
      // Extents end at 3 MiB (as at an L2 table's edge); status there fails for 1 KiB.
      blockStatus: (o, n) =>
        o < 3 * MiB
          ? status(o, Math.min(n, 3 * MiB - o))
          : o < 3 * MiB + 1024
            ? Promise.reject(new Error("EIO"))
            : status(o, n),
    };
    const events: string[] = [];
    const r = recorder(bytes.length, 4096, false);
    await copy(broken, r.sink, {
      onReadError: (o) => events.push(`read ${o}`),
      onStatusError: (o) => events.push(`status ${o}`),
    });
    const s3 = 3 * MiB;
    expect(events).toEqual([
      // The first walk over the whole range.
      `status ${s3}`,
      `status ${s3 + 512}`,
      // The copy, in offset order although the first failing read is slower.
      `read ${MiB}`,
      `read ${MiB + 512}`,
      `status ${s3}`,
      `read ${s3}`,
      `status ${s3 + 512}`,
      `read ${s3 + 512}`,
    ]);
    const want = bytes.slice();
    want.fill(0, MiB, MiB + 1024);
    want.fill(0, s3, s3 + 1024);
    expect(Buffer.from(r.out.map((x) => (x === 0xee ? 0 : x))).equals(want)).toBe(true);
  });
});

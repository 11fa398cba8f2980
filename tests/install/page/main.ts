/**
 * The browser test's page: bundled with esbuild (platform "browser") from the packages as
 * installed from their tarballs, so a Node API anywhere in a neutral entry fails the bundle
 * or this page. It works only on bytes in memory (MemoryBackend), as a web app with a File
 * or a download would; the test drives it through `globalThis.qimgBrowserTest`.
 */
import { checkImage } from "@qimg/check";
import { MemoryBackend, seededRandom } from "@qimg/io";
import type { DiskImage } from "@qimg/io";
import { createQcow2, defaultCompress, openQcow2 } from "@qimg/qcow2";
import { decodeHeader } from "@qimg/qcow2/spec";
import { openQed } from "@qimg/qed";
import { decodeQedHeader } from "@qimg/qed/spec";
import { patternByte } from "./pattern.js";

/** A fixture as the test serves it: where to fetch it and what qemu-img says it holds. */
export interface FixtureRequest {
  readonly name: string;
  readonly format: "qcow2" | "qed";
  readonly url: string;
}

export interface FixtureResult {
  readonly name: string;
  readonly virtualSize: number;
  /** sha256 of every guest byte, read through the driver. */
  readonly sha256: string;
  /** What @qimg/check says (0 clean). */
  readonly checkExitCode: number;
  /** The header as the spec entry decodes it (cluster size). */
  readonly clusterSize: number;
}

/** One operation of a write run; the test replays them onto a raw file. */
export interface WriteOp {
  readonly kind: "write" | "zero" | "compressed";
  readonly offset: number;
  readonly length: number;
}

export interface WriteResult {
  readonly ops: readonly WriteOp[];
  readonly virtualSize: number;
  /** The new image file, base64. */
  readonly image: string;
}

function hex(bytes: ArrayBuffer): string {
  return [...new Uint8Array(bytes)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

function base64(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

async function readAll(image: DiskImage): Promise<Uint8Array<ArrayBuffer>> {
  const all = new Uint8Array(image.virtualSize);
  const chunk = 1 << 20;
  for (let at = 0; at < all.length; at += chunk) {
    await image.read(at, all.subarray(at, Math.min(all.length, at + chunk)));
  }
  return all;
}

async function readFixture(req: FixtureRequest): Promise<FixtureResult> {
  const response = await fetch(req.url);
  if (!response.ok) throw new Error(`${req.url}: HTTP ${response.status}`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  const clusterSize =
    req.format === "qcow2"
      ? 2 ** decodeHeader(bytes).clusterBits
      : decodeQedHeader(bytes).clusterSize;
  const check = await checkImage(MemoryBackend.from(bytes, { readOnly: true }), req.format);
  const backend = MemoryBackend.from(bytes, { readOnly: true, name: req.name });
  const image = req.format === "qcow2" ? await openQcow2(backend) : await openQed(backend);
  try {
    const all = await readAll(image);
    return {
      name: req.name,
      virtualSize: image.virtualSize,
      sha256: hex(await crypto.subtle.digest("SHA-256", all)),
      checkExitCode: check.exitCode,
      clusterSize,
    };
  } finally {
    await image.close();
  }
}

/**
 * Create a qcow2 image in memory and write a seeded run of requests to it (sizes and
 * offsets not multiples of 512 or of the cluster, some in flight together), then return the
 * file and the operations so the test can check it with qemu-img.
 */
async function writeImage(options: {
  seed: number;
  size: number;
  clusterSize: number;
  compression?: "zlib" | "zstd";
}): Promise<WriteResult> {
  const random = seededRandom(options.seed);
  const file = new MemoryBackend({ name: "new.qcow2" });
  await createQcow2(file, {
    size: options.size,
    clusterSize: options.clusterSize,
    ...(options.compression === undefined ? {} : { compressionType: options.compression }),
  });
  const image = await openQcow2(file, { readOnly: false });
  const ops: WriteOp[] = [];
  const size = image.virtualSize;
  const cs = image.clusterSize;
  for (let batch = 0; batch < 6; batch++) {
    const pending: Promise<void>[] = [];
    for (let j = 0; j < 5; j++) {
      const r = random();
      if (options.compression !== undefined && r < 0.3) {
        // A compressed write goes to a whole cluster nothing was written to yet (as in QEMU,
        // it cannot overwrite an allocated one); none left: skip it.
        const clusters = Math.floor(size / cs);
        const untouched = (c: number): boolean =>
          ops.every((o) => o.offset + o.length <= c * cs || o.offset >= (c + 1) * cs);
        const start = Math.floor(random() * clusters);
        let cluster = -1;
        for (let k = 0; k < clusters && cluster < 0; k++) {
          if (untouched((start + k) % clusters)) cluster = (start + k) % clusters;
        }
        if (cluster < 0) continue;
        const offset = cluster * cs;
        // Run it alone, after the requests in flight.
        await Promise.all(pending.splice(0));
        const data = new Uint8Array(cs);
        const op = ops.length;
        for (let i = 0; i < cs; i++) data[i] = patternByte(op, offset + i) & 0x0f; // compressible
        ops.push({ kind: "compressed", offset, length: cs });
        await image.writeCompressed(offset, data);
        continue;
      }
      const length = 1 + Math.floor(random() * Math.min(size, 3 * cs + 777));
      const offset = Math.floor(random() * (size - length));
      const op = ops.length;
      if (r < 0.8) {
        const data = new Uint8Array(length);
        for (let i = 0; i < length; i++) data[i] = patternByte(op, offset + i);
        ops.push({ kind: "write", offset, length });
        pending.push(image.write(offset, data));
      } else {
        ops.push({ kind: "zero", offset, length });
        pending.push(image.writeZeroes(offset, length));
      }
    }
    // Requests of a batch are in flight together; overlapping ones take effect in the order
    // they were issued (the drivers' range claims), which is the order the test replays.
    await Promise.all(pending);
  }
  await image.close();
  return { ops, virtualSize: size, image: base64(file.bytes()) };
}

/** Ask for zstd compression; resolves to the error's name and message, or "compressed". */
async function zstdCompress(): Promise<string> {
  try {
    const out = await defaultCompress(new Uint8Array(65536).fill(7), 1);
    return out === undefined ? "not smaller" : "compressed";
  } catch (e) {
    return e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  }
}

const api = { readFixture, writeImage, zstdCompress };
export type QimgBrowserTest = typeof api;
(globalThis as unknown as { qimgBrowserTest: QimgBrowserTest }).qimgBrowserTest = api;
document.title = "qimg ready";

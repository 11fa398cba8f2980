import type { Decompress as ZstdStreamType } from "fzstd";
import { CorruptImageError, UnsupportedFeatureError, hex } from "@qimg/structs";

/**
 * Compressed clusters: decompressors, and the one compression policy every writer uses.
 * zlib clusters are raw deflate streams (no zlib header), zstd clusters are zstd frames; both
 * are followed by padding to the sector end, which must be ignored. zlib uses node:zlib when
 * it exists (fast, native) and the platform's DecompressionStream otherwise; zstd uses the
 * fastest decoder there is (see `loadZstdDecoder`), down to fzstd (pure JS, runs anywhere).
 */
export interface Decompressor {
  /** Decompress `src` into exactly `out.length` bytes. */
  (src: Uint8Array, out: Uint8Array): Promise<void>;
}

/** The parts of node:zlib used here (typed by hand: this package does not see @types/node). */
interface NodeZlib {
  inflateRawSync(
    buf: Uint8Array,
    opts: { finishFlush: number; maxOutputLength?: number },
  ): Uint8Array;
  deflateRawSync(
    buf: Uint8Array,
    opts: { level?: number; windowBits?: number; memLevel?: number },
  ): Uint8Array;
  /** Node >= 22.15 (and 23.8) only. */
  readonly zstdDecompressSync?: (buf: Uint8Array, opts: { maxOutputLength: number }) => Uint8Array;
  constants: { Z_SYNC_FLUSH: number };
}
let nodeZlib: NodeZlib | null | undefined;

/** node:zlib where it exists (Node, Deno, Bun), null in a browser; loaded on first use. */
async function loadNodeZlib(): Promise<NodeZlib | null> {
  if (nodeZlib !== undefined) return nodeZlib;
  try {
    const spec = "node:zlib";
    nodeZlib = (await import(/* @vite-ignore */ spec)) as NodeZlib;
  } catch {
    nodeZlib = null;
  }
  return nodeZlib;
}

async function inflateWithStream(src: Uint8Array, out: Uint8Array): Promise<number> {
  const ds = new DecompressionStream("deflate-raw");
  const writer = ds.writable.getWriter();
  writer.write(src as Uint8Array<ArrayBuffer>).catch(() => undefined);
  writer.close().catch(() => undefined);
  const reader = ds.readable.getReader();
  let n = 0;
  try {
    for (;;) {
      const { value, done } = (await reader.read()) as {
        value: Uint8Array | undefined;
        done: boolean;
      };
      if (done || !value) break;
      const take = Math.min(value.length, out.length - n);
      out.set(value.subarray(0, take), n);
      n += take;
      if (n >= out.length) break;
    }
  } catch {
    // Trailing padding after the deflate stream makes some implementations complain after
    // the data is complete; what matters is that we got every byte.
  }
  await reader.cancel().catch(() => undefined);
  return n;
}

/** Decompress a zlib (raw deflate) compressed cluster; trailing sector padding is ignored. */
export const inflateRaw: Decompressor = async (src, out) => {
  const z = await loadNodeZlib();
  let n: number;
  if (z) {
    let res: Uint8Array;
    try {
      res = z.inflateRawSync(src, {
        finishFlush: z.constants.Z_SYNC_FLUSH,
        maxOutputLength: out.length,
      });
      n = Math.min(res.length, out.length);
      out.set(res.subarray(0, n));
    } catch (cause) {
      if ((cause as { code?: string }).code !== "ERR_BUFFER_TOO_LARGE") {
        throw new CorruptImageError(`deflate data is invalid (${(cause as Error).message})`, {
          cause,
        });
      }
      // The stream holds more than a cluster: QEMU takes the first cluster's worth; so do we,
      // decoding as a stream that stops when the cluster is full (bounded memory).
      n = await inflateWithStream(src, out);
    }
  } else {
    n = await inflateWithStream(src, out);
  }
  if (n !== out.length) {
    throw new CorruptImageError(
      `compressed cluster inflated to ${n} bytes instead of ${out.length}`,
    );
  }
};

/** Largest zstd window we accept: QEMU-written frames never need more than a 2 MiB cluster. */
const MAX_ZSTD_WINDOW = 8 * 1024 * 1024;

/** The largest block a zstd frame may hold (RFC 8878: Block_Maximum_Size is at most 128 KiB). */
const ZSTD_MAX_BLOCK = 128 * 1024;

const ZSTD_MAGIC = 0xfd2fb528;
/** Skippable frames: magic 0x184D2A50 to 0x184D2A5F, a 4-byte length, then that many bytes. */
const ZSTD_SKIPPABLE_MASK = 0xfffffff0;
const ZSTD_SKIPPABLE_MAGIC = 0x184d2a50;

/** What {@link walkZstdFrame} found (one shared object: a cluster may hold several frames). */
interface ZstdFrame {
  /** Offset just past the frame in the compressed bytes. */
  end: number;
  /** The decompressed size the frame header declares, or -1 when it declares none. */
  contentSize: number;
  /** True for a skippable frame (it decompresses to nothing). */
  skippable: boolean;
}
const frame: ZstdFrame = { end: 0, contentSize: -1, skippable: false };

function zstdInvalid(why: string): CorruptImageError {
  return new CorruptImageError(`zstd data is invalid: ${why}`);
}

function u32le(b: Uint8Array, at: number): number {
  return (b[at]! | (b[at + 1]! << 8) | (b[at + 2]! << 16) | (b[at + 3]! << 24)) >>> 0;
}

/**
 * Find where the zstd frame starting at `at` ends, without decoding it: read the frame header,
 * then walk the block headers (RFC 8878) to the last block and the optional checksum. A
 * compressed cluster's bytes run to the end of a sector, so the padding after the frame is
 * never handed to the decoder, which wants exactly one frame.
 */
function walkZstdFrame(src: Uint8Array, at: number): ZstdFrame {
  const len = src.length;
  const truncated = (): CorruptImageError =>
    zstdInvalid(
      `the frame at byte ${at} is cut short by the end of the compressed data (${len} bytes)`,
    );
  if (len - at < 4) throw truncated();
  const magic = u32le(src, at);
  if ((magic & ZSTD_SKIPPABLE_MASK) >>> 0 === ZSTD_SKIPPABLE_MAGIC) {
    if (len - at < 8) throw truncated();
    const end = at + 8 + u32le(src, at + 4);
    if (end > len) throw truncated();
    frame.end = end;
    frame.contentSize = 0;
    frame.skippable = true;
    return frame;
  }
  if (magic !== ZSTD_MAGIC) {
    throw zstdInvalid(`no zstd frame at byte ${at} (magic ${hex(magic)})`);
  }
  let p = at + 4;
  if (p >= len) throw truncated();
  const fhd = src[p++]!;
  if ((fhd & 0x08) !== 0) throw zstdInvalid(`the frame at byte ${at} sets a reserved header bit`);
  const singleSegment = (fhd & 0x20) !== 0;
  let window = 0;
  if (!singleSegment) {
    if (p >= len) throw truncated();
    const wd = src[p++]!;
    const base = 2 ** (10 + (wd >> 3));
    window = base + (base / 8) * (wd & 7);
  }
  p += [0, 1, 2, 4][fhd & 3]!; // dictionary id (QEMU never writes one; the decoder refuses it)
  const fcsFlag = fhd >> 6;
  const fcsBytes = fcsFlag === 0 ? (singleSegment ? 1 : 0) : [0, 2, 4, 8][fcsFlag]!;
  if (p + fcsBytes > len) throw truncated();
  let contentSize = -1;
  if (fcsBytes > 0) {
    contentSize = 0;
    for (let i = fcsBytes - 1; i >= 0; i--) contentSize = contentSize * 256 + src[p + i]!;
    if (fcsBytes === 2) contentSize += 256;
    p += fcsBytes;
  }
  if (singleSegment) window = contentSize;
  if (window > MAX_ZSTD_WINDOW) {
    throw new CorruptImageError(
      `zstd frame declares a ${window}-byte window, more than the ${MAX_ZSTD_WINDOW} allowed`,
    );
  }
  for (;;) {
    if (p + 3 > len) throw truncated();
    const h = src[p]! | (src[p + 1]! << 8) | (src[p + 2]! << 16);
    p += 3;
    const type = (h >> 1) & 3;
    const size = h >>> 3;
    if (type === 3) throw zstdInvalid(`block at byte ${p - 3} has the reserved type 3`);
    if (size > ZSTD_MAX_BLOCK) {
      throw zstdInvalid(`block at byte ${p - 3} is ${size} bytes, more than ${ZSTD_MAX_BLOCK}`);
    }
    p += type === 1 ? 1 : size; // an RLE block stores one byte, repeated `size` times
    if (p > len) throw truncated();
    if ((h & 1) !== 0) break;
  }
  if ((fhd & 0x04) !== 0) p += 4; // content checksum
  if (p > len) throw truncated();
  frame.end = p;
  frame.contentSize = contentSize;
  frame.skippable = false;
  return frame;
}

/** Decode one whole zstd frame into a new array of at most `limit` bytes, or throw. */
export type FrameDecoder = (frameBytes: Uint8Array, limit: number) => Uint8Array;

/** fzstd, the pure JavaScript fallback: loaded on the first zstd cluster without a faster one. */
let fzstd: Promise<FrameDecoder> | undefined;
export function loadFzstd(): Promise<FrameDecoder> {
  fzstd ??= import("fzstd").then((m) => {
    const Stream: typeof ZstdStreamType = m.Decompress;
    return (bytes, limit) => {
      const out = new Uint8Array(limit);
      let n = 0;
      const stream = new Stream((chunk) => {
        if (chunk.length > limit - n) throw new Error(`the frame holds more than ${limit} bytes`);
        out.set(chunk, n);
        n += chunk.length;
      });
      stream.push(bytes, true);
      return out.subarray(0, n);
    };
  });
  return fzstd;
}

/**
 * The zstd frame decoder chosen for good: Node's own (node:zlib has zstd from Node 22.15 on);
 * else the WebAssembly build of the reference library (@bokuweb/zstd-wasm, the optional peer
 * that zstd writes use); else fzstd (pure JavaScript, several times slower). In a browser the
 * WebAssembly build is used only once the compressor has loaded it (a page that does not serve
 * zstd.wasm must still read zstd images, without a failed fetch), so there fzstd is not final.
 */
let zstdDecoder: FrameDecoder | undefined;
/** Which decoder {@link zstdDecoder} is (the tests check that Node gets a fast one). */
let zstdDecoderKind: "node" | "wasm" | "fzstd" | undefined;

async function loadZstdDecoder(): Promise<FrameDecoder> {
  if (zstdDecoder !== undefined) return zstdDecoder;
  const node = await loadNodeZlib();
  if (node?.zstdDecompressSync !== undefined) {
    const native = node.zstdDecompressSync;
    zstdDecoder = nodeFrameDecoder(native);
    zstdDecoderKind = "node";
    return zstdDecoder;
  }
  const wasm = node !== null ? await loadZstd().catch(() => undefined) : zstdWasmReady;
  if (wasm !== undefined) {
    zstdDecoder = wasmFrameDecoder(wasm);
    zstdDecoderKind = "wasm";
    return zstdDecoder;
  }
  const fallback = await loadFzstd();
  if (node !== null) {
    zstdDecoder = fallback;
    zstdDecoderKind = "fzstd";
  }
  return fallback;
}

/** Which zstd decoder this platform uses (loading it): for the tests. */
export async function zstdDecoderInUse(): Promise<"node" | "wasm" | "fzstd" | undefined> {
  await loadZstdDecoder();
  return zstdDecoderKind;
}

/** Node's own zstd frame decoder where node:zlib has one (Node >= 22.15), for the tests. */
export async function loadNodeFrameDecoder(): Promise<FrameDecoder | undefined> {
  const native = (await loadNodeZlib())?.zstdDecompressSync;
  return native === undefined ? undefined : nodeFrameDecoder(native);
}

function nodeFrameDecoder(native: NonNullable<NodeZlib["zstdDecompressSync"]>): FrameDecoder {
  // maxOutputLength must be at least 1; a frame with more than `limit` bytes then fails.
  return (bytes, limit) => native(bytes, { maxOutputLength: Math.max(1, limit) });
}

/** The WebAssembly decoder: a frame that declares no size gets `limit` bytes of room. */
function wasmFrameDecoder(wasm: ZstdWasm): FrameDecoder {
  const decompress = wasm.decompress;
  return (bytes, limit) => decompress(bytes, { defaultHeapSize: limit });
}

/** The WebAssembly frame decoder, loading the module (for the tests, which run every decoder). */
export async function loadWasmFrameDecoder(): Promise<FrameDecoder> {
  return wasmFrameDecoder(await loadZstd());
}

/**
 * Decode a zstd compressed cluster with `decode`. Like QEMU, the cluster may be several frames
 * (and skippable frames) back to back; they must fill exactly one cluster, and a frame that
 * would run past its end makes the cluster corrupt; what follows the last frame is padding.
 * Exported for the tests, which run it with every decoder.
 */
export function decodeZstdCluster(src: Uint8Array, out: Uint8Array, decode: FrameDecoder): void {
  let at = 0;
  let n = 0;
  while (n < out.length) {
    if (at >= src.length) {
      throw zstdInvalid(`decompressed to ${n} bytes instead of ${out.length}`);
    }
    const f = walkZstdFrame(src, at);
    const end = f.end;
    if (!f.skippable) {
      const left = out.length - n;
      const declared = f.contentSize;
      if (declared > left) {
        throw zstdInvalid(
          `the frame at byte ${at} holds ${declared} bytes, more than the ${left} left in the cluster`,
        );
      }
      let data: Uint8Array;
      try {
        data = decode(src.subarray(at, end), left);
      } catch (cause) {
        throw new CorruptImageError(
          `zstd data is invalid: the frame at byte ${at} does not decode (${(cause as Error).message})`,
          { cause },
        );
      }
      if (data.length > left || (declared >= 0 && data.length !== declared)) {
        throw zstdInvalid(`the frame at byte ${at} decoded to ${data.length} bytes`);
      }
      out.set(data, n);
      n += data.length;
    }
    at = end;
  }
}

/** Decompress a zstd compressed cluster; trailing sector padding is ignored. */
export const zstd: Decompressor = async (src, out) => {
  decodeZstdCluster(src, out, zstdDecoder ?? (await loadZstdDecoder()));
};

/** The decompressor for a header's compression_type (0 zlib, 1 zstd). */
export function decompressorFor(compressionType: number): Decompressor {
  if (compressionType === 0) return inflateRaw;
  if (compressionType === 1) return zstd;
  throw new CorruptImageError(`unknown compression type ${hex(compressionType)}`);
}

interface ZstdWasm {
  readonly compress: (data: Uint8Array, level: number) => Uint8Array;
  /** Decode whole frames; `defaultHeapSize` is the output room when no frame declares its size. */
  readonly decompress: (data: Uint8Array, opts: { defaultHeapSize: number }) => Uint8Array;
}
let zstdWasm: Promise<ZstdWasm> | undefined;
/** The module once loaded (a browser's zstd decoder uses it only then). */
let zstdWasmReady: ZstdWasm | undefined;

/** How long the zstd WebAssembly module may take to start before we give up on it. */
const ZSTD_INIT_TIMEOUT_MS = 20_000;

/** The global event target of a browser or worker (absent in Node). */
interface EventTargetLike {
  addEventListener(type: string, listener: (event: { reason?: unknown }) => void): void;
  removeEventListener(type: string, listener: (event: { reason?: unknown }) => void): void;
}

/**
 * Wait for zstd-wasm's `init()`, which never settles when its `zstd.wasm` file cannot be
 * loaded in a browser (a bundle that did not copy it next to itself): the loader's failure
 * surfaces only as an unhandled rejection. Fail on that rejection, or after a timeout.
 */
function initZstdWasm(init: () => Promise<void>): Promise<void> {
  const events = globalThis as unknown as Partial<EventTargetLike>;
  return new Promise<void>((resolve, reject) => {
    const fail = (why: string, cause?: unknown): void => {
      done();
      reject(
        new UnsupportedFeatureError(
          `zstd compression is unavailable: the zstd WebAssembly module did not load (${why}); ` +
            "serve @bokuweb/zstd-wasm's zstd.wasm next to your bundle",
          ["zstd compression"],
          { cause },
        ),
      );
    };
    const onRejection = (event: { reason?: unknown }): void => {
      const why = event.reason instanceof Error ? event.reason.message : String(event.reason);
      if (/wasm|Aborted\(/i.test(why)) fail(why, event.reason);
    };
    const timer = setTimeout(
      () => fail(`no answer in ${ZSTD_INIT_TIMEOUT_MS / 1000} s`),
      ZSTD_INIT_TIMEOUT_MS,
    );
    const done = (): void => {
      clearTimeout(timer);
      events.removeEventListener?.("unhandledrejection", onRejection);
    };
    events.addEventListener?.("unhandledrejection", onRejection);
    init().then(
      () => {
        done();
        resolve();
      },
      (cause: unknown) => fail(cause instanceof Error ? cause.message : String(cause), cause),
    );
  });
}

/**
 * zstd compression through a WebAssembly build of the reference library (runs in browsers).
 * It is an optional peer dependency: only writers of zstd-compressed clusters need it.
 */
function loadZstd(): Promise<ZstdWasm> {
  zstdWasm ??= (async () => {
    let m: typeof import("@bokuweb/zstd-wasm");
    try {
      m = await import("@bokuweb/zstd-wasm");
    } catch (cause) {
      throw new UnsupportedFeatureError(
        "zstd compression needs the optional package @bokuweb/zstd-wasm (npm install @bokuweb/zstd-wasm)",
        ["zstd compression"],
        { cause },
      );
    }
    await initZstdWasm(() => m.init());
    zstdWasmReady = {
      compress: (d, level) => m.compress(d, level),
      decompress: (d, opts) => m.decompress(d, opts),
    };
    return zstdWasmReady;
  })();
  // A failed load is not cached: a later call may find the module (or the file) in place.
  zstdWasm.catch(() => {
    zstdWasm = undefined;
  });
  return zstdWasm;
}

/**
 * How QEMU compresses a qcow2 cluster, in one place for every writer (the driver's default
 * compressor, the CLI's worker threads): zlib clusters are raw deflate (no zlib header) with
 * a 4 KiB window (QEMU's window bits -12; its reader is set up the same way, and a strict
 * streaming reader with that window needs it) and memLevel 9 at the default level (Node's
 * zlib is not QEMU's build, so the bytes may still differ a little); zstd clusters are one
 * frame at level 3 (the library default that QEMU's fresh context uses). A cluster is stored
 * compressed only when that is smaller than the cluster.
 */
export const QCOW2_COMPRESSION = {
  /** node:zlib `deflateRawSync` options: `windowBits` 12 (4 KiB), `memLevel` 9. */
  deflate: { windowBits: 12, memLevel: 9 },
  /** The zstd compression level. */
  zstdLevel: 3,
} as const;

/**
 * Compress one cluster as QEMU does ({@link QCOW2_COMPRESSION}): zlib with node:zlib where
 * it exists and the platform's CompressionStream otherwise, zstd with the optional peer
 * @bokuweb/zstd-wasm. Returns undefined when the result is not smaller than the input.
 */
export async function defaultCompress(
  data: Uint8Array,
  compressionType: number,
): Promise<Uint8Array | undefined> {
  let out: Uint8Array;
  if (compressionType === 1) {
    const z = await loadZstd();
    out = z.compress(data, QCOW2_COMPRESSION.zstdLevel);
  } else if (compressionType === 0) {
    const z = await loadNodeZlib();
    if (z) {
      out = z.deflateRawSync(data, QCOW2_COMPRESSION.deflate);
    } else {
      // CompressionStream has no window option (it uses 32 KiB); QEMU reads such clusters
      // too, since it inflates a whole cluster in one call.
      const cs = new CompressionStream("deflate-raw");
      const w = cs.writable.getWriter();
      void w.write(data as Uint8Array<ArrayBuffer>);
      void w.close();
      out = new Uint8Array(await new Response(cs.readable).arrayBuffer());
    }
  } else {
    throw new CorruptImageError(`unknown compression type ${compressionType}`);
  }
  return out.byteLength < data.byteLength ? out : undefined;
}

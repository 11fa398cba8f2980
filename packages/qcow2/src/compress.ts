import type { Decompress as ZstdStreamType } from "fzstd";
import { CorruptImageError, UnsupportedFeatureError, hex } from "@qimg/structs";

/**
 * Decompressors for compressed clusters. zlib clusters are raw deflate streams (no zlib
 * header), zstd clusters are zstd frames; both are followed by padding to the sector end,
 * which must be ignored. The default uses node:zlib when it exists (fast, native) and the
 * platform's DecompressionStream otherwise; zstd uses fzstd (pure JS, runs in browsers).
 */
export interface Decompressor {
  /** Decompress `src` into exactly `out.length` bytes. */
  (src: Uint8Array, out: Uint8Array): Promise<void>;
}

type InflateRawSync = (
  buf: Uint8Array,
  opts: { finishFlush: number; maxOutputLength?: number },
) => Uint8Array;
let nodeInflate: InflateRawSync | null | undefined;
let Z_SYNC_FLUSH = 2;

async function loadNodeZlib(): Promise<InflateRawSync | null> {
  if (nodeInflate !== undefined) return nodeInflate;
  try {
    const spec = "node:zlib";
    const z = (await import(/* @vite-ignore */ spec)) as {
      inflateRawSync: InflateRawSync;
      constants: { Z_SYNC_FLUSH: number };
    };
    Z_SYNC_FLUSH = z.constants.Z_SYNC_FLUSH;
    nodeInflate = z.inflateRawSync;
  } catch {
    nodeInflate = null;
  }
  return nodeInflate;
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
  const inflate = await loadNodeZlib();
  let n: number;
  if (inflate) {
    let res: Uint8Array;
    try {
      res = inflate(src, { finishFlush: Z_SYNC_FLUSH, maxOutputLength: out.length });
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

/** The window size a zstd frame header declares (or its content size in single-segment mode). */
function zstdWindow(src: Uint8Array): number {
  if (src.length < 6 || src[0] !== 0x28 || src[1] !== 0xb5 || src[2] !== 0x2f || src[3] !== 0xfd)
    return 0;
  const fhd = src[4]!;
  const singleSegment = (fhd & 0x20) !== 0;
  if (!singleSegment) {
    const wd = src[5]!;
    const base = 2 ** (10 + (wd >> 3));
    return base + (base / 8) * (wd & 7);
  }
  const fcsFlag = fhd >> 6;
  const dictBytes = [0, 1, 2, 4][fhd & 3]!;
  const at = 5 + dictBytes;
  const fcsBytes = [1, 2, 4, 8][fcsFlag]!;
  if (src.length < at + fcsBytes) return 0;
  let v = 0;
  for (let i = fcsBytes - 1; i >= 0; i--) v = v * 256 + src[at + i]!;
  return fcsBytes === 2 ? v + 256 : v;
}

let fzstd: Promise<typeof ZstdStreamType> | undefined;
/** fzstd, loaded on the first zstd cluster (most images have none; it costs start-up time). */
function loadFzstd(): Promise<typeof ZstdStreamType> {
  fzstd ??= import("fzstd").then((m) => m.Decompress);
  return fzstd;
}

/** Decompress a zstd compressed cluster (fzstd, pure JavaScript); trailing padding is ignored. */
export const zstd: Decompressor = async (src, out) => {
  const ZstdStream = await loadFzstd();
  const window = zstdWindow(src);
  if (window > MAX_ZSTD_WINDOW) {
    throw new CorruptImageError(
      `zstd frame declares a ${window}-byte window, more than the ${MAX_ZSTD_WINDOW} allowed`,
    );
  }
  // The zstd frame is followed by padding up to the sector end, which is not another frame;
  // decode as a stream and stop as soon as the cluster is full.
  let n = 0;
  const stream = new ZstdStream((chunk) => {
    const take = Math.min(chunk.length, out.length - n);
    out.set(chunk.subarray(0, take), n);
    n += take;
  });
  let failure: unknown;
  try {
    stream.push(src, true);
  } catch (e) {
    failure = e;
  }
  if (n !== out.length) {
    const why =
      failure instanceof Error
        ? failure.message
        : `decompressed to ${n} bytes instead of ${out.length}`;
    throw new CorruptImageError(`zstd data is invalid: ${why}`, { cause: failure });
  }
};

/** The decompressor for a header's compression_type (0 zlib, 1 zstd). */
export function decompressorFor(compressionType: number): Decompressor {
  if (compressionType === 0) return inflateRaw;
  if (compressionType === 1) return zstd;
  throw new CorruptImageError(`unknown compression type ${hex(compressionType)}`);
}

interface ZstdWasm {
  compress(data: Uint8Array, level: number): Uint8Array;
}
let zstdWasm: Promise<ZstdWasm> | undefined;

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
    return { compress: (d: Uint8Array, level: number) => m.compress(d, level) };
  })();
  // A failed load is not cached: a later call may find the module (or the file) in place.
  zstdWasm.catch(() => {
    zstdWasm = undefined;
  });
  return zstdWasm;
}

type DeflateRawSync = (
  buf: Uint8Array,
  opts: { level?: number; windowBits?: number; memLevel?: number },
) => Uint8Array;
let nodeDeflate: DeflateRawSync | null | undefined;

async function loadNodeDeflate(): Promise<DeflateRawSync | null> {
  if (nodeDeflate !== undefined) return nodeDeflate;
  try {
    const spec = "node:zlib";
    const z = (await import(/* @vite-ignore */ spec)) as { deflateRawSync: DeflateRawSync };
    nodeDeflate = z.deflateRawSync;
  } catch {
    nodeDeflate = null;
  }
  return nodeDeflate;
}

/**
 * Compress one cluster as QEMU does: raw deflate with a 4 KiB window and memLevel 9 (zlib), so every reader
 * can inflate it; zstd at level 3. Returns undefined when the result is not smaller than the
 * input.
 */
export async function defaultCompress(
  data: Uint8Array,
  compressionType: number,
): Promise<Uint8Array | undefined> {
  if (compressionType === 1) {
    const z = await loadZstd();
    const out = z.compress(data, 3);
    return out.byteLength < data.byteLength ? out : undefined;
  }
  if (compressionType !== 0) {
    throw new CorruptImageError(`unknown compression type ${compressionType}`);
  }
  const deflate = await loadNodeDeflate();
  let out: Uint8Array;
  if (deflate) {
    out = deflate(data, { windowBits: 12, memLevel: 9 });
  } else {
    const cs = new CompressionStream("deflate-raw");
    const w = cs.writable.getWriter();
    void w.write(data as Uint8Array<ArrayBuffer>);
    void w.close();
    out = new Uint8Array(await new Response(cs.readable).arrayBuffer());
  }
  return out.byteLength < data.byteLength ? out : undefined;
}

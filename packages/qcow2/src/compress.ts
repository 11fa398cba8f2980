import { Decompress as ZstdStream } from "fzstd";
import { CorruptImageError, hex } from "@qimg/structs";

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
  writer.write(src).catch(() => undefined);
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

export const inflateRaw: Decompressor = async (src, out) => {
  const inflate = await loadNodeZlib();
  let n: number;
  if (inflate) {
    let res: Uint8Array;
    try {
      res = inflate(src, { finishFlush: Z_SYNC_FLUSH, maxOutputLength: out.length });
    } catch (cause) {
      throw new CorruptImageError(`deflate data is invalid: ${(cause as Error).message}`, {
        cause,
      });
    }
    n = Math.min(res.length, out.length);
    out.set(res.subarray(0, n));
  } else {
    n = await inflateWithStream(src, out);
  }
  if (n !== out.length) {
    throw new CorruptImageError(
      `compressed cluster inflated to ${n} bytes instead of ${out.length}`,
    );
  }
};

export const zstd: Decompressor = (src, out) => {
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
    return Promise.reject(
      new CorruptImageError(`zstd data is invalid: ${why}`, { cause: failure }),
    );
  }
  return Promise.resolve();
};

export function decompressorFor(compressionType: number): Decompressor {
  if (compressionType === 0) return inflateRaw;
  if (compressionType === 1) return zstd;
  throw new CorruptImageError(`unknown compression type ${hex(compressionType)}`);
}

type DeflateRawSync = (buf: Uint8Array, opts: { level?: number; windowBits?: number }) => Uint8Array;
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
 * Compress one cluster as QEMU does: raw deflate with a 4 KiB window (zlib), so every reader
 * can inflate it. Returns undefined when the result is not smaller than the input. zstd
 * compression needs a compressor passed in the open options.
 */
export async function defaultCompress(data: Uint8Array, compressionType: number): Promise<Uint8Array | undefined> {
  if (compressionType !== 0) {
    throw new CorruptImageError(
      "writing zstd-compressed clusters needs a zstd compressor (pass `compress` in the open options)",
    );
  }
  const deflate = await loadNodeDeflate();
  let out: Uint8Array;
  if (deflate) {
    out = deflate(data, { windowBits: 12 });
  } else {
    const cs = new CompressionStream("deflate-raw");
    const w = cs.writable.getWriter();
    void w.write(data);
    void w.close();
    out = new Uint8Array(await new Response(cs.readable).arrayBuffer());
  }
  return out.byteLength < data.byteLength ? out : undefined;
}

/**
 * Page-aligned I/O buffers.
 *
 * The kernel copies between the page cache and a user buffer about twice as fast when the
 * buffer starts on a page boundary: reading 1 GiB from the page cache in 4 MiB requests took
 * 0.09-0.10 s into an aligned buffer and 0.20 s into `Buffer.allocUnsafe` memory, which
 * malloc places 16 bytes past a page boundary (the same holds for writes). JavaScript cannot
 * ask for alignment, but a WebAssembly.Memory is mapped on its own and starts on a page
 * boundary in every engine, so its bytes serve as an aligned buffer (here and in browsers).
 * Where WebAssembly is missing (node --jitless) or a wasm memory cannot be mapped (an
 * address-space limit such as `ulimit -v`), the buffers are ordinary memory.
 *
 * Each call maps a new region (rounded up to 64 KiB, wasm's page size), so use it for a few
 * long-lived buffers — copy chunks, request slots — and slice it, not per request.
 */
import { InvalidArgumentError } from "@qimg/structs";

/** The part of the WebAssembly JS API used here (its typings live in the DOM library). */
interface WasmMemoryConstructor {
  new (descriptor: { initial: number; maximum?: number }): { readonly buffer: ArrayBuffer };
}
/** WebAssembly.Memory, or undefined where there is no WebAssembly (node --jitless, some hosts). */
function wasmMemory(): WasmMemoryConstructor | undefined {
  const wasm = (globalThis as { WebAssembly?: { Memory?: WasmMemoryConstructor } }).WebAssembly;
  return wasm?.Memory;
}

/** WebAssembly's page size: every aligned buffer's capacity is a multiple of it. */
export const WASM_PAGE = 65536;
/** Largest aligned buffer (1 GiB); larger requests are split by the caller. */
export const MAX_ALIGNED_BUFFER = 1024 ** 3;

/**
 * A zero-filled `Uint8Array` of `size` bytes whose first byte is page-aligned. Not
 * transferable to workers (its memory belongs to a WebAssembly.Memory).
 */
export function alignedBuffer(size: number): Uint8Array {
  if (!Number.isSafeInteger(size) || size < 0 || size > MAX_ALIGNED_BUFFER) {
    throw new InvalidArgumentError(
      `aligned buffer size ${size} is not an integer in [0, ${MAX_ALIGNED_BUFFER}]`,
    );
  }
  const pages = Math.max(1, Math.ceil(size / WASM_PAGE));
  const Memory = wasmMemory();
  // Without WebAssembly, ordinary memory: correct, only slower to copy.
  if (Memory === undefined) return new Uint8Array(pages * WASM_PAGE).subarray(0, size);
  let memory: { readonly buffer: ArrayBuffer };
  try {
    memory = new Memory({ initial: pages, maximum: pages });
  } catch {
    // Engines reserve address space for a wasm memory well beyond its size (guard regions,
    // about 10 GiB per memory in V8 on 64-bit hosts); under an address-space limit
    // (`ulimit -v`) or with too many memories that reservation fails (a RangeError) where
    // an ordinary buffer of the same size fits. Unaligned memory is only slower to copy.
    return new Uint8Array(pages * WASM_PAGE).subarray(0, size);
  }
  return new Uint8Array(memory.buffer, 0, size);
}

/**
 * `count` page-aligned buffers of `size` bytes each (each rounded up to a multiple of 4 KiB so
 * every one starts on a page), carved out of one mapping.
 */
export function alignedBuffers(count: number, size: number): Uint8Array[] {
  if (!Number.isSafeInteger(count) || count < 1) {
    throw new InvalidArgumentError(`aligned buffer count ${count} is not a positive integer`);
  }
  const stride = Math.ceil(Math.max(size, 1) / 4096) * 4096;
  const all = alignedBuffer(stride * count);
  return Array.from({ length: count }, (_, i) => all.subarray(i * stride, i * stride + size));
}

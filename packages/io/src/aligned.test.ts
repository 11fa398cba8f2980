import { describe, expect, it } from "vitest";
import { InvalidArgumentError } from "@qimg/structs";
import { alignedBuffer, alignedBuffers, WASM_PAGE } from "./aligned.js";

describe("alignedBuffer", () => {
  it("returns zeroed bytes of the asked size at the start of their own mapping", () => {
    const b = alignedBuffer(2 * 1024 * 1024 + 5);
    expect(b.length).toBe(2 * 1024 * 1024 + 5);
    expect(b.byteOffset).toBe(0);
    expect(b.buffer.byteLength % WASM_PAGE).toBe(0);
    expect(b.every((x) => x === 0)).toBe(true);
    b.fill(7);
    expect(b[b.length - 1]).toBe(7);
  });

  it("maps separate memory per call", () => {
    const a = alignedBuffer(4096);
    const b = alignedBuffer(4096);
    a[0] = 1;
    expect(b[0]).toBe(0);
    expect(a.buffer).not.toBe(b.buffer);
  });

  it("refuses sizes that are not small non-negative integers", () => {
    expect(() => alignedBuffer(-1)).toThrow(InvalidArgumentError);
    expect(() => alignedBuffer(1.5)).toThrow(InvalidArgumentError);
    expect(() => alignedBuffer(2 * 1024 ** 3)).toThrow(InvalidArgumentError);
  });
});

describe("alignedBuffers", () => {
  it("carves page-multiple, non-overlapping slots out of one mapping", () => {
    const slots = alignedBuffers(3, 5000);
    expect(slots.map((s) => s.length)).toEqual([5000, 5000, 5000]);
    expect(slots.map((s) => s.byteOffset)).toEqual([0, 8192, 16384]);
    expect(new Set(slots.map((s) => s.buffer)).size).toBe(1);
    slots[1]!.fill(9);
    expect(slots[0]!.every((x) => x === 0)).toBe(true);
    expect(slots[2]!.every((x) => x === 0)).toBe(true);
  });

  it("refuses a count below one", () => {
    expect(() => alignedBuffers(0, 4096)).toThrow(InvalidArgumentError);
  });
});

describe("without WebAssembly", () => {
  it("falls back to ordinary zeroed memory of the same shape", () => {
    const saved = Object.getOwnPropertyDescriptor(globalThis, "WebAssembly")!;
    Object.defineProperty(globalThis, "WebAssembly", { value: undefined, configurable: true });
    try {
      const [a, b] = alignedBuffers(2, 5000);
      expect(a!.length).toBe(5000);
      expect(b!.byteOffset).toBe(8192);
      expect(a!.every((x) => x === 0)).toBe(true);
      expect(alignedBuffer(3).buffer.byteLength).toBe(WASM_PAGE);
    } finally {
      Object.defineProperty(globalThis, "WebAssembly", saved);
    }
  });
});

describe("when a wasm memory cannot be mapped", () => {
  it("falls back to ordinary memory (an address-space limit makes WebAssembly.Memory throw)", () => {
    const wasm = (globalThis as unknown as { WebAssembly: { Memory: unknown } }).WebAssembly;
    const saved = wasm.Memory;
    let calls = 0;
    wasm.Memory = function Memory(): never {
      calls++;
      throw new RangeError("WebAssembly.Memory(): could not allocate memory");
    };
    try {
      const b = alignedBuffer(2 * 1024 * 1024 + 5);
      expect(calls).toBe(1);
      expect(b.length).toBe(2 * 1024 * 1024 + 5);
      expect(b.buffer.byteLength % WASM_PAGE).toBe(0);
      expect(b.every((x) => x === 0)).toBe(true);
      const [x, y] = alignedBuffers(2, 5000);
      expect(y!.byteOffset - x!.byteOffset).toBe(8192);
      x!.fill(1);
      expect(y!.every((v) => v === 0)).toBe(true);
    } finally {
      wasm.Memory = saved;
    }
  });
});

/**
 * The BlockBackend contract, run against every backend by its own test file.
 * Not part of the public API.
 */
import { describe, expect, it } from "vitest";
import { ErrorCode, QimgError } from "@qimg/structs";
import type { BlockBackend } from "./backend.js";

export interface ContractHarness {
  /** A fresh, empty, writable backend. */
  empty(): Promise<BlockBackend>;
  /** A fresh read-only backend holding `bytes`. */
  readOnlyWith(bytes: Uint8Array): Promise<BlockBackend>;
}

/** Expect `p` to reject with a QimgError of `code`; returns the error. */
export async function rejectsWith(p: Promise<unknown>, code: string): Promise<QimgError> {
  let caught: unknown;
  try {
    await p;
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(QimgError);
  expect((caught as QimgError).code).toBe(code);
  return caught as QimgError;
}

function pattern(n: number, seed = 1): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed * 7) & 0xff;
  return b;
}

export function backendContract(label: string, h: ContractHarness): void {
  describe(`${label}: BlockBackend contract`, () => {
    it("starts empty, writes grow it, reads return what was written", async () => {
      const b = await h.empty();
      expect(await b.size()).toBe(0);
      const data = pattern(5000);
      await b.write(100, data);
      expect(await b.size()).toBe(5100);
      const out = new Uint8Array(5000);
      await b.read(100, out);
      expect(out).toEqual(data);
      // the gap before the first write reads as zeros
      const gap = new Uint8Array(100).fill(9);
      await b.read(0, gap);
      expect(gap).toEqual(new Uint8Array(100));
      await b.close();
    });

    it("overwrites in place without changing the size", async () => {
      const b = await h.empty();
      await b.write(0, pattern(8192));
      await b.write(4096, new Uint8Array(10).fill(0xaa));
      expect(await b.size()).toBe(8192);
      const out = new Uint8Array(12);
      await b.read(4095, out);
      expect(out[0]).toBe(pattern(8192)[4095]);
      expect([...out.subarray(1, 11)]).toEqual(new Array<number>(10).fill(0xaa));
      expect(out[11]).toBe(pattern(8192)[4106]);
      await b.close();
    });

    it("zero-length reads and writes are fine, even at EOF", async () => {
      const b = await h.empty();
      await b.write(0, new Uint8Array(0));
      expect(await b.size()).toBe(0);
      await b.read(0, new Uint8Array(0));
      await b.close();
    });

    it("grows many times (amortized) and keeps every byte", async () => {
      const b = await h.empty();
      const chunk = pattern(1000, 3);
      for (let i = 0; i < 200; i++) await b.write(i * 1000, chunk);
      expect(await b.size()).toBe(200_000);
      const out = new Uint8Array(1000);
      await b.read(137_000, out);
      expect(out).toEqual(chunk);
      await b.close();
    });

    it("truncate shrinks, and growing again reads zeros", async () => {
      const b = await h.empty();
      await b.write(0, pattern(4096));
      await b.truncate(1000);
      expect(await b.size()).toBe(1000);
      await b.truncate(3000);
      expect(await b.size()).toBe(3000);
      const out = new Uint8Array(3000);
      await b.read(0, out);
      expect(out.subarray(0, 1000)).toEqual(pattern(4096).subarray(0, 1000));
      expect(out.subarray(1000)).toEqual(new Uint8Array(2000));
      await b.truncate(0);
      expect(await b.size()).toBe(0);
      await b.close();
    });

    it("read past EOF is a SHORT_READ naming offset, length and size", async () => {
      const b = await h.empty();
      await b.write(0, pattern(100));
      const e = await rejectsWith(b.read(90, new Uint8Array(20)), ErrorCode.SHORT_READ);
      expect(e.message).toMatch(/20 bytes/);
      expect(e.message).toMatch(/offset 90/);
      expect(e.message).toMatch(/size 100/);
      expect(e.offset).toBe(90);
      await rejectsWith(b.read(1000, new Uint8Array(1)), ErrorCode.SHORT_READ);
      await b.close();
    });

    it("zeroPastEof zero-fills the tail", async () => {
      const b = await h.empty();
      await b.write(0, pattern(100));
      const out = new Uint8Array(20).fill(0xff);
      await b.read(90, out, { zeroPastEof: true });
      expect(out.subarray(0, 10)).toEqual(pattern(100).subarray(90));
      expect(out.subarray(10)).toEqual(new Uint8Array(10));
      const far = new Uint8Array(8).fill(0xff);
      await b.read(10_000, far, { zeroPastEof: true });
      expect(far).toEqual(new Uint8Array(8));
      await b.close();
    });

    it("validates offsets, lengths and sizes", async () => {
      const b = await h.empty();
      await rejectsWith(b.read(-1, new Uint8Array(1)), ErrorCode.INVALID_ARGUMENT);
      await rejectsWith(b.read(1.5, new Uint8Array(1)), ErrorCode.INVALID_ARGUMENT);
      await rejectsWith(b.read(Number.NaN, new Uint8Array(1)), ErrorCode.INVALID_ARGUMENT);
      await rejectsWith(b.write(-4, new Uint8Array(1)), ErrorCode.INVALID_ARGUMENT);
      await rejectsWith(
        b.write(Number.MAX_SAFE_INTEGER, new Uint8Array(2)),
        ErrorCode.INVALID_ARGUMENT,
      );
      await rejectsWith(b.truncate(-1), ErrorCode.INVALID_ARGUMENT);
      await rejectsWith(b.truncate(2 ** 53), ErrorCode.INVALID_ARGUMENT);
      await b.close();
    });

    it("read-only refuses write and truncate with READ_ONLY but reads", async () => {
      const b = await h.readOnlyWith(pattern(64));
      expect(b.readOnly).toBe(true);
      const out = new Uint8Array(64);
      await b.read(0, out);
      expect(out).toEqual(pattern(64));
      await rejectsWith(b.write(0, new Uint8Array(1)), ErrorCode.READ_ONLY);
      await rejectsWith(b.truncate(0), ErrorCode.READ_ONLY);
      await b.flush();
      expect(await b.size()).toBe(64);
      await b.close();
    });

    it("after close every call fails with CLOSED, and close is idempotent", async () => {
      const b = await h.empty();
      await b.write(0, pattern(10));
      await b.flush();
      await b.close();
      await b.close();
      await rejectsWith(b.read(0, new Uint8Array(1)), ErrorCode.CLOSED);
      await rejectsWith(b.write(0, new Uint8Array(1)), ErrorCode.CLOSED);
      await rejectsWith(b.flush(), ErrorCode.CLOSED);
      await rejectsWith(b.size(), ErrorCode.CLOSED);
      await rejectsWith(b.truncate(0), ErrorCode.CLOSED);
    });

    it("errors are rejected promises, never synchronous throws", () => {
      // A sync throw would escape this function; a rejection is returned and handled.
      return h.empty().then(async (b) => {
        const p = b.read(-1, new Uint8Array(1));
        expect(p).toBeInstanceOf(Promise);
        await p.catch(() => undefined);
        await b.close();
      });
    });
  });
}

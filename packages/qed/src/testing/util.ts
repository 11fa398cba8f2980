/** Test helpers (not exported from the package). */
import type { QedTimer } from "../types.js";
import { seededRandom } from "@qimg/io";

export const prng = seededRandom;

/** A pattern buffer like qemu-io's `-P`. */
export function pattern(length: number, byte: number): Uint8Array {
  return new Uint8Array(length).fill(byte);
}

/** A timer driven by hand: `advance(ms)` fires what is due. */
export class FakeTimer implements QedTimer {
  now = 0;
  #next = 1;
  readonly pending = new Map<number, { at: number; cb: () => void }>();

  set(cb: () => void, ms: number): unknown {
    const id = this.#next++;
    this.pending.set(id, { at: this.now + ms, cb });
    return id;
  }

  clear(handle: unknown): void {
    this.pending.delete(handle as number);
  }

  advance(ms: number): void {
    this.now += ms;
    for (const [id, t] of [...this.pending]) {
      if (t.at <= this.now) {
        this.pending.delete(id);
        t.cb();
      }
    }
  }
}

/** Whether the long variants of randomized tests run. */
export const LONG = process.env.QIMG_LONG === "1";

/** Index of the first differing byte, or -1 (compare big buffers without a huge diff). */
export function firstDiff(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/**
 * A reference model of the guest disk for one case: the bytes every operation that QEMU
 * accepted should leave. A discarded byte may read as before or as zero (never as anything
 * else: a discard that shows the backing file's data where the guest wrote is a bug). It
 * arbitrates when the twins differ: if qimg's image
 * agrees with the model and QEMU's does not, the difference is QEMU's bug (qemu-img 7.2 has a
 * few), not qimg's.
 */
import { seededRandom } from "@qimg/io";
import type { Backing, Op } from "./gen.js";

/** The backing file's guest bytes, as makeBacking writes them. */
export function backingBytes(b: Backing): Uint8Array {
  const out = new Uint8Array(b.size);
  const rnd = seededRandom(b.seed);
  for (const e of b.extents) {
    for (let i = 0; i < e.len; i++) out[e.off + i] = Math.floor(rnd() * 256);
  }
  return out;
}

export class GuestModel {
  bytes: Uint8Array;
  /**
   * 1 where the byte is exactly `bytes[i]`; 2 where it is `bytes[i]` or 0 (discarded); 0 where
   * anything goes (a write that failed part-way may have written some of its range).
   */
  known: Uint8Array;

  constructor(size: number, backing: Uint8Array | undefined) {
    this.bytes = new Uint8Array(size);
    this.known = new Uint8Array(size).fill(1);
    if (backing !== undefined) this.bytes.set(backing.subarray(0, Math.min(size, backing.length)));
  }

  get size(): number {
    return this.bytes.length;
  }

  /** A write QEMU reported as failed: its range (inside the disk) is open. */
  failed(op: Op): void {
    const ranges =
      op.k === "aio" ? op.parts : op.k === "write" || op.k === "wc" || op.k === "zero" ? [op] : [];
    for (const r of ranges) {
      if (r.off + r.len <= this.size) this.known.fill(0, r.off, r.off + r.len);
    }
  }

  /** Apply an operation QEMU reported as done. */
  apply(op: Op): void {
    switch (op.k) {
      case "write":
      case "wc":
        this.fill(op.off, op.len, op.pat, 1);
        break;
      case "zero":
        this.fill(op.off, op.len, 0, 1);
        break;
      case "discard":
        this.known.fill(2, op.off, Math.min(this.size, op.off + op.len));
        break;
      case "resize": {
        const bytes = new Uint8Array(this.size + op.delta);
        bytes.set(this.bytes);
        const known = new Uint8Array(this.size + op.delta).fill(1);
        known.set(this.known);
        this.bytes = bytes;
        this.known = known;
        break;
      }
      case "aio":
        for (const p of op.parts) this.fill(p.off, p.len, p.pat, 1);
        break;
      case "flush":
      case "snapshot":
        break;
    }
  }

  private fill(off: number, len: number, value: number, known: number): void {
    const end = Math.min(this.size, off + len);
    this.bytes.fill(value, off, end);
    this.known.fill(known, off, end);
  }

  /** The first byte where `image` is not what the model allows, or -1. */
  firstMismatch(image: Uint8Array): number {
    const n = Math.max(image.length, this.size);
    for (let i = 0; i < n; i++) {
      const want = i < this.size ? this.bytes[i] : 0;
      const got = image[i] ?? 0;
      const k = i < this.size ? this.known[i] : 1;
      if (got !== want && k !== 0 && !(got === 0 && k === 2)) return i;
    }
    return -1;
  }
}

/**
 * A reference model of the guest disk for one case: the bytes every operation that QEMU
 * accepted should leave. A discarded byte may read as before or as zero (never as anything
 * else: a discard that shows the backing file's data where the guest wrote is a bug). It
 * arbitrates when the twins differ: if qimg's image
 * agrees with the model and QEMU's does not, the difference is QEMU's bug (qemu-img 7.2 has a
 * few), not qimg's. It also follows the internal snapshots (each one's bytes and disk size,
 * which an apply restores) and the persistent bitmaps (which exist, which are enabled, and the
 * granules each write, write-zeroes or discard makes dirty in the enabled ones).
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
  /** Internal snapshots in table order (QEMU's ids: one more than the largest id). */
  readonly snapshots: ModelSnapshot[] = [];
  /** Persistent bitmaps by name. */
  readonly bitmaps = new Map<string, ModelBitmap>();

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
      if (r.off + r.len <= this.size) {
        this.known.fill(0, r.off, r.off + r.len);
        // QEMU marks a request it ran dirty whether it failed or not; one it refused up front
        // (out of range) it does not: a failed request inside the disk may have marked.
        this.markDirty(r.off, r.len, MAYBE);
      }
    }
    if (op.k === "discard" && op.off + op.len <= this.size) this.markDirty(op.off, op.len, MAYBE);
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
        // (a byte a failed request left open stays open: a discard of part of a cluster does
        // nothing, seed 40314)
        for (let i = op.off; i < Math.min(this.size, op.off + op.len); i++) {
          if (this.known[i] !== 0) this.known[i] = 2;
        }
        this.markDirty(op.off, op.len, DIRTY);
        break;
      case "resize":
        this.setSize(this.size + op.delta);
        break;
      case "aio":
        for (const p of op.parts) this.fill(p.off, p.len, p.pat, 1);
        break;
      case "snapshot":
        this.snapshotAction(op.act, op.name);
        break;
      case "bitmap":
        this.bitmapAction(op);
        break;
      case "flush":
        break;
    }
  }

  /** The snapshot `-a`/`-d` would find: an id first, else the first of that name. */
  findSnapshot(idOrName: string): number {
    const byId = this.snapshots.findIndex((x) => x.id === idOrName);
    return byId >= 0 ? byId : this.snapshots.findIndex((x) => x.name === idOrName);
  }

  private snapshotAction(act: "create" | "apply" | "delete", name: string): void {
    if (act === "create") {
      const id = 1 + Math.max(0, ...this.snapshots.map((x) => Number(x.id) || 0));
      this.snapshots.push({
        id: String(id),
        name,
        bytes: this.bytes.slice(),
        known: this.known.slice(),
      });
      return;
    }
    const at = this.findSnapshot(name);
    const sn = this.snapshots[at];
    if (sn === undefined) throw new Error(`the model has no snapshot ${name} (QEMU had one)`);
    if (act === "delete") {
      this.snapshots.splice(at, 1);
      return;
    }
    this.setSize(sn.bytes.length);
    this.bytes.set(sn.bytes);
    this.known.set(sn.known);
  }

  private bitmapAction(op: Extract<Op, { k: "bitmap" }>): void {
    const b = this.bitmaps.get(op.name);
    switch (op.act) {
      case "add":
        // (the runner gives add's granularity, read back from QEMU's twin when -g was left out)
        this.bitmaps.set(op.name, {
          granularity: op.granularity ?? 65536,
          enabled: true,
          bits: new Uint8Array(Math.ceil(this.size / (op.granularity ?? 65536))),
        });
        break;
      case "remove":
        this.bitmaps.delete(op.name);
        break;
      case "clear":
        b?.bits.fill(0);
        break;
      case "enable":
      case "disable":
        if (b !== undefined) b.enabled = op.act === "enable";
        break;
      case "merge": {
        const src = this.bitmaps.get(op.source ?? "");
        if (b === undefined || src === undefined) break;
        // Every dirty granule of the source, as bytes, makes the target's granules there dirty.
        const bits = src.bits.slice();
        bits.forEach((v, i) => {
          if (v !== CLEAN) markRange(b, i * src.granularity, src.granularity, this.size, v);
        });
        break;
      }
    }
  }

  /** Change the disk size: new bytes read zeros; bitmaps grow with clean granules or drop bits. */
  private setSize(size: number): void {
    const bytes = new Uint8Array(size);
    bytes.set(this.bytes.subarray(0, size));
    const known = new Uint8Array(size).fill(1);
    known.set(this.known.subarray(0, size));
    this.bytes = bytes;
    this.known = known;
    for (const b of this.bitmaps.values()) {
      const bits = new Uint8Array(Math.ceil(size / b.granularity));
      bits.set(b.bits.subarray(0, bits.length));
      b.bits = bits;
    }
  }

  private markDirty(off: number, len: number, value: number): void {
    for (const b of this.bitmaps.values()) {
      if (b.enabled) markRange(b, off, len, this.size, value);
    }
  }

  private fill(off: number, len: number, value: number, known: number): void {
    const end = Math.min(this.size, off + len);
    this.bytes.fill(value, off, end);
    this.known.fill(known, off, end);
    this.markDirty(off, len, DIRTY);
  }

  /** The first byte where `image` is not what the model allows, or -1. */
  firstMismatch(image: Uint8Array): number {
    return firstMismatchOf(this.bytes, this.known, image);
  }
}

/**
 * The first byte where `image` is not what `bytes` with `known` (see GuestModel.known) allow,
 * or -1; bytes past the model must read zeros.
 */
export function firstMismatchOf(bytes: Uint8Array, known: Uint8Array, image: Uint8Array): number {
  const size = bytes.length;
  const n = Math.max(image.length, size);
  for (let i = 0; i < n; i++) {
    const want = i < size ? bytes[i] : 0;
    const got = image[i] ?? 0;
    const k = i < size ? known[i] : 1;
    if (got !== want && k !== 0 && !(got === 0 && k === 2)) return i;
  }
  return -1;
}

/** An internal snapshot as the model keeps it (its disk size is `bytes.length`). */
export interface ModelSnapshot {
  readonly id: string;
  readonly name: string;
  readonly bytes: Uint8Array;
  readonly known: Uint8Array;
}

/** Granule states of a bitmap model: clean, dirty, or either (a request that failed). */
export const CLEAN = 0;
export const DIRTY = 1;
export const MAYBE = 2;

/** A persistent bitmap as the model keeps it. */
export interface ModelBitmap {
  granularity: number;
  enabled: boolean;
  /** One state per granule of the disk (CLEAN, DIRTY or MAYBE). */
  bits: Uint8Array;
}

/** Mark the granules of [off, off+len) (clipped to the disk) as `value`, DIRTY winning. */
function markRange(b: ModelBitmap, off: number, len: number, size: number, value: number): void {
  const end = Math.min(size, off + len);
  if (end <= off) return;
  const last = Math.floor((end - 1) / b.granularity);
  for (let g = Math.floor(off / b.granularity); g <= last; g++) {
    if (b.bits[g] !== DIRTY) b.bits[g] = value;
  }
}

/**
 * The first granule where a bitmap's dirty bits (1 = dirty) break the model, or -1. Bits past
 * the model's granules must be clean.
 */
export function firstBitMismatch(model: ModelBitmap, bits: Uint8Array): number {
  const n = Math.max(model.bits.length, bits.length);
  for (let g = 0; g < n; g++) {
    const want = model.bits[g] ?? CLEAN;
    if (want !== MAYBE && (bits[g] ?? 0) !== want) return g;
  }
  return -1;
}

/**
 * An in-memory block backend: growable, browser-safe (no Node APIs).
 */
import { IoError } from "@qimg/structs";
import type { BackendKind, BlockBackend, ReadOptions } from "./backend.js";
import {
  checkNonNegativeInt,
  checkRange,
  closedError,
  readOnlyError,
  settle,
  shortRead,
} from "./validate.js";

/** Options of {@link MemoryBackend}. */
export interface MemoryBackendOptions {
  /** Refuse writes and truncate with a `READ_ONLY` IoError. Default false. */
  readonly readOnly?: boolean;
  /** Name used in messages. Default "memory". */
  readonly name?: string;
  /** Initial capacity in bytes (a hint; the backend grows as needed). Default 0. */
  readonly initialCapacity?: number;
}

/**
 * A growable byte array behind the {@link BlockBackend} interface. Capacity doubles when a
 * write or truncate passes it, so appends are amortized O(1). Bytes between `size()` and the
 * capacity are always zero, so growing reads as zeros.
 */
export class MemoryBackend implements BlockBackend {
  readonly readOnly: boolean;
  readonly kind: BackendKind = "memory";
  readonly name: string;

  #buf: Uint8Array;
  #size = 0;
  #closed = false;

  constructor(options: MemoryBackendOptions = {}) {
    this.readOnly = options.readOnly ?? false;
    this.name = options.name ?? "memory";
    const cap = options.initialCapacity ?? 0;
    checkNonNegativeInt(cap, "initial capacity", this.name);
    this.#buf = new Uint8Array(cap);
  }

  /** A backend holding a copy of `bytes`. */
  static from(bytes: Uint8Array, options: MemoryBackendOptions = {}): MemoryBackend {
    const m = new MemoryBackend({
      ...options,
      initialCapacity: Math.max(bytes.length, options.initialCapacity ?? 0),
    });
    m.#buf.set(bytes);
    m.#size = bytes.length;
    return m;
  }

  /** A copy of the current contents (exactly `size()` bytes). Works after close too. */
  snapshot(): Uint8Array {
    return this.#buf.slice(0, this.#size);
  }

  /** Same as {@link snapshot}: a copy of the current contents. */
  bytes(): Uint8Array {
    return this.snapshot();
  }

  /** Current size, synchronously. */
  get length(): number {
    return this.#size;
  }

  read(offset: number, buf: Uint8Array, options?: ReadOptions): Promise<void> {
    return settle(() => {
      this.#open();
      checkRange(offset, buf, this.name);
      const end = offset + buf.length;
      if (end <= this.#size) {
        buf.set(this.#buf.subarray(offset, end));
      } else if (options?.zeroPastEof === true) {
        const avail = Math.max(0, this.#size - offset);
        if (avail > 0) buf.set(this.#buf.subarray(offset, offset + avail));
        buf.fill(0, avail);
      } else {
        throw shortRead(this.name, offset, buf.length, this.#size);
      }
    });
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return settle(() => {
      this.#open();
      if (this.readOnly) throw readOnlyError(this.name, "write");
      checkRange(offset, data, this.name);
      const end = offset + data.length;
      if (data.length > 0) {
        this.#reserve(end);
        this.#buf.set(data, offset);
        if (end > this.#size) this.#size = end;
      }
    });
  }

  flush(): Promise<void> {
    return settle(() => {
      this.#open();
    });
  }

  size(): Promise<number> {
    return settle(() => {
      this.#open();
      return this.#size;
    });
  }

  truncate(size: number): Promise<void> {
    return settle(() => {
      this.#open();
      if (this.readOnly) throw readOnlyError(this.name, "truncate");
      checkNonNegativeInt(size, "size", this.name);
      if (size < this.#size) {
        // Keep the invariant: bytes past size are zero.
        this.#buf.fill(0, size, this.#size);
      } else {
        this.#reserve(size);
      }
      this.#size = size;
    });
  }

  close(): Promise<void> {
    this.#closed = true;
    return Promise.resolve();
  }

  #open(): void {
    if (this.#closed) throw closedError(this.name);
  }

  #reserve(needed: number): void {
    if (needed <= this.#buf.length) return;
    let cap = Math.max(this.#buf.length * 2, 4096);
    while (cap < needed) cap *= 2;
    let next: Uint8Array;
    try {
      next = new Uint8Array(cap);
    } catch {
      // Doubling overshot what the engine can allocate; try the exact size.
      try {
        next = new Uint8Array(needed);
      } catch (e) {
        throw new IoError(`${this.name}: cannot grow to ${needed} bytes`, { cause: e });
      }
    }
    next.set(this.#buf.subarray(0, this.#size));
    this.#buf = next;
  }
}

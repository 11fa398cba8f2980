/**
 * A fault-injecting wrapper around any {@link BlockBackend}, for crash and error tests.
 * Browser-safe: no Node APIs.
 */
import { ErrorCode, InvalidArgumentError, IoError } from "@qimg/structs";
import type { BackendKind, BlockBackend, ReadOptions } from "./backend.js";
import { MemoryBackend } from "./memory.js";
import { checkNonNegativeInt } from "./validate.js";
import { seededRandom } from "./random.js";

/** The operations a fault can be injected into. */
export type FaultOp = "read" | "write" | "flush" | "truncate";

/**
 * Decide whether an operation fails. `count` is the 1-based number of this operation of
 * this kind (the 3rd write has count 3). For flush, offset and length are 0; for truncate,
 * offset is the new size and length 0.
 */
export type FaultPredicate = (
  op: FaultOp,
  offset: number,
  length: number,
  count: number,
) => boolean;

/** Which operations {@link FaultBackend} fails, and whether it can simulate power loss. */
export interface FaultBackendOptions {
  /** Fail the Nth operation of a kind (1-based), e.g. `{ write: 3 }` or `{ flush: [1, 4] }`. */
  readonly failOn?: Partial<Record<FaultOp, number | readonly number[]>>;
  /** Fail every operation for which this returns true (checked after `failOn`). */
  readonly failWhen?: FaultPredicate;
  /**
   * Keep a durable copy for {@link FaultBackend.powerLoss}. Costs a full read of the inner
   * backend at wrap time and a copy of each unflushed write. Default true.
   */
  readonly trackDurability?: boolean;
}

/** How {@link FaultBackend.powerLoss} treats the writes since the last completed flush. */
export interface PowerLossOptions {
  /**
   * When true and the last operation since the last completed flush was a write, that write
   * survives up to a sector boundary: a random cut among the write's start, every
   * absolute multiple of `sectorSize` inside it, and its end. Default false.
   */
  readonly tearLastWrite?: boolean;
  /** Sector size for tearing. Default 512. */
  readonly sectorSize?: number;
  /** Seed for the tear position (any 32-bit integer). Default: random (reported in `lastPowerLoss`). */
  readonly seed?: number;
}

/** What {@link FaultBackend.powerLoss} did, for assertions and reproducing failures. */
export interface PowerLossReport {
  /** Unflushed operations discarded (writes and truncates), counting a torn write. */
  readonly discarded: number;
  /** The seed used for tearing. */
  readonly seed: number;
  /** Set when a write was torn: where it started, its length, and how many bytes survived. */
  readonly torn?: { readonly offset: number; readonly length: number; readonly kept: number };
}

/** Operation counters; each attempted operation counts, including injected failures. */
export interface FaultCounters {
  /** Reads attempted. */
  readonly reads: number;
  /** Writes attempted. */
  readonly writes: number;
  /** Flushes attempted. */
  readonly flushes: number;
  /** Truncates attempted. */
  readonly truncates: number;
  /** Failures injected so far. */
  readonly injected: number;
}

type Pending =
  { kind: "write"; offset: number; data: Uint8Array } | { kind: "truncate"; size: number };

const mulberry32 = seededRandom;

/**
 * Wraps a backend and (a) fails chosen operations with an `IO` IoError whose message says
 * the failure was injected, and (b) simulates power loss: it tracks which writes a
 * completed flush made durable, and {@link powerLoss} returns a new {@link MemoryBackend}
 * holding only the durable state (optionally plus a torn prefix of the last write).
 *
 * Model: the durable state is a copy of the inner backend taken at wrap time; writes and
 * truncates since the last successful flush are pending; a flush that succeeds (on the
 * inner backend, and not injected to fail) applies them to the durable copy. An operation
 * that fails (injected or real) has no effect on the model; an injected failure does not
 * reach the inner backend at all.
 */
export class FaultBackend implements BlockBackend {
  /** The wrapped backend, which receives every operation that is not failed. */
  readonly inner: BlockBackend;

  #failOn = new Map<FaultOp, Set<number>>();
  #failWhen: FaultPredicate | undefined;
  #durable: MemoryBackend | undefined;
  #pending: Pending[] = [];
  #powerLost = false;
  #reads = 0;
  #writes = 0;
  #flushes = 0;
  #truncates = 0;
  #injected = 0;
  #lastPowerLoss: PowerLossReport | undefined;

  private constructor(
    inner: BlockBackend,
    durable: MemoryBackend | undefined,
    options: FaultBackendOptions,
  ) {
    this.inner = inner;
    this.#durable = durable;
    for (const [op, n] of Object.entries(options.failOn ?? {}) as [
      FaultOp,
      number | readonly number[],
    ][]) {
      this.failOn(op, ...(typeof n === "number" ? [n] : n));
    }
    this.#failWhen = options.failWhen;
  }

  /**
   * Wrap `inner`. Its current contents are taken as durable (read in full, unless
   * `trackDurability` is false).
   */
  static async wrap(inner: BlockBackend, options: FaultBackendOptions = {}): Promise<FaultBackend> {
    let durable: MemoryBackend | undefined;
    if (options.trackDurability ?? true) {
      const size = await inner.size();
      const bytes = new Uint8Array(size);
      if (size > 0) await inner.read(0, bytes);
      durable = MemoryBackend.from(bytes, { name: `${inner.name} (durable)` });
    }
    return new FaultBackend(inner, durable, options);
  }

  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get kind(): BackendKind {
    return this.inner.kind;
  }
  get name(): string {
    return this.inner.name;
  }

  /** Operation counters (attempts, including injected failures). */
  get counters(): FaultCounters {
    return {
      reads: this.#reads,
      writes: this.#writes,
      flushes: this.#flushes,
      truncates: this.#truncates,
      injected: this.#injected,
    };
  }
  /** Reads attempted so far (injected failures included). */
  get reads(): number {
    return this.#reads;
  }
  /** Writes attempted so far (injected failures included). */
  get writes(): number {
    return this.#writes;
  }
  /** Flushes attempted so far (injected failures included). */
  get flushes(): number {
    return this.#flushes;
  }

  /** Writes and truncates not yet made durable by a completed flush. */
  get pendingCount(): number {
    return this.#pending.length;
  }

  /** The report of the last {@link powerLoss}, if any. */
  get lastPowerLoss(): PowerLossReport | undefined {
    return this.#lastPowerLoss;
  }

  /** Fail the given 1-based occurrences of `op` (adds to earlier ones). */
  failOn(op: FaultOp, ...nth: number[]): this {
    let set = this.#failOn.get(op);
    if (set === undefined) this.#failOn.set(op, (set = new Set()));
    for (const n of nth) {
      if (!Number.isSafeInteger(n) || n < 1) {
        throw new InvalidArgumentError(
          `FaultBackend: occurrence ${n} of ${op} must be an integer >= 1`,
        );
      }
      set.add(n);
    }
    return this;
  }

  /** Replace the predicate (undefined removes it). */
  failWhen(predicate: FaultPredicate | undefined): this {
    this.#failWhen = predicate;
    return this;
  }

  /** Remove every configured fault (counters keep counting). */
  clearFaults(): this {
    this.#failOn.clear();
    this.#failWhen = undefined;
    return this;
  }

  async read(offset: number, buf: Uint8Array, options?: ReadOptions): Promise<void> {
    this.#alive();
    const n = ++this.#reads;
    this.#maybeFail("read", offset, buf.length, n);
    await this.inner.read(offset, buf, options);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.#alive();
    const n = ++this.#writes;
    this.#maybeFail("write", offset, data.length, n);
    await this.inner.write(offset, data);
    if (this.#durable !== undefined)
      this.#pending.push({ kind: "write", offset, data: data.slice() });
  }

  async flush(): Promise<void> {
    this.#alive();
    const n = ++this.#flushes;
    this.#maybeFail("flush", 0, 0, n);
    // Only what was completed before the flush started is covered by it.
    const covered = this.#pending.length;
    await this.inner.flush();
    const durable = this.#durable;
    if (durable !== undefined) {
      for (const op of this.#pending.slice(0, covered)) {
        if (op.kind === "write") await durable.write(op.offset, op.data);
        else await durable.truncate(op.size);
      }
      this.#pending.splice(0, covered);
    }
  }

  async size(): Promise<number> {
    this.#alive();
    return await this.inner.size();
  }

  async truncate(size: number): Promise<void> {
    this.#alive();
    const n = ++this.#truncates;
    this.#maybeFail("truncate", size, 0, n);
    await this.inner.truncate(size);
    if (this.#durable !== undefined) this.#pending.push({ kind: "truncate", size });
  }

  /** Closes the inner backend. Allowed after power loss. */
  close(): Promise<void> {
    return this.inner.close();
  }

  /**
   * Simulate losing power now: return a new MemoryBackend holding the durable state (every
   * write and truncate covered by a completed flush, none after), and with `tearLastWrite`
   * a sector-aligned prefix of the last unflushed write. This backend then refuses all I/O
   * with an `IO` IoError "power lost". The inner backend is left as it is.
   */
  powerLoss(options: PowerLossOptions = {}): MemoryBackend {
    this.#alive();
    const durable = this.#durable;
    if (durable === undefined) {
      throw new InvalidArgumentError(
        `${this.name}: powerLoss needs trackDurability (it was turned off)`,
      );
    }
    const sectorSize = options.sectorSize ?? 512;
    checkNonNegativeInt(sectorSize, "sector size", this.name);
    if (sectorSize === 0) throw new InvalidArgumentError(`${this.name}: sector size must be > 0`);
    const seed = (options.seed ?? Math.floor(Math.random() * 0x100000000)) >>> 0;

    const survivor = MemoryBackend.from(durable.snapshot(), {
      name: `${this.name} (after power loss)`,
    });
    let torn: PowerLossReport["torn"];
    const last = this.#pending[this.#pending.length - 1];
    if (
      options.tearLastWrite === true &&
      last !== undefined &&
      last.kind === "write" &&
      last.data.length > 0
    ) {
      const start = last.offset;
      const end = start + last.data.length;
      // Candidate cut points: the start, each absolute sector boundary inside, and the end.
      const cuts: number[] = [start];
      for (let b = (Math.floor(start / sectorSize) + 1) * sectorSize; b < end; b += sectorSize)
        cuts.push(b);
      cuts.push(end);
      const rand = mulberry32(seed);
      const cut = cuts[Math.floor(rand() * cuts.length)] ?? start;
      const kept = cut - start;
      if (kept > 0) {
        // MemoryBackend writes resolve synchronously; nothing to await for correctness,
        // but keep the promise handled.
        void survivor.write(start, last.data.subarray(0, kept));
      }
      torn = { offset: start, length: last.data.length, kept };
    }
    this.#lastPowerLoss = {
      discarded: this.#pending.length,
      seed,
      ...(torn === undefined ? {} : { torn }),
    };
    this.#powerLost = true;
    this.#pending = [];
    return survivor;
  }

  #alive(): void {
    if (this.#powerLost)
      throw new IoError(`${this.name}: power lost (simulated); no further I/O`, {
        code: ErrorCode.IO,
      });
  }

  #maybeFail(op: FaultOp, offset: number, length: number, count: number): void {
    const hit =
      (this.#failOn.get(op)?.has(count) ?? false) ||
      (this.#failWhen?.(op, offset, length, count) ?? false);
    if (hit) {
      this.#injected++;
      throw new IoError(
        `${this.name}: injected ${op} failure (${op} #${count}, offset ${offset}, length ${length})`,
        { code: ErrorCode.IO, offset },
      );
    }
  }
}

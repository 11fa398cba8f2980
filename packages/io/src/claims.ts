/**
 * First-come, first-served claims on ranges of units (clusters): a request claims the units
 * it touches and goes on once every earlier claim that overlaps it has been released. Image
 * drivers use it so that overlapping requests in flight take effect in the order they were
 * issued, and an allocation is never raced by a request on the same clusters; requests on
 * other units run in parallel.
 *
 * Cheap when uncontended (the common case): no promise is made, and overlaps are found through
 * a per-unit index rather than by scanning every claim in flight (claims wider than
 * INDEXED_SPAN units are kept apart and scanned).
 */

/** One claim on units [first, last]. */
interface Claim {
  readonly first: number;
  readonly last: number;
  /** Requests waiting for this claim to be released (made only when someone waits). */
  waiters: (() => void)[] | undefined;
}

/** A claim handed to the caller. */
export interface RangeClaim {
  /** Settles when every earlier overlapping claim is released; undefined when there is none. */
  readonly wait: Promise<unknown> | undefined;
  /** Release the claim (idempotent). */
  readonly release: () => void;
}

/** Claims spanning at most this many units are indexed per unit; wider ones are scanned. */
const INDEXED_SPAN = 64;

function released(c: Claim): Promise<void> {
  return new Promise<void>((resolve) => (c.waiters ??= []).push(resolve));
}

/**
 * First-come, first-served claims on ranges of units (clusters): an overlapping claim waits
 * until every earlier overlapping claim is released, so requests in flight together take
 * effect in the order they were issued. See the package README.
 */
export class RangeClaims {
  readonly #all = new Set<Claim>();
  readonly #byUnit = new Map<number, Claim[]>();
  readonly #wide = new Set<Claim>();

  /** Claims in flight. */
  get size(): number {
    return this.#all.size;
  }

  /** Claim units [first, last] (integers, first <= last) behind every overlapping earlier claim. */
  claim(first: number, last: number): RangeClaim {
    let earlier: Promise<void>[] | undefined;
    const narrow = last - first < INDEXED_SPAN;
    if (narrow) {
      for (let u = first; u <= last; u++) {
        const list = this.#byUnit.get(u);
        if (list !== undefined) for (const c of list) (earlier ??= []).push(released(c));
      }
      for (const c of this.#wide) {
        if (c.first <= last && first <= c.last) (earlier ??= []).push(released(c));
      }
    } else {
      for (const c of this.#all) {
        if (c.first <= last && first <= c.last) (earlier ??= []).push(released(c));
      }
    }
    const claim: Claim = { first, last, waiters: undefined };
    this.#all.add(claim);
    if (narrow) {
      for (let u = first; u <= last; u++) {
        const list = this.#byUnit.get(u);
        if (list === undefined) this.#byUnit.set(u, [claim]);
        else list.push(claim);
      }
    } else {
      this.#wide.add(claim);
    }
    let done = false;
    const release = (): void => {
      if (done) return;
      done = true;
      this.#all.delete(claim);
      if (narrow) {
        for (let u = first; u <= last; u++) {
          const list = this.#byUnit.get(u)!;
          if (list.length === 1) this.#byUnit.delete(u);
          else list.splice(list.indexOf(claim), 1);
        }
      } else {
        this.#wide.delete(claim);
      }
      const waiters = claim.waiters;
      claim.waiters = undefined;
      if (waiters !== undefined) for (const wake of waiters) wake();
    };
    return { wait: earlier === undefined ? undefined : Promise.all(earlier), release };
  }

  /**
   * Run `fn` holding a claim on units [first, last]. The claim is made at once, before any
   * await, so the order of calls is the order in which overlapping requests take effect; `fn`
   * starts when every earlier overlapping claim is released, and the claim is released when
   * `fn` settles.
   */
  async run<T>(first: number, last: number, fn: () => Promise<T>): Promise<T> {
    const claim = this.claim(first, last);
    try {
      if (claim.wait !== undefined) await claim.wait;
      return await fn();
    } finally {
      claim.release();
    }
  }

  /** Settles once no claim is held (claims made meanwhile are waited for too). */
  async drain(): Promise<void> {
    while (this.#all.size > 0) await released(this.#all.values().next().value as Claim);
  }
}

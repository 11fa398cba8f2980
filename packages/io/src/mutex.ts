/**
 * A first-come, first-served lock for async sections: {@link Mutex.run} runs its section once
 * every section started earlier has settled (fulfilled or rejected), so sections never
 * interleave across awaits. Image drivers use it to serialize metadata updates; beside it,
 * {@link RangeClaims} serializes only requests on the same units.
 *
 * Cheap when uncontended: a free mutex starts the section at once (no promise is made to wait
 * on); waiters queue in call order and are woken one at a time. A failing section releases the
 * mutex like a successful one. Sections must not call `run` of the same mutex (that waits for
 * itself forever).
 */
export class Mutex {
  #held = false;
  /** Wake-ups of the waiting sections, oldest first (from `#head`). */
  #queue: (() => void)[] = [];
  #head = 0;

  /** True while a section runs or waits. */
  get locked(): boolean {
    return this.#held;
  }

  /** Sections waiting for the mutex (not counting the one that holds it). */
  get waiting(): number {
    return this.#queue.length - this.#head;
  }

  /**
   * Run `fn` alone: it starts once every section passed to `run` before it has settled, and
   * the mutex passes on when `fn` settles. Resolves or rejects as `fn` does.
   */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#held) await new Promise<void>((wake) => this.#queue.push(wake));
    else this.#held = true;
    try {
      return await fn();
    } finally {
      this.#release();
    }
  }

  /** Settles once no section holds or waits for the mutex. */
  async idle(): Promise<void> {
    while (this.#held) await this.run(() => Promise.resolve());
  }

  #release(): void {
    if (this.#head < this.#queue.length) {
      const wake = this.#queue[this.#head]!;
      this.#head++;
      if (this.#head === this.#queue.length) {
        this.#queue = [];
        this.#head = 0;
      }
      // The mutex stays held: it passes straight to the woken section.
      wake();
    } else {
      this.#held = false;
    }
  }
}

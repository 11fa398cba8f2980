/**
 * A byte-rate limit in the manner of QEMU's throttling of a copy (`qemu-img convert -r`,
 * `commit -r`): time is cut into slices of 100 ms, each allowed `rate / 10` bytes. A request
 * starts at once while the current slice has quota left (so the first request of a slice is
 * never held back, whatever its size); otherwise it waits for the slice in which the bytes
 * already sent are paid for.
 */
export class RateLimiter {
  /** Length of a slice in milliseconds. */
  static readonly SLICE_MS = 100;
  private readonly quota: number;
  private sliceStart = 0;
  private sliceEnd = 0;
  private dispatched = 0;

  /**
   * @param bytesPerSecond the limit (> 0).
   * @param now the clock in milliseconds (tests pass their own).
   * @param sleep waits the given milliseconds (tests pass their own).
   */
  constructor(
    bytesPerSecond: number,
    private readonly now: () => number = () => performance.now(),
    private readonly sleep: (ms: number) => Promise<void> = (ms) =>
      new Promise((resolve) => setTimeout(resolve, ms)),
  ) {
    if (!(bytesPerSecond > 0)) throw new RangeError(`invalid rate limit ${bytesPerSecond}`);
    this.quota = (bytesPerSecond * RateLimiter.SLICE_MS) / 1000;
  }

  /** Wait until `bytes` more may be sent, and count them. */
  async take(bytes: number): Promise<void> {
    for (;;) {
      const t = this.now();
      if (t >= this.sliceEnd) {
        // A new slice; what was sent beyond the old slice's quota is carried over.
        const slices =
          this.sliceEnd === 0 ? 0 : Math.floor((t - this.sliceStart) / RateLimiter.SLICE_MS);
        this.dispatched = Math.max(0, this.dispatched - slices * this.quota);
        this.sliceStart = this.sliceEnd === 0 ? t : this.sliceStart + slices * RateLimiter.SLICE_MS;
        this.sliceEnd = this.sliceStart + RateLimiter.SLICE_MS;
      }
      if (this.dispatched < this.quota) {
        this.dispatched += bytes;
        return;
      }
      // Sleep until the slice in which the bytes already sent are paid for.
      const owed = Math.ceil(this.dispatched / this.quota) - 1;
      await this.sleep(Math.max(1, this.sliceEnd + (owed - 1) * RateLimiter.SLICE_MS - t));
    }
  }
}

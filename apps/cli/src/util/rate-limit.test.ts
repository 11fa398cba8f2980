import { describe, expect, it } from "vitest";
import { RateLimiter } from "./rate-limit.js";

/** A limiter on a fake clock that sleeping advances. */
function fake(rate: number) {
  let now = 0;
  const limiter = new RateLimiter(
    rate,
    () => now,
    (ms) => {
      now += ms;
      return Promise.resolve();
    },
  );
  return { limiter, now: () => now };
}

describe("RateLimiter", () => {
  it("lets the first request of a slice through, then paces to the rate", async () => {
    const { limiter, now } = fake(1000); // 100 bytes per 100 ms slice
    await limiter.take(50);
    await limiter.take(50);
    expect(now()).toBe(0);
    await limiter.take(1000); // the slice's quota is used: wait for the next
    expect(now()).toBe(100);
    await limiter.take(10); // 1000 bytes owe 10 slices
    expect(now()).toBeGreaterThanOrEqual(1000);
    expect(now()).toBeLessThanOrEqual(1100);
  });

  it("averages to the rate over many requests", async () => {
    const { limiter, now } = fake(64 * 1024);
    for (let i = 0; i < 100; i++) await limiter.take(4096);
    // 400 KiB at 64 KiB/s: about 6.25 s (less the first slice's burst).
    expect(now()).toBeGreaterThan(5_800);
    expect(now()).toBeLessThan(6_400);
  });

  it("refuses a rate that is not positive", () => {
    expect(() => new RateLimiter(0)).toThrow(RangeError);
  });
});

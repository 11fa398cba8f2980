import { describe, expect, it } from "vitest";
import { RangeClaims } from "./claims.js";
import { seededRandom } from "./random.js";

describe("RangeClaims", () => {
  it("does not make uncontended claims wait", () => {
    const c = new RangeClaims();
    const a = c.claim(0, 3);
    const b = c.claim(4, 100); // wide, disjoint
    const d = c.claim(200, 200);
    expect([a.wait, b.wait, d.wait]).toEqual([undefined, undefined, undefined]);
    expect(c.size).toBe(3);
    a.release();
    a.release(); // idempotent
    b.release();
    d.release();
    expect(c.size).toBe(0);
  });

  it("orders overlapping claims first come, first served (narrow and wide mixed)", async () => {
    const c = new RangeClaims();
    const order: string[] = [];
    const run = async (name: string, first: number, last: number, hold: number) => {
      const claim = c.claim(first, last);
      if (claim.wait !== undefined) await claim.wait;
      order.push(`${name}+`);
      await new Promise((r) => setTimeout(r, hold));
      order.push(`${name}-`);
      claim.release();
    };
    await Promise.all([
      run("a", 10, 12, 5),
      run("b", 12, 12, 1), // after a
      run("wide", 0, 500, 1), // after a and b
      run("c", 13, 13, 1), // only after wide
      run("d", 600, 601, 1), // free
    ]);
    expect(order.indexOf("b+")).toBeGreaterThan(order.indexOf("a-"));
    expect(order.indexOf("wide+")).toBeGreaterThan(order.indexOf("b-"));
    expect(order.indexOf("c+")).toBeGreaterThan(order.indexOf("wide-"));
    expect(order.indexOf("d+")).toBeLessThan(order.indexOf("a-"));
    expect(c.size).toBe(0);
  });

  it("never lets two overlapping claims hold at once (randomized), and drains", async () => {
    const rnd = seededRandom(4242);
    const c = new RangeClaims();
    const held = new Map<number, number>();
    let violations = 0;
    const tasks = Array.from({ length: 300 }, async (_, i) => {
      await new Promise((r) => setTimeout(r, Math.floor(rnd() * 3)));
      const first = Math.floor(rnd() * 200);
      const last = first + Math.floor(rnd() < 0.1 ? rnd() * 150 : rnd() * 4);
      const claim = c.claim(first, last);
      if (claim.wait !== undefined) await claim.wait;
      for (let u = first; u <= last; u++) {
        if (held.has(u)) violations++;
        held.set(u, i);
      }
      await new Promise((r) => setTimeout(r, Math.floor(rnd() * 2)));
      for (let u = first; u <= last; u++) held.delete(u);
      claim.release();
    });
    const drained = (async () => {
      await new Promise((r) => setTimeout(r, 1));
      await c.drain();
    })();
    await Promise.all([...tasks, drained]);
    expect(violations).toBe(0);
    expect(c.size).toBe(0);
  });
});

describe("RangeClaims.run", () => {
  it("runs overlapping work in call order and releases the claim when the work fails", async () => {
    const c = new RangeClaims();
    const order: string[] = [];
    const slow = c.run(0, 1, async () => {
      await new Promise((r) => setTimeout(r, 5));
      order.push("slow");
      throw new Error("boom");
    });
    const next = c.run(1, 2, () => {
      order.push("next");
      return Promise.resolve(42);
    });
    await expect(slow).rejects.toThrow("boom");
    await expect(next).resolves.toBe(42);
    expect(order).toEqual(["slow", "next"]);
    expect(c.size).toBe(0);
  });
});

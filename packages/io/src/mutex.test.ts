import { describe, expect, it } from "vitest";
import { Mutex } from "./mutex.js";
import { seededRandom } from "./random.js";

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

describe("Mutex", () => {
  it("runs sections one at a time, in call order, across awaits", async () => {
    const seed = Number(process.env.QIMG_SEED ?? Date.now() % 100000);
    const rnd = seededRandom(seed);
    const m = new Mutex();
    const log: string[] = [];
    let inside = 0;
    const jobs = Array.from({ length: 40 }, (_, i) =>
      m.run(async () => {
        inside++;
        expect(inside, `seed ${seed}`).toBe(1);
        log.push(`start ${i}`);
        for (let k = Math.floor(rnd() * 3); k > 0; k--) await tick();
        log.push(`end ${i}`);
        inside--;
        return i;
      }),
    );
    expect(await Promise.all(jobs)).toEqual(jobs.map((_, i) => i));
    expect(log).toEqual(jobs.flatMap((_, i) => [`start ${i}`, `end ${i}`]));
    expect(m.locked).toBe(false);
  });

  it("passes on after a failing section, and the failure reaches only its caller", async () => {
    const m = new Mutex();
    const order: number[] = [];
    const a = m.run(async () => {
      await tick();
      order.push(1);
      throw new Error("boom");
    });
    const b = m.run(() => {
      order.push(2);
      return Promise.resolve("b");
    });
    // A section that throws synchronously also releases the mutex.
    const c = m.run((): Promise<string> => {
      order.push(3);
      throw new Error("sync");
    });
    const d = m.run(() => Promise.resolve("d"));
    await expect(a).rejects.toThrow("boom");
    await expect(b).resolves.toBe("b");
    await expect(c).rejects.toThrow("sync");
    await expect(d).resolves.toBe("d");
    expect(order).toEqual([1, 2, 3]);
    expect(m.locked).toBe(false);
  });

  it("starts a section at once when free, and counts waiters", async () => {
    const m = new Mutex();
    let started = false;
    let release!: () => void;
    const held = m.run(() => {
      started = true;
      return new Promise<void>((r) => (release = r));
    });
    expect(started).toBe(true);
    expect(m.locked).toBe(true);
    const next = m.run(() => Promise.resolve());
    expect(m.waiting).toBe(1);
    let idle = false;
    const whenIdle = m.idle().then(() => (idle = true));
    await tick();
    expect(idle).toBe(false);
    release();
    await held;
    await next;
    await whenIdle;
    expect(idle).toBe(true);
    expect(m.waiting).toBe(0);
    expect(m.locked).toBe(false);
  });
});

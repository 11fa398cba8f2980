import { describe, expect, it } from "vitest";
import { MemoryBackend } from "./memory.js";
import { backendContract } from "./contract.testkit.js";

backendContract("MemoryBackend", {
  empty: () => Promise.resolve(new MemoryBackend()),
  readOnlyWith: (bytes) => Promise.resolve(MemoryBackend.from(bytes, { readOnly: true })),
});

describe("MemoryBackend", () => {
  it("has kind memory and a default name", () => {
    const m = new MemoryBackend();
    expect(m.kind).toBe("memory");
    expect(m.name).toBe("memory");
    expect(new MemoryBackend({ name: "x" }).name).toBe("x");
  });

  it("from() copies its input; snapshot()/bytes() return copies", async () => {
    const src = new Uint8Array([1, 2, 3, 4]);
    const m = MemoryBackend.from(src);
    src[0] = 99;
    const snap = m.snapshot();
    expect([...snap]).toEqual([1, 2, 3, 4]);
    snap[1] = 77;
    expect([...m.bytes()]).toEqual([1, 2, 3, 4]);
    await m.write(4, new Uint8Array([5]));
    expect([...snap]).toEqual([1, 77, 3, 4]);
    expect([...m.snapshot()]).toEqual([1, 2, 3, 4, 5]);
    expect(m.length).toBe(5);
  });

  it("snapshot still works after close", async () => {
    const m = MemoryBackend.from(new Uint8Array([7]));
    await m.close();
    expect([...m.snapshot()]).toEqual([7]);
  });

  it("grows by doubling: 100k one-byte appends stay fast", async () => {
    const m = new MemoryBackend();
    const one = new Uint8Array([1]);
    const t0 = Date.now();
    for (let i = 0; i < 100_000; i++) await m.write(i, one);
    expect(m.length).toBe(100_000);
    expect(Date.now() - t0).toBeLessThan(5000); // quadratic copying would take far longer
  });

  it("uses no Node APIs (browser-safe)", async () => {
    const { readFileSync } = await import("node:fs");
    for (const f of ["memory.ts", "fault.ts", "validate.ts", "backend.ts"]) {
      const text = readFileSync(new URL(`./${f}`, import.meta.url), "utf8");
      expect(text, f).not.toMatch(/from "node:|require\(|\bBuffer\b|\bprocess\./);
    }
  });
});

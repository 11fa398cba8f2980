import { describe, expect, it } from "vitest";
import { MemoryBackend } from "@qimg/io";
import { createQed } from "./create.js";
import { probeQed } from "./probe.js";

describe("probeQed", () => {
  it("recognises a QED header and nothing else", async () => {
    const m = new MemoryBackend();
    await createQed(m, { size: 1000 });
    expect(probeQed(m.snapshot().subarray(0, 512))).toBe(true);
    expect(probeQed(Uint8Array.of(0x51, 0x45, 0x44, 0x00))).toBe(true);
    expect(probeQed(Uint8Array.of(0x51, 0x45, 0x44))).toBe(false);
    expect(probeQed(Uint8Array.of(0x51, 0x46, 0x49, 0xfb))).toBe(false);
    expect(probeQed(Uint8Array.of(0x00, 0x44, 0x45, 0x51))).toBe(false);
    expect(probeQed(new Uint8Array(0))).toBe(false);
  });
});

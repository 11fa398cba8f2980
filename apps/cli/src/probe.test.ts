import { describe, expect, it } from "vitest";
import { probeFormat, probedRawWarning } from "./probe.js";

describe("probeFormat", () => {
  it("recognises qcow2 and QED magic", () => {
    expect(probeFormat(Uint8Array.of(0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3))).toBe("qcow2");
    expect(probeFormat(Uint8Array.of(0x51, 0x45, 0x44, 0x00, 0, 0, 1, 0))).toBe("qed");
  });

  it("guesses nothing for anything else", () => {
    expect(probeFormat(new Uint8Array(512))).toBeUndefined();
    expect(probeFormat(Uint8Array.of(0x51, 0x46, 0x49))).toBeUndefined();
    expect(probeFormat(new Uint8Array(0))).toBeUndefined();
    expect(probeFormat(new TextEncoder().encode("QFI!"))).toBeUndefined();
  });

  it("warns about guessed raw with qemu-img's words", () => {
    expect(probedRawWarning("d.raw")).toBe(
      "WARNING: Image format was not specified for 'd.raw' and probing guessed raw.\n" +
        "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
        "         Specify the 'raw' format explicitly to remove the restrictions.\n",
    );
  });
});

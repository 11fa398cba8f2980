import { describe, expect, it } from "vitest";
import { parseSize, roundUp, SizeParseError } from "./size.js";

describe("parseSize", () => {
  it.each([
    ["0", 0],
    ["512", 512],
    ["1k", 1024],
    ["1K", 1024],
    ["4M", 4 * 1024 ** 2],
    ["2g", 2 * 1024 ** 3],
    ["1T", 1024 ** 4],
    ["1P", 1024 ** 5],
    ["100b", 100],
    ["1.5k", 1536],
    ["1.5M", 1.5 * 1024 ** 2],
    ["0x200", 512],
  ])("%s -> %d", (text, want) => {
    expect(parseSize(text)).toBe(want);
  });

  it.each(["", "k", "-1", "1.5", "1x", "1kb", "abc", "1 k"])("rejects %j", (text) => {
    expect(() => parseSize(text)).toThrow(SizeParseError);
  });

  it("reports overflow as a range error", () => {
    try {
      parseSize("9E");
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(SizeParseError);
      expect((e as SizeParseError).kind).toBe("range");
    }
  });

  it("roundUp", () => {
    expect(roundUp(0, 512)).toBe(0);
    expect(roundUp(1, 512)).toBe(512);
    expect(roundUp(3000, 512)).toBe(3072);
  });
});

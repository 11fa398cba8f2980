import { readdirSync, readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import * as main from "../index.js";
import * as spec from "./index.js";

describe("the ./spec entry", () => {
  it("exports the same codecs as the main entry", () => {
    const missing = Object.keys(spec).filter(
      (name) => (main as Record<string, unknown>)[name] !== (spec as Record<string, unknown>)[name],
    );
    expect(missing).toEqual([]);
    expect(Object.keys(spec).length).toBeGreaterThan(10);
  });

  it("imports nothing but @qimg/structs and other spec files (no driver, no I/O)", () => {
    const dir = new URL("./", import.meta.url);
    const stray: string[] = [];
    for (const file of readdirSync(dir)) {
      if (!file.endsWith(".ts") || file.endsWith(".test.ts")) continue;
      const text = readFileSync(new URL(file, dir), "utf8");
      for (const m of text.matchAll(/\bfrom\s+"([^"]+)"|\bimport\(\s*"([^"]+)"/g)) {
        const target = m[1] ?? m[2] ?? "";
        if (target !== "@qimg/structs" && !/^\.\/[\w-]+\.js$/.test(target)) {
          stray.push(`${file}: ${target}`);
        }
      }
    }
    expect(stray).toEqual([]);
  });
});

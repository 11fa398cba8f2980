import { defineConfig } from "vitest/config";

/** Shared vitest settings: every package merges this into its own config. */
export default defineConfig({
  resolve: {
    // Read sibling workspace packages from their TypeScript source, no build needed.
    conditions: ["@qimg/source"],
  },
  test: {
    include: ["src/**/*.test.ts", "test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: "forks",
  },
});

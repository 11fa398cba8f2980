import { defineConfig } from "vitest/config";

// Read sibling workspace packages from their TypeScript source (the "@qimg/source" export
// condition), so tests need no build of their dependencies.
const conditions = ["@qimg/source", "module", "node", "import", "default"];

/** Shared vitest settings: every package merges this into its own config. */
export default defineConfig({
  resolve: { conditions },
  ssr: { resolve: { conditions, externalConditions: ["@qimg/source"] } },
  test: {
    include: ["src/**/*.test.ts", "test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: "forks",
  },
});

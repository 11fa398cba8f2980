import { defineConfig, mergeConfig } from "vitest/config";
import shared from "../../vitest.shared.js";

export default mergeConfig(
  shared,
  defineConfig({
    test: {
      // Packs and installs the tarballs once for every test file.
      globalSetup: ["test/setup.ts"],
      testTimeout: 180_000,
      hookTimeout: 180_000,
    },
  }),
);

import { defineConfig, mergeConfig } from "vitest/config";
import shared from "../../vitest.shared.js";

export default mergeConfig(
  shared,
  defineConfig({
    // Vite >= 6 applies `resolve.conditions` to the client environment only; vitest's node
    // tests resolve through the SSR environment, so repeat the source condition there.
    ssr: { resolve: { conditions: ["@qimg/source", "module", "node", "development|production"] } },
  }),
);

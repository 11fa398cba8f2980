import { defineConfig } from "tsup";

export default defineConfig({
  entry: { index: "src/index.ts", "spec/index": "src/spec/index.ts" },
  format: ["esm"],
  platform: "neutral",
  target: "node20",
  dts: true,
  sourcemap: false,
  clean: true,
});

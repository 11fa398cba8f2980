import { defineConfig } from "tsup";

export default defineConfig({
  entry: ["src/index.ts"],
  format: ["esm"],
  platform: "neutral",
  target: "node20",
  dts: true,
  sourcemap: false,
  clean: true,
});

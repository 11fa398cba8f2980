import { defineConfig } from "tsup";

export default defineConfig({
  entry: { qimg: "src/main.ts" },
  format: ["esm"],
  platform: "node",
  target: "node20",
  dts: false,
  sourcemap: true,
  clean: true,
  noExternal: [/^@qimg\//],
});

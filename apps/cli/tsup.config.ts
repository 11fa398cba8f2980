import { defineConfig } from "tsup";

export default defineConfig({
  // The compression worker is its own file: the pool starts it by URL next to qimg.js.
  entry: { qimg: "src/main.ts", "compress-worker": "src/util/compress-worker.ts" },
  format: ["esm"],
  platform: "node",
  target: "node20",
  dts: false,
  sourcemap: true,
  clean: true,
  noExternal: [/^@qimg\//],
});

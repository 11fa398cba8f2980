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
  // commander is bundled too: resolving and loading it from node_modules costs start-up time
  // on every run.
  noExternal: [/^@qimg\//, "commander"],
  // commander is CommonJS and requires Node built-ins; an ES module bundle needs a real
  // \`require\` for them.
  banner: {
    js: 'import { createRequire as __qimgRequire } from "node:module"; const require = __qimgRequire(import.meta.url);',
  },
  // Bundle the workspace libraries from their source (the "@qimg/source" export condition),
  // so `pnpm --filter qimg build` works alone, without building them first. This is the one
  // tsup-only option here; a move to tsdown has to carry the condition over to its resolver.
  esbuildOptions(options) {
    options.conditions = ["@qimg/source", "import", "module", "default"];
  },
});

import { readFile } from "node:fs/promises";
import { defineConfig } from "tsup";

const COMMANDER_CHILD_PROCESS = "const childProcess = require('node:child_process');";

/**
 * commander requires node:child_process (and with it net, dgram, ...) at load, only to run
 * executable subcommands, which qimg has none of: make that require lazy (about 4 ms of every
 * start-up).
 */
const lazyCommanderChildProcess = {
  name: "lazy-commander-child-process",
  setup(build: {
    onLoad(
      o: { filter: RegExp },
      f: (a: { path: string }) => Promise<{ contents: string; loader: "js" }>,
    ): void;
  }) {
    build.onLoad({ filter: /commander[\\/]lib[\\/]command\.js$/ }, async (args) => {
      const text = await readFile(args.path, "utf8");
      if (!text.includes(COMMANDER_CHILD_PROCESS)) {
        console.warn(`${args.path}: child_process require not found; left as it is`);
      }
      const lazy =
        "const childProcess = { spawn: (...a) => require('node:child_process').spawn(...a) };";
      return { contents: text.replace(COMMANDER_CHILD_PROCESS, lazy), loader: "js" };
    });
  },
};

export default defineConfig({
  // dist/qimg.cjs is the executable: a small loader that runs dist/cli.cjs (the whole CLI)
  // with a V8 code cache (see src/bin.ts). The compression worker is its own file: the pool
  // starts it by URL next to cli.cjs. CommonJS, because only classic scripts can use a code
  // cache on Node 20 (and they skip the ES module loader's work at start-up).
  entry: {
    qimg: "src/bin.ts",
    cli: "src/main.ts",
    "compress-worker": "src/util/compress-worker.ts",
  },
  format: ["cjs"],
  platform: "node",
  target: "node20",
  dts: false,
  sourcemap: false,
  clean: true,
  // import.meta.url in the sources (worker and package paths) works in CommonJS output.
  shims: true,
  // commander is bundled too: resolving and loading it from node_modules costs start-up time
  // on every run.
  noExternal: [/^@qimg\//, "commander"],
  // Bundle the workspace libraries from their source (the "@qimg/source" export condition),
  // so `pnpm --filter qimg build` works alone, without building them first. This is the one
  // tsup-only option here; a move to tsdown has to carry the condition over to its resolver.
  esbuildPlugins: [lazyCommanderChildProcess],
  esbuildOptions(options) {
    options.conditions = ["@qimg/source", "require", "module", "default"];
    // Modules loaded on demand (zlib, zstd, worker threads) are required, not imported: a
    // script compiled with a code cache (bin.ts) cannot use import() on Node 20.
    options.supported = { ...options.supported, "dynamic-import": false };
  },
});

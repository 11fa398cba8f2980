/**
 * The `qimg` executable: loads the bundled CLI (cli.cjs, next to this file) with a V8 code
 * cache, so later runs skip compiling it.
 *
 * Why: compiling the 450 KB bundle is the largest part of qimg's own start-up, paid on every
 * run of commands that often take well under a second (measured: `qimg --version` in 31-33 ms
 * with the cache, 40 ms without; Node alone takes 25 ms). Node 22's
 * `module.enableCompileCache` does the same; Node 20 has no such thing.
 *
 * The cache lives in the user's cache directory ($XDG_CACHE_HOME/qimg or ~/.cache/qimg,
 * created 0700). There is one file per bundle file (size, modification time, inode: V8
 * itself checks only the source's length), Node version and command. It is written on exit
 * when it was missing or V8 rejected it (another V8, other flags), and files of older
 * bundles are removed then. It is never read from a shared directory: a planted cache would
 * be code we run. QIMG_NO_COMPILE_CACHE=1 bypasses it; any failure to read or write it just
 * means compiling as usual.
 */
import * as fs from "node:fs";
import { homedir } from "node:os";
import * as path from "node:path";
import * as vm from "node:vm";
import Module from "node:module";

const bundle = path.join(__dirname, "cli.cjs");
const source = fs.readFileSync(bundle, "utf8").replace(/^#!.*/, "");

/**
 * The cache file for this bundle, Node and command, and the name prefix every cache of this
 * command shares; undefined when there is no safe place.
 */
function cacheFile(): { file: string; commandPrefix: string } | undefined {
  if (process.env.QIMG_NO_COMPILE_CACHE === "1") return undefined;
  let home: string;
  try {
    home = homedir();
  } catch {
    return undefined;
  }
  const base = process.env.XDG_CACHE_HOME ?? (home === "" ? "" : path.join(home, ".cache"));
  if (!path.isAbsolute(base)) return undefined;
  // No content hash: loading node:crypto alone costs more than the cache saves.
  const st = fs.statSync(bundle);
  const key = [
    st.size,
    Math.floor(st.mtimeMs),
    st.ino,
    process.version,
    process.arch,
    process.execArgv.join(" ").replace(/[^\w.=-]/g, "_"),
  ].join("-");
  const command = (process.argv[2] ?? "").replace(/[^a-z]/g, "").slice(0, 16) || "none";
  const commandPrefix = `cli-${command}-`;
  return { file: path.join(base, "qimg", `${commandPrefix}${key}.v8cache`), commandPrefix };
}

const cache = cacheFile();
let cached: Buffer | undefined;
if (cache !== undefined) {
  try {
    cached = fs.readFileSync(cache.file);
  } catch {
    cached = undefined;
  }
}

// The bundle has no import() (its build turns them into require calls), so no dynamic import
// callback is needed.
const script = new vm.Script(Module.wrap(source), {
  filename: bundle,
  ...(cached === undefined ? {} : { cachedData: cached }),
});

if (cache !== undefined && (cached === undefined || script.cachedDataRejected === true)) {
  const { file, commandPrefix } = cache;
  // Written at exit, so the functions this command ran are compiled into it too.
  process.on("exit", () => {
    try {
      const dir = path.dirname(file);
      fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
      const tmp = `${file}.${process.pid}.tmp`;
      fs.writeFileSync(tmp, script.createCachedData(), { mode: 0o600 });
      fs.renameSync(tmp, file);
      // Caches of this command for other bundles or Nodes are dead weight now.
      for (const old of fs.readdirSync(dir)) {
        const stale = old.startsWith(commandPrefix) && old.endsWith(".v8cache");
        if (stale && old !== path.basename(file)) fs.rmSync(path.join(dir, old), { force: true });
      }
    } catch {
      // No cache this time.
    }
  });
}

const mod = new Module(bundle, module);
mod.filename = bundle;
mod.paths = (Module as unknown as { _nodeModulePaths(dir: string): string[] })._nodeModulePaths(
  path.dirname(bundle),
);
const wrapper = script.runInThisContext() as (
  exports: unknown,
  require: NodeJS.Require,
  module: Module,
  filename: string,
  dirname: string,
) => void;
wrapper.call(
  mod.exports,
  mod.exports,
  Module.createRequire(bundle),
  mod,
  bundle,
  path.dirname(bundle),
);

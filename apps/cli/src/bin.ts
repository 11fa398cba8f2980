#!/usr/bin/env node
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
 * created 0700), in one folder per installation (qimg's version and where it is installed),
 * so two installs never remove each other's files. In it, one file per command qimg has
 * (one more for everything else: --version, --help, typos), keyed by the bundle file (size,
 * modification time, inode: V8 itself checks only the source's length) and the Node version.
 * A file is written on exit when it was missing or V8 rejected it (another V8, other flags),
 * replacing the command's older file. At most {@link MAX_INSTALLS} installation folders are
 * kept: a new one removes the least recently written beyond that, and those of removed
 * installs. So the cache is bounded: (commands + 1) files per install. It is never read from
 * a shared directory: a planted cache would be code we run. QIMG_NO_COMPILE_CACHE=1 bypasses
 * it; any failure to read or write it just means compiling as usual.
 */
import * as fs from "node:fs";
import { homedir } from "node:os";
import * as path from "node:path";
import * as vm from "node:vm";
import Module from "node:module";
import { COMMAND_NAMES } from "./command-names.js";

const bundle = path.join(__dirname, "cli.cjs");
const source = fs.readFileSync(bundle, "utf8").replace(/^#!.*/, "");

/** Installation folders kept in the cache directory (the current one included). */
const MAX_INSTALLS = 4;

/** FNV-1a of `text` as 8 hex digits: names an installation's folder (no node:crypto). */
function fnv1a(text: string): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h.toString(16).padStart(8, "0");
}

/** qimg's version, from the package.json beside dist/. */
function version(): string {
  try {
    const pkg = JSON.parse(fs.readFileSync(path.join(__dirname, "..", "package.json"), "utf8")) as {
      version?: unknown;
    };
    return typeof pkg.version === "string" ? pkg.version.replace(/[^\w.-]/g, "_") : "unknown";
  } catch {
    return "unknown";
  }
}

/** The cache key of the command line: a command name qimg has, or "other". */
function commandKey(arg: string | undefined): string {
  if (arg === undefined) return "other";
  if (COMMAND_NAMES.includes(arg)) return arg;
  if (arg === "-V" || arg === "--version") return "version";
  if (arg === "-h" || arg === "--help" || arg === "help") return "help";
  return "other";
}

/**
 * The cache file for this bundle, Node and command, the name prefix every cache of this
 * command shares in this install's folder, and the folder holding every install's folder;
 * undefined when there is no safe place.
 */
function cacheFile(): { file: string; commandPrefix: string; root: string } | undefined {
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
  const commandPrefix = `${commandKey(process.argv[2])}-`;
  const root = path.join(base, "qimg");
  const install = path.join(root, `${version()}-${fnv1a(path.resolve(bundle))}`);
  return { file: path.join(install, `${commandPrefix}${key}.v8cache`), commandPrefix, root };
}

/**
 * Keep the cache root bounded after a new install folder was made: remove the files of the
 * old flat layout, the folders of installs whose bundle is gone, and the least recently
 * written folders beyond {@link MAX_INSTALLS}.
 */
function pruneInstalls(root: string, current: string): void {
  const installs: { dir: string; mtime: number }[] = [];
  for (const entry of fs.readdirSync(root, { withFileTypes: true })) {
    const full = path.join(root, entry.name);
    if (entry.isFile() && entry.name.endsWith(".v8cache")) {
      fs.rmSync(full, { force: true });
      continue;
    }
    if (!entry.isDirectory() || full === current) continue;
    let origin = "";
    try {
      origin = fs.readFileSync(path.join(full, "bundle"), "utf8");
    } catch {
      // No record of its bundle: treated as gone.
    }
    if (origin === "" || !fs.existsSync(origin)) {
      fs.rmSync(full, { recursive: true, force: true });
      continue;
    }
    installs.push({ dir: full, mtime: fs.statSync(full).mtimeMs });
  }
  installs.sort((a, b) => b.mtime - a.mtime);
  for (const old of installs.slice(MAX_INSTALLS - 1)) {
    fs.rmSync(old.dir, { recursive: true, force: true });
  }
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
  const { file, commandPrefix, root } = cache;
  // Written at exit, so the functions this command ran are compiled into it too.
  process.on("exit", () => {
    try {
      const dir = path.dirname(file);
      fs.mkdirSync(root, { recursive: true, mode: 0o700 });
      const created = fs.mkdirSync(dir, { recursive: true, mode: 0o700 }) !== undefined;
      if (created) {
        fs.writeFileSync(path.join(dir, "bundle"), path.resolve(bundle), { mode: 0o600 });
        pruneInstalls(root, dir);
      }
      const tmp = `${file}.${process.pid}.tmp`;
      fs.writeFileSync(tmp, script.createCachedData(), { mode: 0o600 });
      fs.renameSync(tmp, file);
      // This command's caches for other bundles or Nodes are dead weight now.
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

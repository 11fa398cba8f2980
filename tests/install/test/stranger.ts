/**
 * A stranger's install: every publishable package of the workspace packed with `pnpm pack`
 * (which applies publishConfig and replaces the workspace: and catalog: protocols, as a
 * publish does), and the tarballs installed with npm into a fresh folder outside the
 * workspace, a CommonJS project as `npm init -y` makes it.
 */
import { spawnSync, type SpawnSyncOptions } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = resolve(fileURLToPath(new URL("../../..", import.meta.url)));

/** One packed package. */
export interface PackedPackage {
  /** npm name, e.g. "@qimg/io". */
  readonly name: string;
  /** Its folder in the workspace, relative to the root ("packages/io"). */
  readonly workspaceDir: string;
  /** The tarball pnpm pack wrote. */
  readonly tarball: string;
  /** Where npm installed it in the stranger's project. */
  readonly installedDir: string;
}

/** What the tests get from the global setup. */
export interface Stranger {
  /** The stranger's project folder (outside the workspace), with node_modules. */
  readonly dir: string;
  readonly packages: readonly PackedPackage[];
}

export interface Run {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Run a command; never throws (the tests assert on the result). */
export function run(cmd: string, args: readonly string[], options: SpawnSyncOptions = {}): Run {
  const r = spawnSync(cmd, args, { encoding: "utf8", maxBuffer: 64 << 20, ...options });
  return {
    code: r.status ?? -1,
    stdout: String(r.stdout ?? ""),
    stderr: String(r.stderr ?? "") + (r.error === undefined ? "" : String(r.error)),
  };
}

function must(what: string, r: Run): Run {
  if (r.code !== 0) throw new Error(`${what} failed (exit ${r.code}):\n${r.stderr}${r.stdout}`);
  return r;
}

interface Manifest {
  readonly name: string;
  readonly private?: boolean;
  readonly packageManager?: string;
}

const readJson = <T>(file: string): T => JSON.parse(readFileSync(file, "utf8")) as T;

/** The workspace packages that get published (not private), in folder order. */
export function publishable(): { name: string; workspaceDir: string }[] {
  const out: { name: string; workspaceDir: string }[] = [];
  for (const group of ["packages", "apps"]) {
    for (const dir of readdirSync(join(ROOT, group)).sort()) {
      let pkg: Manifest;
      try {
        pkg = readJson<Manifest>(join(ROOT, group, dir, "package.json"));
      } catch {
        continue;
      }
      if (pkg.private !== true) out.push({ name: pkg.name, workspaceDir: `${group}/${dir}` });
    }
  }
  return out;
}

/** `pnpm`, as the root package.json pins it (run through npx, as .ci/run does). */
function pnpm(args: readonly string[], cwd: string): Run {
  const pinned = readJson<Manifest>(join(ROOT, "package.json")).packageManager ?? "pnpm@10";
  return run("npx", ["--yes", pinned, ...args], { cwd });
}

/** Pack every publishable package and install the tarballs in a new folder under tmpdir(). */
export function prepareStranger(): Stranger {
  const base = mkdtempSync(join(tmpdir(), "qimg-stranger-"));
  if (!relative(ROOT, base).startsWith("..")) {
    throw new Error(`${base} is inside the workspace: the install would see workspace packages`);
  }
  const tarballs = join(base, "tarballs");
  const dir = join(base, "project");
  mkdirSync(tarballs);
  mkdirSync(dir);

  const packed = publishable().map(({ name, workspaceDir }) => {
    const before = new Set(readdirSync(tarballs));
    must(
      `pnpm pack ${name}`,
      pnpm(["pack", "--pack-destination", tarballs], join(ROOT, workspaceDir)),
    );
    const made = readdirSync(tarballs).filter((f) => !before.has(f));
    if (made.length !== 1) throw new Error(`pnpm pack ${name} made ${made.join(", ")}`);
    return { name, workspaceDir, tarball: join(tarballs, made[0]!) };
  });

  // Each @qimg dependency between the packages must come from its tarball, never from the
  // registry: the overrides pin them (npm requires an override of a direct dependency to
  // equal its spec).
  const specs = Object.fromEntries(packed.map((p) => [p.name, `file:${p.tarball}`]));
  writeFileSync(
    join(dir, "package.json"),
    JSON.stringify(
      {
        name: "stranger",
        version: "1.0.0",
        private: true,
        description: "a CommonJS project, as npm init -y makes it",
        dependencies: {
          ...specs,
          // The optional peer of @qimg/qcow2 for zstd writes (the browser test needs it).
          "@bokuweb/zstd-wasm": qcow2PeerRange(),
        },
        overrides: specs,
      },
      null,
      2,
    ),
  );
  must(
    "npm install",
    run("npm", ["install", "--no-audit", "--no-fund", "--loglevel=error"], {
      cwd: dir,
      env: { ...process.env, npm_config_update_notifier: "false" },
    }),
  );
  return {
    dir,
    packages: packed.map((p) => ({ ...p, installedDir: join(dir, "node_modules", p.name) })),
  };
}

/** The @bokuweb/zstd-wasm range @qimg/qcow2 declares as its (optional) peer. */
function qcow2PeerRange(): string {
  const catalog = readFileSync(join(ROOT, "pnpm-workspace.yaml"), "utf8");
  const m = /^\s+"@bokuweb\/zstd-wasm":\s*(\S+)\s*$/m.exec(catalog);
  if (m === null) throw new Error("@bokuweb/zstd-wasm is not in the pnpm catalog");
  return m[1]!;
}

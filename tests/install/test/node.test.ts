/**
 * The packed packages, installed from their tarballs outside the workspace, used as a
 * stranger would in Node: the `qimg` binary by name, `require()` and `import` of every entry
 * point, every README example as the tarball ships it, publint and arethetypeswrong on every
 * package, and tarballs that hold LICENSE, README, package.json and only files that run.
 *
 * README examples: every ```ts or ```js block of a library's README runs, in a fresh folder
 * holding `disk.qcow2`, `disk.qed` (both made by the installed `qimg create`) and `disk.raw`;
 * a block whose info string has `no-run` (```ts no-run) is skipped. The CLI README's shell
 * blocks are usage references; its install block (`qimg --version`) is run here by name.
 */
import { cpSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { delimiter, join } from "node:path";
import { fixturePath, getFixture } from "@qimg/fixtures";
import { transformSync } from "esbuild";
import { beforeAll, describe, expect, inject, it } from "vitest";
import { ROOT, run, type PackedPackage, type Run } from "./stranger.js";

const stranger = inject("stranger");
const { dir } = stranger;
const libraries = stranger.packages.filter((p) => p.name !== "qimg");
const cli = stranger.packages.find((p) => p.name === "qimg");
const requireHere = createRequire(import.meta.url);

interface PackedManifest {
  readonly name: string;
  readonly license?: string;
  readonly repository?: { readonly url?: string; readonly directory?: string };
  readonly homepage?: string;
  readonly bugs?: { readonly url?: string };
  readonly bin?: Record<string, string>;
  readonly exports?: Record<string, unknown>;
  readonly dependencies?: Record<string, string>;
  readonly peerDependencies?: Record<string, string>;
  readonly peerDependenciesMeta?: Record<string, { optional?: boolean }>;
}

const manifestOf = (p: PackedPackage): PackedManifest =>
  JSON.parse(readFileSync(join(p.installedDir, "package.json"), "utf8")) as PackedManifest;

/** The subpaths a package exports (".", "./node", "./spec"), package.json aside. */
function entryPoints(p: PackedPackage): string[] {
  const exports = manifestOf(p).exports ?? {};
  return Object.keys(exports)
    .filter((k) => k !== "./package.json")
    .map((k) => (k === "." ? p.name : `${p.name}/${k.slice(2)}`));
}

/** Node's warning that require() loaded an ES module is expected; nothing else on stderr. */
function unexpectedStderr(stderr: string): string {
  return stderr
    .split("\n")
    .filter(
      (l) =>
        l.trim() !== "" &&
        !/ExperimentalWarning: (CommonJS module|Support for loading ES Module)/.test(l) &&
        !/--trace-warnings/.test(l),
    )
    .join("\n");
}

function node(args: readonly string[], cwd = dir): Run {
  return run(process.execPath, args, { cwd, env: { ...process.env, NODE_OPTIONS: "" } });
}

/** The stranger's shell: the project's node_modules/.bin first on PATH, as npm scripts do. */
function shell(cmd: string, args: readonly string[], cwd = dir): Run {
  const PATH = [join(dir, "node_modules", ".bin"), process.env.PATH ?? ""].join(delimiter);
  return run(cmd, args, {
    cwd,
    env: { ...process.env, PATH, XDG_CACHE_HOME: join(dir, ".cache") },
  });
}

describe("tarballs", () => {
  const license = readFileSync(join(ROOT, "LICENSE"), "utf8");

  it.each(stranger.packages.map((p) => [p.name, p] as const))(
    "%s holds LICENSE, README, package.json and only files that run",
    (_name, p) => {
      const list = run("tar", ["-tzf", p.tarball]);
      expect(list.code).toBe(0);
      const files = list.stdout
        .split("\n")
        .filter((f) => f !== "")
        .map((f) => f.replace(/^package\//, ""));
      expect(files).toEqual(expect.arrayContaining(["LICENSE", "README.md", "package.json"]));
      const runnable = p.name === "qimg" ? /^dist\/[\w-]+\.cjs$/ : /^dist\/[\w/-]+\.(js|d\.ts)$/;
      const other = files.filter(
        (f) => !["LICENSE", "README.md", "package.json"].includes(f) && !runnable.test(f),
      );
      expect(other).toEqual([]);
      expect(readFileSync(join(p.installedDir, "LICENSE"), "utf8")).toBe(license);
    },
  );

  it.each(stranger.packages.map((p) => [p.name, p] as const))(
    "%s has a publishable package.json (MIT, repository, homepage, bugs, no workspace leftovers)",
    (_name, p) => {
      const m = manifestOf(p);
      const resolved = JSON.stringify([m.exports, m.dependencies, m.peerDependencies]);
      expect(resolved).not.toMatch(/workspace:|catalog:|@qimg\/source/);
      expect(m.license).toBe("MIT");
      expect(m.repository?.url).toMatch(/^git\+https:\/\/.+\.git$/);
      expect(m.repository?.directory).toBe(p.workspaceDir);
      expect(m.homepage).toMatch(/^https:\/\//);
      expect(m.bugs?.url).toMatch(/^https:\/\//);
      // README links must work on npm: no relative links out of the package.
      const readme = readFileSync(join(p.installedDir, "README.md"), "utf8");
      expect(readme.match(/\]\(\.\.\/[^)]*\)/g) ?? []).toEqual([]);
    },
  );

  it("qimg ships what runs: commander is bundled, not a dependency", () => {
    const m = manifestOf(cli!);
    expect(Object.keys(m.dependencies ?? {})).not.toContain("commander");
    expect(m.bin?.qimg).toMatch(/^(\.\/)?dist\/qimg\.cjs$/);
  });

  it("@qimg/qcow2 installs one zstd library; the zstd-wasm compressor is an optional peer", () => {
    const m = manifestOf(libraries.find((p) => p.name === "@qimg/qcow2")!);
    expect(Object.keys(m.dependencies ?? {}).filter((d) => /zstd/.test(d))).toEqual(["fzstd"]);
    expect(Object.keys(m.peerDependencies ?? {})).toEqual(["@bokuweb/zstd-wasm"]);
    expect(m.peerDependenciesMeta?.["@bokuweb/zstd-wasm"]?.optional).toBe(true);
  });
});

describe("the qimg binary, by name", () => {
  it("prints its version", () => {
    const r = shell("qimg", ["--version"]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^qimg \d+\.\d+\.\d+/);
  });

  it("qimg info reads a fixture made by qemu-img", () => {
    const fixture = getFixture("qcow2-compressed-zstd");
    const r = shell("qimg", ["info", "--output=json", fixturePath(fixture.name)]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const info = JSON.parse(r.stdout) as Record<string, unknown>;
    expect(info["virtual-size"]).toBe(fixture.virtualSize);
    expect(info.format).toBe("qcow2");
    expect(info["cluster-size"]).toBe(fixture.info?.["cluster-size"]);
  });
});

describe("require() and import of every entry point", () => {
  const entries = libraries.flatMap((p) => entryPoints(p));

  it("every library exports something to both", () => {
    expect(entries).toEqual(
      expect.arrayContaining(["@qimg/io", "@qimg/io/node", "@qimg/qcow2/spec", "@qimg/qed/spec"]),
    );
  });

  it.each(entries)("%s", (spec) => {
    const list =
      "JSON.stringify(Object.keys(m).filter((k) => k !== 'default' && k !== 'module.exports').sort())";
    // A CommonJS project (no "type" in its package.json): a .cjs script and a .mjs script.
    writeFileSync(
      join(dir, "req.cjs"),
      `const m = require(${JSON.stringify(spec)});\nconsole.log(${list});\n`,
    );
    writeFileSync(
      join(dir, "imp.mjs"),
      `const m = await import(${JSON.stringify(spec)});\nconsole.log(${list});\n`,
    );
    const required = node(["req.cjs"]);
    const imported = node(["imp.mjs"]);
    expect(unexpectedStderr(required.stderr)).toBe("");
    expect(required.code).toBe(0);
    expect(imported.stderr).toBe("");
    expect(imported.code).toBe(0);
    const names = JSON.parse(imported.stdout) as string[];
    expect(names.length).toBeGreaterThan(0);
    expect(JSON.parse(required.stdout)).toEqual(names);
  });
});

describe("README examples, as the tarballs ship them", () => {
  const work = join(dir, "readme-work");

  beforeAll(() => {
    mkdirSync(work, { recursive: true });
    for (const [fmt, file] of [
      ["qcow2", "disk.qcow2"],
      ["qed", "disk.qed"],
    ] as const) {
      const r = shell("qimg", ["create", "-q", "-f", fmt, file, "4M"], work);
      expect(r.stderr + r.stdout).toBe("");
    }
    const raw = new Uint8Array(1_000_003);
    for (let i = 0; i < raw.length; i++) raw[i] = (i * 131 + 7) & 0xff;
    writeFileSync(join(work, "disk.raw"), raw);
  });

  const examples = libraries.flatMap((p) => {
    const readme = readFileSync(join(p.installedDir, "README.md"), "utf8");
    const blocks = [
      ...readme.matchAll(/^```(ts|js|typescript|javascript)([^\n]*)\n([\s\S]*?)^```$/gm),
    ];
    return blocks
      .filter((m) => !/\bno-run\b/.test(m[2]!))
      .map((m, i) => [`${p.name} #${i + 1}`, m[1]!, m[3]!] as const);
  });

  it("every library README has a runnable example", () => {
    for (const p of libraries) {
      expect(
        examples.some(([name]) => name.startsWith(`${p.name} #`)),
        p.name,
      ).toBe(true);
    }
  });

  it.each(examples)("%s runs", (name, lang, code) => {
    const cwd = join(dir, "readme-runs", name.replace(/[^\w]+/g, "-"));
    cpSync(work, cwd, { recursive: true });
    // Type annotations stripped, nothing else changed (Node 20 cannot run TypeScript).
    const js = lang.startsWith("t")
      ? transformSync(code, { loader: "ts", format: "esm", target: "node20" }).code
      : code;
    writeFileSync(join(cwd, "example.mjs"), js);
    const r = node(["example.mjs"], cwd);
    expect(r.stderr, `${name}:\n${code}`).toBe("");
    expect(r.code).toBe(0);
  });

  it("every example typechecks against the published types", () => {
    const tsdir = join(dir, "readme-types");
    mkdirSync(tsdir, { recursive: true });
    for (const [name, lang, code] of examples) {
      if (!lang.startsWith("t")) continue;
      writeFileSync(join(tsdir, `${name.replace(/[^\w]+/g, "-")}.mts`), `${code}\nexport {};\n`);
    }
    writeFileSync(
      join(tsdir, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: {
          target: "ES2022",
          module: "NodeNext",
          moduleResolution: "NodeNext",
          strict: true,
          noEmit: true,
          skipLibCheck: true,
          types: ["node"],
          typeRoots: [join(ROOT, "node_modules", "@types")],
        },
        include: ["*.mts"],
      }),
    );
    const tsc = requireHere.resolve("typescript/bin/tsc");
    const r = node([tsc, "-p", join(tsdir, "tsconfig.json")], tsdir);
    expect(r.stdout + r.stderr).toBe("");
    expect(r.code).toBe(0);
  });
});

describe("package linters", () => {
  it.each(stranger.packages.map((p) => [p.name, p] as const))(
    "publint finds nothing in %s",
    async (_name, p) => {
      const { publint } = await import("publint");
      const { formatMessage } = await import("publint/utils");
      const pkg = JSON.parse(readFileSync(join(p.installedDir, "package.json"), "utf8")) as object;
      // The installed folder holds exactly the tarball's files.
      const result = await publint({
        pkgDir: p.installedDir,
        level: "suggestion",
        pack: false,
        strict: true,
      });
      expect(result.messages.map((m) => `${m.type}: ${formatMessage(m, pkg)}`)).toEqual([]);
    },
  );

  it("arethetypeswrong: qimg is a command, with no types to check", () => {
    const attw = join(ROOT, "tests", "install", "node_modules", ".bin", "attw");
    const r = run(attw, [cli!.tarball, "--profile", "node16"]);
    expect(r.stdout).toMatch(/does not contain types/);
    expect(r.code).toBe(0);
  });

  it.each(libraries.map((p) => [p.name, p] as const))(
    "arethetypeswrong finds no problem in %s",
    (_name, p) => {
      const attw = join(ROOT, "tests", "install", "node_modules", ".bin", "attw");
      // Ignored, because both are right for packages that need Node >= 20.19 (engines):
      // - node10 resolution (no exports support) cannot see subpaths ("node16" profile);
      // - cjs-resolves-to-esm: attw predates require(esm), which Node >= 20.19 does by
      //   default (and TypeScript allows from 5.8); the require() tests above prove it works.
      const r = run(attw, [
        p.tarball,
        "--profile",
        "node16",
        "--ignore-rules",
        "cjs-resolves-to-esm",
        "--format",
        "ascii",
      ]);
      // Every resolution that counts is green (the ignored node10 ones are listed too).
      const counted = r.stdout.split("\n").filter((l) => /^(node16|bundler)/.test(l));
      expect(counted.length).toBeGreaterThan(0);
      expect(
        counted.filter((l) => !l.includes("🟢")),
        r.stdout,
      ).toEqual([]);
      expect(r.code).toBe(0);
    },
  );
});

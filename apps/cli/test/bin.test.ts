/**
 * The built executable (dist/qimg.cjs): runs by name (it starts with `#!/usr/bin/env node` and
 * is executable), runs the bundled CLI, keeps a bounded V8 code cache per installation and
 * command in the user's cache directory, and works the same with the cache missing, corrupt,
 * disabled or impossible. (Turbo builds the CLI before its tests run.)
 */
import { spawnSync } from "node:child_process";
import {
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fixturePath } from "@qimg/fixtures";
import { afterAll, describe, expect, it } from "vitest";
import { CLI_DIR } from "./helpers.js";

const BIN = join(CLI_DIR, "dist", "qimg.cjs");
const tmp = mkdtempSync(join(tmpdir(), "qimg-bin-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function run(args: readonly string[], env: Record<string, string | undefined>, bin: string = BIN) {
  const r = spawnSync(process.execPath, [bin, ...args], {
    encoding: "utf8",
    env: { ...process.env, QIMG_NO_COMPILE_CACHE: undefined, ...env },
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe.skipIf(!existsSync(BIN))("dist/qimg.cjs", () => {
  const image = fixturePath("qcow2-v3");

  it("starts with a node shebang and is executable, so it runs by name", () => {
    expect(readFileSync(BIN, "utf8").startsWith("#!/usr/bin/env node\n")).toBe(true);
    expect(statSync(BIN).mode & 0o111).toBe(0o111);
    const r = spawnSync(BIN, ["--version"], {
      encoding: "utf8",
      env: { ...process.env, QIMG_NO_COMPILE_CACHE: "1" },
    });
    expect(r.stderr).toBe("");
    expect(r.stdout).toMatch(/^qimg \d+\.\d+\.\d+/);
  });

  /** The one install folder under `cache`/qimg, and its files (the bundle record aside). */
  function installFiles(cache: string): { dir: string; files: string[] } {
    const installs = readdirSync(join(cache, "qimg"));
    expect(installs).toHaveLength(1);
    const dir = join(cache, "qimg", installs[0]!);
    return { dir, files: readdirSync(dir).filter((f) => f !== "bundle") };
  }

  it("writes a private cache per command on the first run and reuses it", () => {
    const cache = join(tmp, "xdg");
    const first = run(["info", image], { XDG_CACHE_HOME: cache });
    expect(first.stderr).toBe("");
    expect(first.code).toBe(0);
    expect(first.stdout).toMatch(/^image: .*\nfile format: qcow2\n/);
    expect(statSync(join(cache, "qimg")).mode & 0o777).toBe(0o700);
    const { dir, files } = installFiles(cache);
    // One folder per installation: qimg's version and a hash of where it is installed.
    expect(dir).toMatch(/[/\\]\d+\.\d+\.\d+[\w.-]*-[0-9a-f]{8}$/);
    expect(statSync(dir).mode & 0o777).toBe(0o700);
    expect(files).toHaveLength(1);
    expect(files[0]).toMatch(/^info-\d+-\d+-\d+-v\d+\.\d+\.\d+-\w+-.*\.v8cache$/);
    const file = join(dir, files[0]!);
    expect(statSync(file).mode & 0o777).toBe(0o600);
    const before = statSync(file).mtimeMs;

    const second = run(["info", image], { XDG_CACHE_HOME: cache });
    expect(second).toEqual(first);
    expect(statSync(file).mtimeMs).toBe(before); // accepted, so not rewritten

    run(["--version"], { XDG_CACHE_HOME: cache });
    expect(installFiles(cache).files.sort()).toEqual([
      files[0],
      files[0]!.replace(/^info-/, "version-"),
    ]);

    // A cache of another bundle for the same command is removed when this one is written.
    const stale = join(dir, files[0]!.replace(/^info-\d+/, "info-1"));
    writeFileSync(stale, "old");
    rmSync(file);
    run(["info", image], { XDG_CACHE_HOME: cache });
    expect(existsSync(stale)).toBe(false);
    expect(existsSync(file)).toBe(true);
  });

  it("keys the cache by command names qimg has: typos and file names share one file", () => {
    const cache = join(tmp, "names");
    for (const args of [["infoo"], [image], ["no-such-command", "x"], ["info", image]]) {
      run(args, { XDG_CACHE_HOME: cache });
    }
    const names = installFiles(cache).files.map((f) => f.split("-")[0]);
    expect(names.sort()).toEqual(["info", "other"]);
  });

  it("keeps one folder per install: two installs keep their files, old ones are pruned", () => {
    const cache = join(tmp, "installs");
    // Copies of the built package stand in for other installations (global, per project).
    const copies = [1, 2, 3, 4, 5].map((i) => {
      const root = join(tmp, `install-${i}`);
      mkdirSync(join(root, "dist"), { recursive: true });
      cpSync(join(CLI_DIR, "dist"), join(root, "dist"), { recursive: true });
      cpSync(join(CLI_DIR, "package.json"), join(root, "package.json"));
      return join(root, "dist", "qimg.cjs");
    });
    const folders = (): string[] => readdirSync(join(cache, "qimg")).sort();
    // A file of the old flat layout is removed when an install folder is made.
    mkdirSync(join(cache, "qimg"), { recursive: true });
    writeFileSync(join(cache, "qimg", "cli-info-1-2-3-v20.0.0-x64-.v8cache"), "old");

    expect(run(["--version"], { XDG_CACHE_HOME: cache }, copies[0]).code).toBe(0);
    expect(run(["--version"], { XDG_CACHE_HOME: cache }, copies[1]).code).toBe(0);
    const two = folders();
    expect(two).toHaveLength(2);
    // Running either again rewrites nothing of the other.
    expect(run(["--version"], { XDG_CACHE_HOME: cache }, copies[0]).code).toBe(0);
    expect(folders()).toEqual(two);
    for (const f of two) expect(readdirSync(join(cache, "qimg", f))).toHaveLength(2);

    // An install that is gone loses its folder; beyond four installs the oldest go.
    rmSync(join(tmp, "install-2"), { recursive: true });
    for (const bin of copies.slice(2)) run(["--version"], { XDG_CACHE_HOME: cache }, bin);
    const kept = folders();
    expect(kept.length).toBeLessThanOrEqual(4);
    const origins = kept.map((f) => readFileSync(join(cache, "qimg", f, "bundle"), "utf8"));
    const bundleOf = (bin: string): string => join(bin, "..", "cli.cjs");
    expect(origins).not.toContain(bundleOf(copies[1]!));
    expect(origins).toContain(bundleOf(copies[4]!));
  });

  it("replaces a corrupt cache, and runs without one when disabled or unsafe", () => {
    const cache = join(tmp, "corrupt");
    const reference = run(["info", image], { XDG_CACHE_HOME: cache });
    const { dir, files } = installFiles(cache);
    const file = join(dir, files[0]!);
    writeFileSync(file, "not a code cache");
    expect(run(["info", image], { XDG_CACHE_HOME: cache })).toEqual(reference);
    expect(statSync(file).size).toBeGreaterThan(1000);

    const off = join(tmp, "off");
    expect(run(["info", image], { XDG_CACHE_HOME: off, QIMG_NO_COMPILE_CACHE: "1" })).toEqual(
      reference,
    );
    expect(existsSync(off)).toBe(false);
    // A relative XDG_CACHE_HOME is not trusted (it would depend on the working directory).
    expect(run(["info", image], { XDG_CACHE_HOME: "relative/dir" })).toEqual(reference);
    expect(existsSync(join(CLI_DIR, "relative"))).toBe(false);
  });

  it("errors are one line with qemu-img's exit code", () => {
    const r = run(["info", join(tmp, "missing.qcow2")], { XDG_CACHE_HOME: join(tmp, "e") });
    expect(r.code).toBe(1);
    expect(r.stdout).toBe("");
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(r.stderr).toMatch(/^qimg: .*missing\.qcow2: /);
  });
});

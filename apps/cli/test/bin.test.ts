/**
 * The built executable (dist/qimg.cjs): runs the bundled CLI, keeps a V8 code cache per
 * command in the user's cache directory, and works the same with the cache missing, corrupt,
 * disabled or impossible. (Turbo builds the CLI before its tests run.)
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fixturePath } from "@qimg/fixtures";
import { afterAll, describe, expect, it } from "vitest";
import { CLI_DIR } from "./helpers.js";

const BIN = join(CLI_DIR, "dist", "qimg.cjs");
const tmp = mkdtempSync(join(tmpdir(), "qimg-bin-"));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function run(args: readonly string[], env: Record<string, string | undefined>) {
  const r = spawnSync(process.execPath, [BIN, ...args], {
    encoding: "utf8",
    env: { ...process.env, QIMG_NO_COMPILE_CACHE: undefined, ...env },
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe.skipIf(!existsSync(BIN))("dist/qimg.cjs", () => {
  const image = fixturePath("qcow2-v3");

  it("writes a private cache per command on the first run and reuses it", () => {
    const cache = join(tmp, "xdg");
    const first = run(["info", image], { XDG_CACHE_HOME: cache });
    expect(first.stderr).toBe("");
    expect(first.code).toBe(0);
    expect(first.stdout).toMatch(/^image: .*\nfile format: qcow2\n/);
    const dir = join(cache, "qimg");
    expect(statSync(dir).mode & 0o777).toBe(0o700);
    const files = readdirSync(dir);
    expect(files).toHaveLength(1);
    expect(files[0]).toMatch(/^cli-info-\d+-\d+-\d+-v\d+\.\d+\.\d+-\w+-.*\.v8cache$/);
    const file = join(dir, files[0]!);
    expect(statSync(file).mode & 0o777).toBe(0o600);
    const before = statSync(file).mtimeMs;

    const second = run(["info", image], { XDG_CACHE_HOME: cache });
    expect(second).toEqual(first);
    expect(statSync(file).mtimeMs).toBe(before); // accepted, so not rewritten

    run(["--version"], { XDG_CACHE_HOME: cache });
    expect(readdirSync(dir).sort()).toEqual([
      files[0],
      files[0]!.replace("cli-info-", "cli-version-"),
    ]);

    // A cache of another bundle for the same command is removed when this one is written.
    const stale = join(dir, files[0]!.replace(/^cli-info-\d+/, "cli-info-1"));
    writeFileSync(stale, "old");
    rmSync(file);
    run(["info", image], { XDG_CACHE_HOME: cache });
    expect(existsSync(stale)).toBe(false);
    expect(existsSync(file)).toBe(true);
  });

  it("replaces a corrupt cache, and runs without one when disabled or unsafe", () => {
    const cache = join(tmp, "corrupt");
    const reference = run(["info", image], { XDG_CACHE_HOME: cache });
    const dir = join(cache, "qimg");
    const file = join(dir, readdirSync(dir)[0]!);
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

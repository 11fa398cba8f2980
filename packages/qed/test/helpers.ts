/**
 * Setup shared by the QED interop tests: whether qemu-img is there (with the printed reason
 * when it is not), a temporary work directory removed after the file's tests, the seed, and
 * running qemu-img / qemu-io.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll } from "vitest";
import { requireQemu } from "@qimg/fixtures";

/** Whether qemu-img runs (throws instead when QIMG_REQUIRE_QEMU=1 and it does not). */
export const haveQemu = requireQemu();

/** Print why `what` is skipped when qemu-img is missing. */
export function noteSkipWithoutQemu(what: string): void {
  if (!haveQemu)
    console.log(
      `skipping ${what}: qemu-img is not on PATH (set QIMG_REQUIRE_QEMU=1 to fail instead)`,
    );
}

/** A fresh temporary directory `<tmp>/<prefix>XXXXXX`, removed after the calling file's tests. */
export function workDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** The seed: QIMG_SEED, or one derived from the clock (print it with every failure). */
export const SEED = Number(process.env.QIMG_SEED ?? Date.now() % 1_000_000);

/** Run a command (C locale) and return its exit status and output. */
export function run(
  cmd: string,
  args: string[],
): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: "utf8", env: { ...process.env, LC_ALL: "C" } });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** `qemu-img check --output=json` counters. */
export function qemuCounts(file: string): { corruptions: number; leaks: number; errors: number } {
  const r = run("qemu-img", ["check", "--output=json", file]);
  const j = JSON.parse(r.stdout) as Record<string, number | undefined>;
  return { corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, errors: j["check-errors"] ?? 0 };
}
